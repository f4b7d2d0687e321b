"""kill -9 of the agent at each step of each host operation, then a restart.

The acceptance test of crash safety: for each kind of host operation (a
whole-group bind of a two-endpoint group, VF enable and bind, mdev creation,
MIG GPU- and compute-instance creation) and for every write N it makes, a real
``tessera-agent run --fake-kernel`` process is SIGKILLed right after its N-th
host write (``TESSERA_FAKE_CRASH_AFTER_WRITES``, :mod:`agent.testing.crash`),
then restarted on the same tree and state directory. After the restart:

* a crash during Prepare: the host is exactly as before (the restart rolled
  the half-done placement back); Prepare again takes effect exactly once (one
  binding, one set of VFs, one mdev with that UUID, one GPU instance at that
  placement), and Unprepare leaves the host exactly as before;
* a crash during Unprepare: Unprepare again completes and leaves the host
  exactly as before: original drivers, ``sriov_numvfs`` 0, no mdev, no GPU
  instance.

The host is ``virt-2s`` (see ``test_service_slots``) with MIG on the A100.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import pytest

from tessera.agent.checkpoint import Checkpoint
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.crash import CRASH_ENV, writes_counted
from tessera.agent.testing.hosts import build
from tessera.agent.testing.nvml import STATE_FILE, FakeNvml
from tessera.security.certs import create_ca, issue
from tessera.security.identity import agent_dns_name
from tessera.security.tls import TlsDir, sync_channel
from tessera.v1 import agent_pb2, agent_pb2_grpc, placement_pb2

from .test_service_slots import PF, THREE_G, UUID_A, VF1, mdev, mig, placement, vf

#: tmpfs when available: building a tree is bound by file creation.
SCRATCH = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
E1000 = ("0000:06:0d.0", "0000:06:0d.1")  # group 0, behind a conventional PCI bridge
PID = "pl-crash"


# -- the host, read back --------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, Any]:
    """Everything a host operation changes, as read from the tree."""
    sysfs = Sysfs(root)
    devices = {}
    for address in sysfs.listdir(sysfs.path("bus", "pci", "devices")):
        device = sysfs.path("bus", "pci", "devices", address)
        devices[address] = {
            "driver": sysfs.link_name(device / "driver"),
            "override": sysfs.read(device / "driver_override"),
            "numvfs": sysfs.read(device / "sriov_numvfs"),
            "autoprobe": sysfs.read(device / "sriov_drivers_autoprobe"),
        }
    mdev_bus = sysfs.path("bus", "mdev", "devices")
    mdevs = {u: sysfs.link_name(mdev_bus / u / "mdev_type") for u in sysfs.listdir(mdev_bus)}
    gpus = json.loads((root / STATE_FILE).read_text())["gpus"]
    return {"devices": devices, "mdevs": mdevs, "gpu_instances": [g["instances"] for g in gpus]}


def gpu_instances(root: Path) -> list[dict[str, Any]]:
    instances: list[dict[str, Any]] = json.loads((root / STATE_FILE).read_text())["gpus"][0][
        "instances"
    ]
    return instances


# -- the operations -----------------------------------------------------------------------------


def group_bound(root: Path, got: placement_pb2.Placement) -> None:
    devices = snapshot(root)["devices"]
    assert [(devices[e]["driver"], devices[e]["override"]) for e in E1000] == [
        ("vfio-pci", "vfio-pci")
    ] * 2
    assert [a for a, d in devices.items() if d["driver"] == "vfio-pci"] == list(E1000)
    assert got.allocations[0].vfio_path == "/dev/vfio/0"


def vf_bound(root: Path, got: placement_pb2.Placement) -> None:
    devices = snapshot(root)["devices"]
    assert (devices[PF]["numvfs"], devices[PF]["autoprobe"]) == ("2", "0")
    vfs = [a for a in devices if a.startswith("0000:31:00.") and a not in (PF, "0000:31:00.1")]
    assert vfs == ["0000:31:00.2", VF1]
    assert [a for a, d in devices.items() if d["driver"] == "vfio-pci"] == [VF1]
    assert got.allocations[0].vf.vf_address == VF1


def mdev_created(root: Path, got: placement_pb2.Placement) -> None:
    assert snapshot(root)["mdevs"] == {UUID_A: "nvidia-63"}


def mig_created(root: Path, got: placement_pb2.Placement) -> None:
    [gi] = gpu_instances(root)
    assert (gi["profile_id"], gi["start"], gi["size"]) == (THREE_G, 4, 4)
    [ci] = gi["cis"]
    assert got.allocations[0].mig.mig_uuid == ci["uuid"]


def whole_group() -> placement_pb2.ClaimAllocation:
    return placement_pb2.ClaimAllocation(
        claim="nic",
        whole_device=placement_pb2.WholeDeviceSlot(address=E1000[0], group_endpoints=E1000),
        iommu_group=0,
    )


@dataclass(frozen=True)
class Operation:
    """One host operation and the writes it makes.

    Attributes:
        allocation: the placement's one allocation.
        prepare_writes: host writes (sysfs writes and NVML changes) of Prepare.
        unprepare_writes: host writes of Unprepare.
        took_effect: asserts the operation took effect exactly once.
    """

    allocation: Callable[[], placement_pb2.ClaimAllocation]
    prepare_writes: int
    unprepare_writes: int
    took_effect: Callable[[Path, placement_pb2.Placement], None]


OPERATIONS = {
    # Per endpoint: unbind, driver_override, drivers_probe; on the way back
    # unbind, reset, driver_override, drivers_probe.
    "vfio-bind-group": Operation(whole_group, 6, 8, group_bound),
    # Autoprobe off, sriov_numvfs; the VF (unbound) driver_override and
    # drivers_probe. Back: unbind, reset, driver_override; sriov_numvfs 0,
    # autoprobe on.
    "vf-enable-bind": Operation(lambda: vf(1, 2), 4, 5, vf_bound),
    "mdev-create": Operation(lambda: mdev(UUID_A), 1, 1, mdev_created),
    # GPU instance, compute instance; back: compute instance, GPU instance.
    "mig-create": Operation(lambda: mig(THREE_G, 4, 4, "3g.40gb"), 2, 2, mig_created),
}


def request(op: Operation) -> placement_pb2.Placement:
    return placement(PID, op.allocation())


# -- a real agent process ----------------------------------------------------------------------


class AgentProcess:
    """``tessera-agent run --fake-kernel`` on a tree, and a gRPC stub to it.

    Mutual TLS as in production: the agent serves ``agent/virt``, the stub
    calls as a scheduler (the only role the Agent service admits), both
    certified by the workdir's CA (``tls/`` beside the state dir).
    """

    def __init__(self, root: Path, state: Path, crash_after: int | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k not in (CRASH_ENV, "TESSERA_AGENT_ALLOW")}
        if crash_after is not None:
            env[CRASH_ENV] = str(crash_after)
        self._log: IO[bytes] = (state.parent / "agent.log").open("ab")
        state.mkdir(exist_ok=True)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tessera.agent", "run", "--fake-kernel",
             "--sysfs-root", str(root), "--state-dir", str(state), "--host-id", "virt",
             "--scheduler", "127.0.0.1:1", "--listen", "127.0.0.1:0",
             "--tls-dir", str(state.parent / "tls" / "agent")],
            stdout=subprocess.PIPE, stderr=self._log, env=env,
        )  # fmt: skip
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().decode()
        assert "listening on" in line, f"the agent did not start: {line!r}"
        self._channel = sync_channel(
            line.rsplit(" ", 1)[1].strip(),
            TlsDir(state.parent / "tls" / "scheduler"),
            agent_dns_name("virt"),
        )
        self._stub = agent_pb2_grpc.AgentStub(self._channel)

    def prepare(self, want: placement_pb2.Placement) -> placement_pb2.Placement:
        answer = self._stub.Prepare(agent_pb2.PrepareRequest(placement=want), timeout=30)
        return answer.placement

    def unprepare(self, placement_id: str) -> None:
        self._stub.Unprepare(
            agent_pb2.UnprepareRequest(
                placement=placement_pb2.Placement(placement_id=placement_id)
            ),
            timeout=30,
        )

    def expect_killed(self) -> None:
        """It died of SIGKILL (its own, after the N-th write)."""
        assert self._proc.wait(timeout=30) == -signal.SIGKILL
        self.close()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=30)
        assert self._proc.stdout is not None
        self._proc.stdout.close()
        self._channel.close()
        self._log.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A fresh ``virt-2s`` tree (MIG on) at ``host/`` and a state dir beside it."""
    work = Path(tempfile.mkdtemp(prefix="tessera-crash-", dir=SCRATCH or tmp_path))
    build("virt-2s", work / "host")
    nvml = FakeNvml.from_tree(work / "host")
    nvml.nvmlInit()
    nvml.nvmlDeviceSetMigMode(nvml.nvmlDeviceGetHandleByIndex(0), nvml.NVML_DEVICE_MIG_ENABLE)
    nvml.nvmlShutdown()
    create_ca(work / "tls" / "ca")
    issue(work / "tls" / "ca", "agent", "virt", work / "tls" / "agent")
    issue(work / "tls" / "ca", "scheduler", "crash-test", work / "tls" / "scheduler")
    yield work
    shutil.rmtree(work, ignore_errors=True)


