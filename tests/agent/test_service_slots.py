"""The Agent service carrying out VF, mdev and MIG slots on the 2-socket virtualization host.

The host (``virt-2s``)::

    31:00.0 CX-6 Dx PF0 (mlx5_core), 8 VFs possible at 31:00.2.. (none at build time)
    4b:00.0 A100 80GB PCIe, MIG on (turned on through the fake driver below)
    b1:00.0 Tesla P4 (nvidia), mdev parent, one vGPU type at a time

Everything is read back from the fake sysfs tree and the fake NVML state file,
not from the agent's answers.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tessera.agent.actuation.mdev import MdevManager
from tessera.agent.actuation.sriov import SriovConfigurator
from tessera.agent.actuation.steps import MdevCreate, MigCreate, SriovEnable, StepRecord, VfioBind
from tessera.agent.actuation.vfio import VfioBinder
from tessera.agent.checkpoint import Checkpoint, CheckpointEntry
from tessera.agent.nvml import NullNvmlClient, NvmlMigClient, PynvmlClient
from tessera.agent.reporter import HostReporter
from tessera.agent.service import AgentServicer
from tessera.agent.sysfs import Sysfs, SysfsWriter
from tessera.agent.testing.hosts import build
from tessera.agent.testing.kernel import KernelEmulator
from tessera.agent.testing.nvml import STATE_FILE, FakeNvml
from tessera.v1 import inventory_pb2, placement_pb2

from ..conftest import Runner
from .agentclient import AgentClient

PF = "0000:31:00.0"
VF0, VF1, VF2 = "0000:31:00.2", "0000:31:00.3", "0000:31:00.4"
A100 = "0000:4b:00.0"
P4 = "0000:b1:00.0"
UUID_A = "3f1d7f58-0c55-4c4e-9b0e-1d2a3b4c5d01"
UUID_B = "3f1d7f58-0c55-4c4e-9b0e-1d2a3b4c5d02"
THREE_G, FOUR_G, ONE_G = 9, 5, 19  # A100 80GB: 3g.40gb, 4g.40gb, 1g.10gb


# -- the host ------------------------------------------------------------------------


class VfioProbeFails:
    """The kernel when a VFIO driver's probe of one device fails.

    ``drivers_probe`` still succeeds (the kernel ignores probe errors there)
    and nothing binds, as for a device on vfio-pci's denylist.
    """

    def __init__(self, kernel: SysfsWriter, address: str) -> None:
        self._kernel = kernel
        self._address = address

    def write(self, path: Path, data: str) -> None:
        if path.name == "drivers_probe" and data == self._address:
            return
        self._kernel.write(path, data)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "virt"
    build("virt-2s", root)
    return root


@pytest.fixture
def host(root: Path) -> Sysfs:
    return Sysfs(root, KernelEmulator(root))


@pytest.fixture
def fake_nvml(root: Path) -> FakeNvml:
    nvml = FakeNvml.from_tree(root)
    nvml.nvmlInit()
    a100 = nvml.nvmlDeviceGetHandleByIndex(0)
    nvml.nvmlDeviceSetMigMode(a100, nvml.NVML_DEVICE_MIG_ENABLE)
    return nvml


def servicer(host: Sysfs, state: Path, nvml: NvmlMigClient | None) -> AgentServicer:
    reporter = HostReporter(host, NullNvmlClient(), host_id="virt", boot_id="b", labels={})
    return AgentServicer(host, reporter, Checkpoint(state / "cp.json"), nvml=nvml)


@pytest.fixture
def agent(host: Sysfs, fake_nvml: FakeNvml, tmp_path: Path, arun: Runner) -> Iterator[AgentClient]:
    client = AgentClient(arun, servicer(host, tmp_path, PynvmlClient(fake_nvml)))
    yield client
    client.close()


def attr(host: Sysfs, address: str, name: str) -> str | None:
    return host.read(host.path("bus", "pci", "devices", address, name))


def driver(host: Sysfs, address: str) -> str | None:
    return host.link_name(host.path("bus", "pci", "devices", address, "driver"))


def group_of(host: Sysfs, address: str) -> int:
    group = host.link_name(host.path("bus", "pci", "devices", address, "iommu_group"))
    assert group is not None
    return int(group)


def mdevs(host: Sysfs) -> list[str]:
    return host.listdir(host.path("bus", "mdev", "devices"))


def gpu_instances(root: Path) -> list[dict[str, Any]]:
    """The A100's GPU instances as the fake driver's state file has them."""
    state = json.loads((root / STATE_FILE).read_text())
    instances: list[dict[str, Any]] = state["gpus"][0]["instances"]
    return instances


def occupy(fake: FakeNvml, profile_id: int, start: int, size: int) -> int:
    """A GPU instance someone else made (nvidia-smi mig -cgi); its id."""
    where = fake.c_nvmlGpuInstancePlacement_t()
    where.start, where.size = start, size
    gi = fake.nvmlDeviceCreateGpuInstanceWithPlacement(
        fake.nvmlDeviceGetHandleByIndex(0), profile_id, where
    )
    return int(fake.nvmlGpuInstanceGetInfo(gi).id)


def checkpoint(state: Path) -> dict[str, CheckpointEntry]:
    return Checkpoint(state / "cp.json").entries()


# -- placements ------------------------------------------------------------------------


def vf(
    index: int, num_vfs: int = 4, *, pf: str = PF, **fields: Any
) -> placement_pb2.ClaimAllocation:
    return placement_pb2.ClaimAllocation(
        claim="nic",
        vf=placement_pb2.VfSlot(pf_address=pf, vf_index=index, num_vfs=num_vfs, **fields),
    )


def mdev(uuid: str, type_id: str = "nvidia-63") -> placement_pb2.ClaimAllocation:
    return placement_pb2.ClaimAllocation(
        claim="vgpu",
        mdev=placement_pb2.MdevSlot(parent_address=P4, type_id=type_id, uuid=uuid),
    )


def mig(profile_id: int, start: int, size: int, name: str = "") -> placement_pb2.ClaimAllocation:
    return placement_pb2.ClaimAllocation(
        claim="mig",
        mig=placement_pb2.MigSlot(
            gpu_address=A100,
            profile_id=profile_id,
            profile_name=name,
            placement=inventory_pb2.MigPlacement(start=start, size=size),
        ),
    )


def placement(pid: str, *allocations: placement_pb2.ClaimAllocation) -> placement_pb2.Placement:
    return placement_pb2.Placement(placement_id=pid, host_id="virt", allocations=allocations)


# -- VFs -------------------------------------------------------------------------------


def test_a_vf_of_a_pf_without_vfs_enables_them_binds_its_group_and_disables_them_after(
    agent: AgentClient, host: Sysfs, tmp_path: Path
) -> None:
    want = placement("pl-vf", vf(1))

    first = agent.prepare(want)
    again = agent.prepare(want)

    assert first == again
    got = first.allocations[0]
    assert got.vf.vf_address == VF1
    assert got.iommu_group == group_of(host, VF1)
    assert got.vfio_path == f"/dev/vfio/{got.iommu_group}"
    assert host.exists(host.dev / "vfio" / str(got.iommu_group))
    assert attr(host, PF, "sriov_numvfs") == "4"
    assert attr(host, PF, "sriov_drivers_autoprobe") == "0"
    assert (driver(host, VF0), driver(host, VF1)) == (None, "vfio-pci")
    assert agent.prepared() == ["pl-vf"]

    agent.unprepare("pl-vf")
    agent.unprepare("pl-vf")

    assert attr(host, PF, "sriov_numvfs") == "0"
    assert attr(host, PF, "sriov_drivers_autoprobe") == "1"
    assert not host.exists(host.path("bus", "pci", "devices", VF1))
    assert checkpoint(tmp_path) == {}


def test_a_migratable_vf_of_a_pf_without_vfs_is_created_on_its_migration_driver(
    agent: AgentClient, host: Sysfs
) -> None:
    # What the scheduler sends for a migratable claim on a PF whose VFs do
    # not exist yet: the driver the PF reported for its future VFs.
    reporter = HostReporter(host, NullNvmlClient(), host_id="virt", boot_id="b", labels={})
    before, _ = reporter.report()
    pf = next(p for p in before.sriov_pfs if p.address == PF)
    assert (pf.num_vfs, pf.vf_migration_driver) == (0, "mlx5_vfio_pci")

    got = agent.prepare(placement("pl", vf(1, vfio_driver=pf.vf_migration_driver)))

    assert got.allocations[0].vf.vf_address == VF1
    # mlx5_vfio_pci binds only through driver_override; VF 0 stays unbound
    # (autoprobe off while the agent's VFs exist).
    assert (driver(host, VF0), driver(host, VF1)) == (None, "mlx5_vfio_pci")
    assert attr(host, VF1, "driver_override") == "mlx5_vfio_pci"
    after, _ = reporter.report()
    bound = next(f for f in after.pci_functions if f.address == VF1)
    assert bound.migratability.current_binding_migratable
    agent.unprepare("pl")
    assert attr(host, PF, "sriov_numvfs") == "0"


def test_a_pf_that_has_vfs_keeps_its_count_and_the_vf_gets_its_driver_back(
    agent: AgentClient, host: Sysfs
) -> None:
    SriovConfigurator(host)._write(PF, "sriov_numvfs", "4")  # the admin's VFs, on mlx5_core
    assert driver(host, VF2) == "mlx5_core"

    got = agent.prepare(placement("pl", vf(2, vfio_driver="mlx5_vfio_pci")))

    assert got.allocations[0].vf.vf_address == VF2
    assert driver(host, VF2) == "mlx5_vfio_pci"
    agent.unprepare("pl")
    assert attr(host, PF, "sriov_numvfs") == "4"
    assert driver(host, VF2) == "mlx5_core"


def test_a_vf_beyond_the_vfs_a_pf_has_is_refused_without_changing_the_count(
    agent: AgentClient, host: Sysfs
) -> None:
    SriovConfigurator(host)._write(PF, "sriov_numvfs", "2")

    code, details = agent.refusal(placement("pl", vf(3)))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("allocations[0].vf.vf_index: ")
    assert "has 2 VFs" in details
    assert attr(host, PF, "sriov_numvfs") == "2"


def test_a_vf_held_by_another_placement_is_refused_and_shared_vfs_stay_until_the_last_goes(
    agent: AgentClient, host: Sysfs, tmp_path: Path
) -> None:
    agent.prepare(placement("a", vf(1)))

    code, details = agent.refusal(placement("b", vf(1)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "placement a" in details and VF1 in details

    agent.prepare(placement("b", vf(2)))
    agent.unprepare("a")
    # The agent enabled the VFs, but b still holds one of them.
    assert attr(host, PF, "sriov_numvfs") == "4"
    assert driver(host, VF2) == "vfio-pci"

    agent.unprepare("b")
    assert attr(host, PF, "sriov_numvfs") == "0"
    assert attr(host, PF, "sriov_drivers_autoprobe") == "1"
    assert checkpoint(tmp_path) == {}


def whole(address: str, group: int) -> placement_pb2.ClaimAllocation:
    return placement_pb2.ClaimAllocation(
        claim="pf",
        whole_device=placement_pb2.WholeDeviceSlot(address=address, group_endpoints=[address]),
        iommu_group=group,
    )


def test_a_pf_and_its_vfs_never_go_to_two_placements(agent: AgentClient, host: Sysfs) -> None:
    agent.prepare(placement("a", vf(1)))

    code, details = agent.refusal(placement("b", whole(PF, group_of(host, PF))))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "VFs held by placement a" in details
    assert driver(host, PF) == "mlx5_core"

    agent.unprepare("a")
    agent.prepare(placement("b", whole(PF, group_of(host, PF))))
    code, details = agent.refusal(placement("c", vf(1)))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("allocations[0].vf.pf_address: ")
    assert attr(host, PF, "sriov_drivers_autoprobe") == "1"


def test_a_vf_whose_address_is_not_the_placements_is_refused_and_rolled_back(
    agent: AgentClient, host: Sysfs
) -> None:
    code, details = agent.refusal(placement("pl", vf(1, vf_address=VF2)))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("allocations[0].vf.vf_address: ")
    assert details.endswith("(rolled back)")
    assert attr(host, PF, "sriov_numvfs") == "0"


# -- mdevs ------------------------------------------------------------------------------


def test_an_mdev_is_created_then_removed_and_both_are_idempotent(
    agent: AgentClient, host: Sysfs, tmp_path: Path
) -> None:
    want = placement("pl-mdev", mdev(UUID_A))

    first = agent.prepare(want)
    again = agent.prepare(want)

    assert first == again
    assert mdevs(host) == [UUID_A]
    group = MdevManager(host).iommu_group(UUID_A)
    assert first.allocations[0].iommu_group == group
    assert first.allocations[0].vfio_path == f"/dev/vfio/{group}"

    agent.unprepare("pl-mdev")
    agent.unprepare("pl-mdev")
    assert mdevs(host) == []
    assert checkpoint(tmp_path) == {}


def test_an_mdev_that_exists_with_the_placements_type_is_adopted(
    agent: AgentClient, host: Sysfs
) -> None:
    MdevManager(host).create(P4, "nvidia-63", UUID_A)

    agent.prepare(placement("pl", mdev(UUID_A)))

    assert mdevs(host) == [UUID_A]


def test_an_mdev_uuid_taken_by_another_type_is_refused(agent: AgentClient, host: Sysfs) -> None:
    MdevManager(host).create(P4, "nvidia-64", UUID_A)

    code, details = agent.refusal(placement("pl", mdev(UUID_A)))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("allocations[0].mdev.uuid: ")
    assert MdevManager(host).type_of(UUID_A) == "nvidia-64"


def test_an_mdev_held_by_another_placement_is_refused(agent: AgentClient) -> None:
    agent.prepare(placement("a", mdev(UUID_A)))

    code, details = agent.refusal(placement("b", mdev(UUID_A)))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "placement a" in details


# -- MIG --------------------------------------------------------------------------------


def test_a_mig_slot_creates_its_gpu_instance_at_the_placement_then_destroys_it(
    agent: AgentClient, root: Path, tmp_path: Path
) -> None:
    want = placement("pl-mig", mig(THREE_G, 4, 4, "3g.40gb"))

    first = agent.prepare(want)
    again = agent.prepare(want)

    assert first == again
    [gi] = gpu_instances(root)
    assert (gi["profile_id"], gi["start"], gi["size"]) == (THREE_G, 4, 4)
    [ci] = gi["cis"]
    assert ci["profile_id"] == 2  # the 3-slice CI: the whole 3g GPU instance
    got = first.allocations[0].mig
    assert (got.gpu_instance_id, got.compute_instance_id, got.mig_uuid) == (
        gi["id"],
        ci["id"],
        ci["uuid"],
    )

    agent.unprepare("pl-mig")
    agent.unprepare("pl-mig")
    assert gpu_instances(root) == []
    assert checkpoint(tmp_path) == {}


def test_a_gpu_instance_the_agent_did_not_create_is_never_adopted(
    agent: AgentClient, fake_nvml: FakeNvml, root: Path
) -> None:
    theirs = occupy(fake_nvml, THREE_G, 4, 4)

    code, details = agent.refusal(placement("pl", mig(THREE_G, 4, 4)))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("allocations[0].mig.placement: ")
    assert [gi["id"] for gi in gpu_instances(root)] == [theirs]


def test_a_mig_slot_without_nvml_is_refused(host: Sysfs, tmp_path: Path, arun: Runner) -> None:
    client = AgentClient(arun, servicer(host, tmp_path, NullNvmlClient("no driver")))
    try:
        code, details = client.refusal(placement("pl", mig(THREE_G, 4, 4)))
    finally:
        client.close()

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("allocations[0].mig.gpu_address: ")
    assert "no driver" in details


def test_a_mig_slot_on_a_gpu_with_mig_off_is_refused(
    agent: AgentClient, fake_nvml: FakeNvml
) -> None:
    a100 = fake_nvml.nvmlDeviceGetHandleByIndex(0)
    fake_nvml.nvmlDeviceSetMigMode(a100, fake_nvml.NVML_DEVICE_MIG_DISABLE)

    code, details = agent.refusal(placement("pl", mig(THREE_G, 4, 4)))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "MIG mode is not enabled" in details


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allocation", "field"),
    [
        (vf(4, 4), "allocations[0].vf.vf_index"),
        (vf(0, 0), "allocations[0].vf.num_vfs"),
        (vf(0, pf="31:00.0"), "allocations[0].vf.pf_address"),
        (vf(0, vfio_driver="mlx5_core"), "allocations[0].vf.vfio_driver"),
        (mdev(""), "allocations[0].mdev.uuid"),
        (mdev("not-a-uuid"), "allocations[0].mdev.uuid"),
        (mdev(UUID_A, type_id=""), "allocations[0].mdev.type_id"),
        (mig(THREE_G, 2, 4), "allocations[0].mig.placement"),
        (mig(THREE_G, 0, 0), "allocations[0].mig.placement"),
        (mig(77, 0, 4), "allocations[0].mig.profile_id"),
        (mig(THREE_G, 0, 4, "4g.40gb"), "allocations[0].mig.profile_name"),
        (placement_pb2.ClaimAllocation(claim="empty"), "allocations[0]: no slot"),
    ],
)
def test_a_malformed_slot_is_invalid_and_names_its_field(
    agent: AgentClient,
    host: Sysfs,
    root: Path,
    allocation: placement_pb2.ClaimAllocation,
    field: str,
) -> None:
    code, details = agent.refusal(placement("pl", allocation))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field)
    assert attr(host, PF, "sriov_numvfs") == "0"
    assert (mdevs(host), gpu_instances(root)) == ([], [])


def test_two_allocations_of_one_vf_are_invalid(agent: AgentClient) -> None:
    code, details = agent.refusal(placement("pl", vf(1), vf(1)))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("allocations[1].vf")


# -- failing half way ----------------------------------------------------------------------


def test_an_occupied_mig_placement_rolls_back_the_vfs_enabled_before_it(
    agent: AgentClient, host: Sysfs, fake_nvml: FakeNvml, root: Path, tmp_path: Path
) -> None:
    theirs = occupy(fake_nvml, ONE_G, 5, 1)  # inside the 3g placement 4+4

    code, details = agent.refusal(placement("pl", vf(1), mdev(UUID_A), mig(THREE_G, 4, 4)))

    assert code == grpc.StatusCode.INTERNAL
    assert "INSUFFICIENT_RESOURCES" in details and details.endswith("(rolled back)")
    assert attr(host, PF, "sriov_numvfs") == "0"
    assert attr(host, PF, "sriov_drivers_autoprobe") == "1"
    assert mdevs(host) == []
    assert [gi["id"] for gi in gpu_instances(root)] == [theirs]
    assert checkpoint(tmp_path) == {}


def test_a_second_partition_overlapping_the_first_destroys_the_first(
    agent: AgentClient, root: Path
) -> None:
    code, details = agent.refusal(placement("pl", mig(FOUR_G, 0, 4), mig(THREE_G, 0, 4)))

    assert code == grpc.StatusCode.INTERNAL
    assert details.endswith("(rolled back)")
    assert gpu_instances(root) == []


def test_a_vf_the_vfio_driver_will_not_take_rolls_back_everything_before_it(
    root: Path, fake_nvml: FakeNvml, tmp_path: Path, arun: Runner
) -> None:
    host = Sysfs(root, VfioProbeFails(KernelEmulator(root), VF1))
    client = AgentClient(arun, servicer(host, tmp_path, PynvmlClient(fake_nvml)))
    try:
        code, details = client.refusal(placement("pl", mig(THREE_G, 0, 4), mdev(UUID_A), vf(1)))
    finally:
        client.close()

    assert code == grpc.StatusCode.INTERNAL
    assert VF1 in details and details.endswith("(rolled back)")
    assert attr(host, PF, "sriov_numvfs") == "0"
    assert attr(host, PF, "sriov_drivers_autoprobe") == "1"
    assert mdevs(host) == []
    assert gpu_instances(root) == []
    assert checkpoint(tmp_path) == {}


# -- crash recovery --------------------------------------------------------------------------


def crashed(state: Path, pid: str, *records: StepRecord) -> None:
    """The checkpoint a crash left: ``records`` written, ``prepared`` never."""
    Checkpoint(state / "cp.json").put(
        CheckpointEntry(pid, "started", (), b"", tuple(r.to_dict() for r in records))
    )


def test_recover_disables_vfs_and_restores_a_vf_a_crash_left_half_bound(
    host: Sysfs, tmp_path: Path
) -> None:
    sriov, binder = SriovConfigurator(host), VfioBinder(host)
    enable = SriovEnable(PF, 4, original_autoprobe=True)
    sriov.enable(PF, 4)
    bind = VfioBind((binder.current(VF1),), pf=PF)
    crashed(tmp_path, "pl", StepRecord(enable, "done"), StepRecord(bind))
    binder.bind_group([VF1])

    servicer(host, tmp_path, None).recover()

    assert attr(host, PF, "sriov_numvfs") == "0"
    assert attr(host, PF, "sriov_drivers_autoprobe") == "1"
    assert checkpoint(tmp_path) == {}


def test_recover_puts_autoprobe_back_when_the_crash_came_before_the_vfs(
    host: Sysfs, tmp_path: Path
) -> None:
    crashed(tmp_path, "pl", StepRecord(SriovEnable(PF, 4, original_autoprobe=True)))
    host.write(host.path("bus", "pci", "devices", PF, "sriov_drivers_autoprobe"), "0")

    servicer(host, tmp_path, None).recover()

    assert attr(host, PF, "sriov_drivers_autoprobe") == "1"
    assert checkpoint(tmp_path) == {}


def test_recover_removes_an_mdev_a_crash_left_half_recorded(host: Sysfs, tmp_path: Path) -> None:
    crashed(tmp_path, "pl", StepRecord(MdevCreate(P4, "nvidia-63", UUID_A, created=True)))
    MdevManager(host).create(P4, "nvidia-63", UUID_A)

    servicer(host, tmp_path, None).recover()

    assert mdevs(host) == []
    assert checkpoint(tmp_path) == {}


def test_recover_destroys_a_partition_created_before_its_id_was_recorded(
    host: Sysfs, fake_nvml: FakeNvml, root: Path, tmp_path: Path
) -> None:
    gpu_uuid = fake_nvml.nvmlDeviceGetUUID(fake_nvml.nvmlDeviceGetHandleByIndex(0))
    crashed(tmp_path, "pl", StepRecord(MigCreate(gpu_uuid, A100, THREE_G, 4, 4)))
    occupy(fake_nvml, THREE_G, 4, 4)
    theirs = occupy(fake_nvml, THREE_G, 0, 4)

    servicer(host, tmp_path, PynvmlClient(fake_nvml)).recover()

    assert [gi["id"] for gi in gpu_instances(root)] == [theirs]
    assert checkpoint(tmp_path) == {}


def test_recover_keeps_prepared_placements(
    agent: AgentClient, host: Sysfs, fake_nvml: FakeNvml, root: Path, tmp_path: Path
) -> None:
    agent.prepare(placement("pl", vf(1), mdev(UUID_A), mig(THREE_G, 4, 4)))

    servicer(host, tmp_path, PynvmlClient(fake_nvml)).recover()

    assert list(checkpoint(tmp_path)) == ["pl"]
    assert (attr(host, PF, "sriov_numvfs"), mdevs(host)) == ("4", [UUID_A])
    assert len(gpu_instances(root)) == 1


def test_a_retried_prepare_adopts_the_partition_its_crashed_attempt_created(
    host: Sysfs, fake_nvml: FakeNvml, root: Path, tmp_path: Path, arun: Runner
) -> None:
    gpu_uuid = fake_nvml.nvmlDeviceGetUUID(fake_nvml.nvmlDeviceGetHandleByIndex(0))
    crashed(tmp_path, "pl", StepRecord(MigCreate(gpu_uuid, A100, THREE_G, 4, 4)))
    ours = occupy(fake_nvml, THREE_G, 4, 4)

    # No recover() in between (it could not run, say): Prepare meets the record.
    client = AgentClient(arun, servicer(host, tmp_path, PynvmlClient(fake_nvml)))
    try:
        got = client.prepare(placement("pl", mig(THREE_G, 4, 4)))
    finally:
        client.close()

    [gi] = gpu_instances(root)
    assert gi["id"] == ours == got.allocations[0].mig.gpu_instance_id
    assert len(gi["cis"]) == 1


def test_an_unbound_vf_errno_is_reported_when_the_pf_has_no_driver(
    agent: AgentClient, host: Sysfs
) -> None:
    host.write(host.path("bus", "pci", "drivers", "mlx5_core", "unbind"), PF)

    code, details = agent.refusal(placement("pl", vf(1)))

    assert code == grpc.StatusCode.INTERNAL
    assert errno.errorcode[errno.ENOENT] in details and details.endswith("(rolled back)")
    assert attr(host, PF, "sriov_drivers_autoprobe") == "1"
