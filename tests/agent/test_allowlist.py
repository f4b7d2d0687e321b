"""The operator's allow-list: parsing, matching, the inventory and Prepare's refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tessera.agent.__main__ import main
from tessera.agent.allowlist import (
    NOT_ALLOWED,
    AddressSpec,
    AllowList,
    ClassSpec,
    IdSpec,
    parse_spec,
)
from tessera.agent.checkpoint import Checkpoint
from tessera.agent.nvml import NullNvmlClient, PynvmlClient
from tessera.agent.probes.pci import PciAddress, PciFunction
from tessera.agent.reporter import HostReporter
from tessera.agent.service import AgentServicer
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.nvml import FakeNvml

from ..conftest import Runner
from . import test_service_slots as slots
from .agentclient import AgentClient
from .test_service_slots import (
    A100,
    P4,
    PF,
    THREE_G,
    UUID_A,
    attr,
    driver,
    mdev,
    mdevs,
    mig,
    placement,
    vf,
    whole,
)

# Fixtures shared with test_service_slots.
fake_nvml = slots.fake_nvml
host = slots.host
root = slots.root


def fn(
    address: str, vendor: int = 0x10DE, device: int = 0x20B5, klass: int = 0x030200, **kw: str
) -> PciFunction:
    physfn = kw.get("physfn")
    return PciFunction(
        address=PciAddress(address),
        vendor_id=vendor,
        device_id=device,
        subsystem_vendor_id=0,
        subsystem_device_id=0,
        class_code=klass,
        driver=None,
        driver_override=None,
        numa_node=0,
        local_cpulist=None,
        link=None,
        reset_methods=(),
        physfn=PciAddress(physfn) if physfn else None,
        device_path=(),
    )


def host_of(*functions: PciFunction) -> dict[PciAddress, PciFunction]:
    return {f.address: f for f in functions}


# -- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("0000:4b:00.0", AddressSpec("0000:4b:00.0")),
        ("0000:4B:00.0", AddressSpec("0000:4b:00.0")),
        ("10de:20b5", IdSpec(0x10DE, 0x20B5)),
        ("15b3:*", IdSpec(0x15B3, None)),
        ("class=0302", ClassSpec("0302")),
        ("class=02", ClassSpec("02")),
        ("class=0x030200", ClassSpec("030200")),
    ],
)
def test_each_form_of_spec_parses(text: str, spec: object) -> None:
    assert parse_spec(text) == spec


@pytest.mark.parametrize("text", ["", "4b:00.0", "10de", "10de:20b", "class=3", "class=", "gpu"])
def test_a_malformed_spec_is_refused_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="allow-list entry"):
        parse_spec(text)


def test_no_entry_gives_the_classes_the_scheduler_offers() -> None:
    assert AllowList.parse([]) == AllowList.parse([""]) == AllowList.default()
    assert str(AllowList.default()) == "class=03, class=02, class=0b, class=10, class=12"


def test_entries_may_be_comma_separated() -> None:
    assert AllowList.parse(["15b3:*,class=0302", "0000:4b:00.0"]).specs == (
        IdSpec(0x15B3, None),
        ClassSpec("0302"),
        AddressSpec("0000:4b:00.0"),
    )


# -- matching ---------------------------------------------------------------------------


def test_the_default_allows_offered_classes_and_refuses_storage() -> None:
    functions = host_of(
        fn("0000:01:00.0"),
        fn("0000:02:00.0", 0x15B3, 0x101D, 0x020000),
        fn("0000:03:00.0", 0x144D, 0xA808, 0x010802),  # NVMe
        fn("0000:00:00.0", 0x8086, 0x3E30, 0x060000),  # host bridge
    )

    assert AllowList.default().refusals(functions) == {"0000:03:00.0": NOT_ALLOWED}


def test_a_gpus_companion_functions_go_with_it_but_not_another_offered_function() -> None:
    functions = host_of(
        fn("0000:01:00.0"),
        fn("0000:01:00.1", 0x10DE, 0x1AEF, 0x040300),  # HDMI audio
        fn("0000:01:00.2", 0x10DE, 0x1AF0, 0x0C0330),  # USB-C
        fn("0000:02:00.0", 0x15B3, 0x101D, 0x020000),
        fn("0000:02:00.1", 0x15B3, 0x101D, 0x020000),
    )
    allow = AllowList.parse(["0000:01:00.0", "0000:02:00.0"])

    assert allow.refusals(functions) == {"0000:02:00.1": NOT_ALLOWED}


def test_a_vf_is_allowed_exactly_when_its_pf_is() -> None:
    functions = host_of(
        fn("0000:31:00.0", 0x15B3, 0x101D, 0x020000),
        fn("0000:31:00.2", 0x15B3, 0x101E, 0x020000, physfn="0000:31:00.0"),
        fn("0000:cb:00.0", 0x8086, 0x159B, 0x020000),
        fn("0000:cb:01.0", 0x8086, 0x1889, 0x020000, physfn="0000:cb:00.0"),
    )

    assert AllowList.parse(["15b3:101d", "8086:1889"]).refusals(functions) == {
        "0000:cb:00.0": NOT_ALLOWED,
        "0000:cb:01.0": NOT_ALLOWED,
    }


# -- the inventory ----------------------------------------------------------------------


def test_the_inventory_reports_what_is_outside_the_list_as_in_host_use(host: Sysfs) -> None:
    reporter = HostReporter(
        host,
        NullNvmlClient(),
        host_id="virt",
        boot_id="b",
        labels={},
        allow=AllowList.parse(["15b3:*", "class=0302"]),
    )

    inventory, _ = reporter.report()

    refused = sorted(f.address for f in inventory.pci_functions if f.host_use == NOT_ALLOWED)
    assert refused == [
        "0000:06:0d.0",
        "0000:06:0d.1",
        "0000:6b:00.0",
        "0000:cb:00.0",
        "0000:cb:00.1",
    ]


def test_without_a_list_the_inventory_marks_nothing_on_virt_2s(host: Sysfs) -> None:
    reporter = HostReporter(
        host, NullNvmlClient(), host_id="virt", boot_id="b", labels={}, allow=AllowList.default()
    )

    inventory, _ = reporter.report()

    assert [f.address for f in inventory.pci_functions if f.host_use] == []


# -- Prepare ------------------------------------------------------------------------------


@pytest.fixture
def strict(
    host: Sysfs,
    fake_nvml: FakeNvml,
    tmp_path: Path,
    arun: Runner,
) -> Iterator[AgentClient]:
    """An agent allowed only the E810 (8086:159b) and nothing else."""
    reporter = HostReporter(host, NullNvmlClient(), host_id="virt", boot_id="b", labels={})
    servicer = AgentServicer(
        host,
        reporter,
        Checkpoint(tmp_path / "cp.json"),
        nvml=PynvmlClient(fake_nvml),
        allow=AllowList.parse(["8086:159b"]),
    )
    client = AgentClient(arun, servicer)
    yield client
    client.close()


def test_prepare_refuses_a_whole_device_outside_the_list(strict: AgentClient, host: Sysfs) -> None:
    code, details = strict.refusal(placement("pl", whole(A100, 5)))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("allocations[0].whole_device.address: ")
    assert NOT_ALLOWED in details
    assert driver(host, A100) == "nvidia"


def test_prepare_refuses_a_vf_whose_pf_is_outside_the_list(
    strict: AgentClient, host: Sysfs
) -> None:
    code, details = strict.refusal(placement("pl", vf(1)))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith(f"allocations[0].vf.pf_address: {PF} is {NOT_ALLOWED}")
    assert attr(host, PF, "sriov_numvfs") == "0"


def test_prepare_refuses_an_mdev_whose_parent_is_outside_the_list(
    strict: AgentClient, host: Sysfs
) -> None:
    code, details = strict.refusal(placement("pl", mdev(UUID_A)))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith(f"allocations[0].mdev.parent_address: {P4}")
    assert mdevs(host) == []


def test_prepare_refuses_a_mig_slot_on_a_gpu_outside_the_list(strict: AgentClient) -> None:
    code, details = strict.refusal(placement("pl", mig(THREE_G, 4, 4)))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith(f"allocations[0].mig.gpu_address: {A100}")


def test_prepare_carries_out_a_vf_of_an_allowed_pf(strict: AgentClient, host: Sysfs) -> None:
    got = strict.prepare(placement("pl", vf(0, 2, pf="0000:cb:00.0")))

    assert driver(host, got.allocations[0].vf.vf_address) == "vfio-pci"
    strict.unprepare("pl")
    assert attr(host, "0000:cb:00.0", "sriov_numvfs") == "0"


# -- the command line -------------------------------------------------------------------


def test_inventory_shows_the_effect_of_allow(
    root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TESSERA_AGENT_ALLOW", raising=False)
    main(["inventory", "--sysfs-root", str(root), "--allow", "15b3:*", "--allow", "class=03"])
    lines = capsys.readouterr().out.splitlines()

    refused = sorted(line.split()[0] for line in lines if NOT_ALLOWED in line)
    assert refused == [
        "0000:06:0d.0",
        "0000:06:0d.1",
        "0000:6b:00.0",
        "0000:cb:00.0",
        "0000:cb:00.1",
    ]


def test_the_allow_list_may_come_from_the_environment(
    root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TESSERA_AGENT_ALLOW", "0000:4b:00.0,0000:b1:00.0")
    main(["inventory", "--sysfs-root", str(root)])
    lines = capsys.readouterr().out.splitlines()

    refused = sorted(line.split()[0] for line in lines if NOT_ALLOWED in line)
    assert refused == [
        "0000:06:0d.0",
        "0000:06:0d.1",
        "0000:31:00.0",
        "0000:31:00.1",
        "0000:6b:00.0",
        "0000:cb:00.0",
        "0000:cb:00.1",
    ]


def test_a_malformed_allow_entry_stops_the_agent(root: Path) -> None:
    with pytest.raises(SystemExit, match="allow-list entry 'gpu'"):
        main(["inventory", "--sysfs-root", str(root), "--allow", "gpu"])