def left_clean(work: Path, before: dict[str, Any]) -> None:
    """No orphan: the host as before and nothing recorded."""
    assert snapshot(work / "host") == before
    checkpoint = Checkpoint(work / "state" / "virt.checkpoint.json")
    assert checkpoint.entries() == {}
    assert checkpoint.created() == {}


# -- the cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_each_operation_makes_the_writes_the_crash_cases_cover(name: str, workdir: Path) -> None:
    op = OPERATIONS[name]
    before = snapshot(workdir / "host")
    agent = AgentProcess(workdir / "host", workdir / "state", crash_after=10**6)
    try:
        got = agent.prepare(request(op))
        op.took_effect(workdir / "host", got)
        assert writes_counted(workdir / "host") == op.prepare_writes
        agent.unprepare(PID)
        assert writes_counted(workdir / "host") == op.prepare_writes + op.unprepare_writes
    finally:
        agent.close()
    left_clean(workdir, before)


PREPARE_CASES = [
    pytest.param(name, n, id=f"{name}-after-write-{n}")
    for name, op in sorted(OPERATIONS.items())
    for n in range(1, op.prepare_writes + 1)
]
UNPREPARE_CASES = [
    pytest.param(name, n, id=f"{name}-after-write-{n}")
    for name, op in sorted(OPERATIONS.items())
    for n in range(1, op.unprepare_writes + 1)
]


