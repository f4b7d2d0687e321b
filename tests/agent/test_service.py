"""The Agent service on a fake host: prepare, unprepare, refusals, crash recovery."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from tessera.agent.actuation.vfio import VfioBinder
from tessera.agent.checkpoint import Checkpoint, CheckpointEntry
from tessera.agent.nvml import NullNvmlClient
from tessera.agent.reporter import HostReporter
from tessera.agent.service import AgentServicer
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.hosts import build
from tessera.agent.testing.kernel import KernelEmulator
from tessera.v1 import agent_pb2, agent_pb2_grpc, placement_pb2

from ..conftest import Runner

GPU, AUDIO = "0000:01:00.0", "0000:01:00.1"


@pytest.fixture
def host(tmp_path: Path) -> Sysfs:
    root = tmp_path / "ws"
    build("gpu-workstation", root)
    return Sysfs(root, KernelEmulator(root))


def driver(sysfs: Sysfs, address: str) -> str | None:
    link = sysfs.path("bus", "pci", "devices", address, "driver")
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def group_of(sysfs: Sysfs, address: str) -> int:
    link = sysfs.path("bus", "pci", "devices", address, "iommu_group")
    return int(os.path.basename(os.readlink(link)))


def placement(sysfs: Sysfs, endpoints: list[str], pid: str = "pl-1") -> placement_pb2.Placement:
    return placement_pb2.Placement(
        placement_id=pid,
        host_id="ws",
        allocations=[
            placement_pb2.ClaimAllocation(
                claim="gpu",
                whole_device=placement_pb2.WholeDeviceSlot(address=GPU, group_endpoints=endpoints),
                iommu_group=group_of(sysfs, GPU),
            )
        ],
    )


def servicer(sysfs: Sysfs, state: Path) -> AgentServicer:
    reporter = HostReporter(sysfs, NullNvmlClient(), host_id="ws", boot_id="b", labels={})
    return AgentServicer(sysfs, reporter, Checkpoint(state / "cp.json"))


@asynccontextmanager
async def serving(svc: AgentServicer) -> AsyncIterator[agent_pb2_grpc.AgentAsyncStub]:
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServicer_to_server(svc, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield agent_pb2_grpc.AgentStub(channel)
    await server.stop(None)


def run_with(
    arun: Runner,
    svc: AgentServicer,
    body: Callable[[agent_pb2_grpc.AgentAsyncStub], Awaitable[None]],
) -> None:
    async def main() -> None:
        async with serving(svc) as stub:
            await body(stub)

    arun(main())


def test_prepare_binds_the_whole_group_and_is_idempotent(
    host: Sysfs, tmp_path: Path, arun: Runner
) -> None:
    svc = servicer(host, tmp_path)

    async def body(stub: agent_pb2_grpc.AgentAsyncStub) -> None:
        want = placement(host, [GPU, AUDIO])
        first = (await stub.Prepare(agent_pb2.PrepareRequest(placement=want))).placement
        again = (await stub.Prepare(agent_pb2.PrepareRequest(placement=want))).placement
        assert first == again
        assert first.allocations[0].vfio_path == f"/dev/vfio/{group_of(host, GPU)}"
        assert driver(host, GPU) == driver(host, AUDIO) == "vfio-pci"
        state = await stub.GetState(agent_pb2.GetStateRequest())
        assert list(state.prepared_placements) == ["pl-1"]
        await stub.Unprepare(agent_pb2.UnprepareRequest(placement=want))
        await stub.Unprepare(agent_pb2.UnprepareRequest(placement=want))
        assert (driver(host, GPU), driver(host, AUDIO)) == ("nvidia", "snd_hda_intel")

    run_with(arun, svc, body)
    assert Checkpoint(tmp_path / "cp.json").entries() == {}


def test_a_group_that_differs_from_the_placement_is_refused_untouched(
    host: Sysfs, tmp_path: Path, arun: Runner
) -> None:
    svc = servicer(host, tmp_path)

    async def body(stub: agent_pb2_grpc.AgentAsyncStub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Prepare(agent_pb2.PrepareRequest(placement=placement(host, [GPU])))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert AUDIO in (err.value.details() or "")

    run_with(arun, svc, body)
    assert (driver(host, GPU), driver(host, AUDIO)) == ("nvidia", "snd_hda_intel")


def test_a_placement_for_another_host_is_refused(host: Sysfs, tmp_path: Path, arun: Runner) -> None:
    svc = servicer(host, tmp_path)
    other = placement(host, [GPU, AUDIO])
    other.host_id = "elsewhere"

    async def body(stub: agent_pb2_grpc.AgentAsyncStub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Prepare(agent_pb2.PrepareRequest(placement=other))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    run_with(arun, svc, body)
    assert driver(host, GPU) == "nvidia"


def test_a_restart_rolls_back_a_prepare_that_died_half_way(host: Sysfs, tmp_path: Path) -> None:
    # What a crash between the checkpoint's "started" record and its
    # "prepared" record leaves: the GPU already on vfio-pci, the audio not.
    binder = VfioBinder(host)
    records = [binder.current(GPU), binder.current(AUDIO)]
    Checkpoint(tmp_path / "cp.json").put(
        CheckpointEntry("pl-9", "started", tuple(r.to_dict() for r in records), b"")
    )
    binder.bind_group([GPU])
    assert driver(host, GPU) == "vfio-pci"

    servicer(host, tmp_path).recover()

    assert (driver(host, GPU), driver(host, AUDIO)) == ("nvidia", "snd_hda_intel")
    assert Checkpoint(tmp_path / "cp.json").entries() == {}


def test_devices_held_by_another_placement_are_never_prepared_twice(
    host: Sysfs, tmp_path: Path, arun: Runner
) -> None:
    svc = servicer(host, tmp_path)

    async def body(stub: agent_pb2_grpc.AgentAsyncStub) -> None:
        await stub.Prepare(agent_pb2.PrepareRequest(placement=placement(host, [GPU, AUDIO], "a")))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Prepare(
                agent_pb2.PrepareRequest(placement=placement(host, [GPU, AUDIO], "b"))
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "placement a" in (err.value.details() or "")

    run_with(arun, svc, body)
    assert list(Checkpoint(tmp_path / "cp.json").entries()) == ["a"]


def test_the_boot_display_is_reported_and_never_handed_over(
    host: Sysfs, tmp_path: Path, arun: Runner
) -> None:
    # What the kernel shows for the firmware's boot display (pci-sysfs.c).
    host.path("bus", "pci", "devices", GPU, "boot_vga").write_text("1\n")
    svc = servicer(host, tmp_path)
    reporter = HostReporter(host, NullNvmlClient(), host_id="ws", boot_id="b", labels={})
    inventory, _ = reporter.report()
    reported = {f.address: f.host_use for f in inventory.pci_functions}
    assert reported[GPU] == "boot display" and reported[AUDIO] == ""

    async def body(stub: agent_pb2_grpc.AgentAsyncStub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Prepare(agent_pb2.PrepareRequest(placement=placement(host, [GPU, AUDIO])))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "boot display" in (err.value.details() or "")

    run_with(arun, svc, body)
    assert (driver(host, GPU), driver(host, AUDIO)) == ("nvidia", "snd_hda_intel")


def test_a_nic_whose_link_is_up_is_reported_as_used_by_the_host(tmp_path: Path) -> None:
    root = tmp_path / "nic"
    build("sriov-nic", root)
    # The netdev the kernel would create under the PF, with its link up.
    netdev = root / "sys" / "bus" / "pci" / "devices" / "0000:31:00.0" / "net" / "enp49s0f0np0"
    netdev.mkdir(parents=True)
    (netdev / "operstate").write_text("up\n")
    sysfs = Sysfs(root)
    reporter = HostReporter(sysfs, NullNvmlClient(), host_id="nic", boot_id="b", labels={})
    inventory, _ = reporter.report()
    uses = {f.address: f.host_use for f in inventory.pci_functions if f.host_use}
    assert uses == {"0000:31:00.0": "network interface enp49s0f0np0 is up"}