@pytest.mark.parametrize(("name", "n"), PREPARE_CASES)
def test_a_kill_during_prepare_is_rolled_back_and_a_retry_takes_effect_once(
    name: str, n: int, workdir: Path
) -> None:
    op = OPERATIONS[name]
    host = workdir / "host"
    before = snapshot(host)

    crashing = AgentProcess(host, workdir / "state", crash_after=n)
    with pytest.raises(grpc.RpcError):
        crashing.prepare(request(op))
    crashing.expect_killed()
    assert writes_counted(host) == n

    agent = AgentProcess(host, workdir / "state")
    try:
        assert snapshot(host) == before  # the restart rolled the half-done placement back
        got = agent.prepare(request(op))
        op.took_effect(host, got)
        assert agent.prepare(request(op)) == got
        op.took_effect(host, got)
        agent.unprepare(PID)
    finally:
        agent.close()
    left_clean(workdir, before)


@pytest.mark.parametrize(("name", "n"), UNPREPARE_CASES)
def test_a_kill_during_unprepare_is_finished_by_the_next_unprepare(
    name: str, n: int, workdir: Path
) -> None:
    op = OPERATIONS[name]
    host = workdir / "host"
    before = snapshot(host)

    crashing = AgentProcess(host, workdir / "state", crash_after=op.prepare_writes + n)
    got = crashing.prepare(request(op))
    op.took_effect(host, got)
    with pytest.raises(grpc.RpcError):
        crashing.unprepare(PID)
    crashing.expect_killed()

    agent = AgentProcess(host, workdir / "state")
    try:
        agent.unprepare(PID)
        agent.unprepare(PID)
    finally:
        agent.close()
    left_clean(workdir, before)
