"""Unprepare resets a device between the tenant's VFIO driver and the host's driver.

On ``virt-2s`` (see ``test_service_slots``): the A100 at 4b:00.0 (group 5,
reset method ``bus``) and the CX-6 Dx PF 31:00.0 whose VFs have ``flr``.
Every sysfs write goes through a recording wrapper around the kernel emulator.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tessera.agent.checkpoint import Checkpoint
from tessera.agent.nvml import NullNvmlClient
from tessera.agent.reporter import HostReporter
from tessera.agent.service import AgentServicer
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.hosts import build
from tessera.agent.testing.kernel import KernelEmulator

from ..conftest import Runner
from .agentclient import AgentClient
from .test_service_slots import A100, PF, VF1, driver, placement, vf, whole


class Recorder:
    """The kernel, with every write recorded as ``(device, attribute)``.

    ``fail_reset`` makes writes to ``reset`` fail with EIO, as a device that
    does not come back from its reset would.
    """

    def __init__(self, kernel: KernelEmulator) -> None:
        self._kernel = kernel
        self.writes: list[tuple[str, str]] = []
        self.fail_reset = False

    def write(self, path: Path, data: str) -> None:
        if path.name == "reset" and self.fail_reset:
            raise OSError(errno.EIO, "Input/output error", str(path))
        self._kernel.write(path, data)
        target = data.strip() if path.name in ("unbind", "drivers_probe", "bind") else ""
        self.writes.append((target or path.parent.name, path.name))


@pytest.fixture
def kernel(tmp_path: Path) -> Recorder:
    root = tmp_path / "virt"
    build("virt-2s", root)
    return Recorder(KernelEmulator(root))


@pytest.fixture
def host(tmp_path: Path, kernel: Recorder) -> Sysfs:
    return Sysfs(tmp_path / "virt", kernel)


@pytest.fixture
def agent(host: Sysfs, tmp_path: Path, arun: Runner) -> Iterator[AgentClient]:
    reporter = HostReporter(host, NullNvmlClient(), host_id="virt", boot_id="b", labels={})
    client = AgentClient(arun, AgentServicer(host, reporter, Checkpoint(tmp_path / "cp.json")))
    yield client
    client.close()


def test_a_whole_device_is_reset_after_leaving_vfio_and_before_its_driver_probes(
    agent: AgentClient, kernel: Recorder, host: Sysfs
) -> None:
    agent.prepare(placement("pl", whole(A100, 5)))
    assert ("0000:4b:00.0", "reset") not in kernel.writes  # never on the way in
    kernel.writes.clear()

    agent.unprepare("pl")

    assert kernel.writes == [
        (A100, "unbind"),
        (A100, "reset"),
        (A100, "driver_override"),
        (A100, "drivers_probe"),
    ]
    assert driver(host, A100) == "nvidia"


def test_a_vf_is_reset_before_its_pfs_vfs_go(
    agent: AgentClient, kernel: Recorder, host: Sysfs
) -> None:
    agent.prepare(placement("pl", vf(1)))
    kernel.writes.clear()

    agent.unprepare("pl")

    assert kernel.writes[:2] == [(VF1, "unbind"), (VF1, "reset")]
    assert (PF, "sriov_numvfs") in kernel.writes[2:]


def test_a_device_without_a_reset_method_is_not_reset(
    agent: AgentClient, kernel: Recorder, host: Sysfs
) -> None:
    host.write(host.path("bus", "pci", "devices", A100, "reset_method"), "\n")
    agent.prepare(placement("pl", whole(A100, 5)))
    kernel.writes.clear()

    agent.unprepare("pl")

    assert [w for w in kernel.writes if w[1] == "reset"] == []
    assert driver(host, A100) == "nvidia"


def test_a_failed_reset_fails_the_unprepare_and_a_retry_resets_and_restores(
    agent: AgentClient, kernel: Recorder, host: Sysfs, tmp_path: Path
) -> None:
    agent.prepare(placement("pl", whole(A100, 5)))
    kernel.fail_reset = True

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        agent.unprepare("pl")

    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert "reset" in (failed.value.details() or "")
    # Off vfio-pci, never back on the host's driver unreset; still recorded.
    assert driver(host, A100) is None
    assert list(Checkpoint(tmp_path / "cp.json").entries()) == ["pl"]

    kernel.fail_reset = False
    kernel.writes.clear()
    agent.unprepare("pl")

    assert (A100, "reset") in kernel.writes
    assert driver(host, A100) == "nvidia"
    assert Checkpoint(tmp_path / "cp.json").entries() == {}


def test_a_rolled_back_prepare_does_not_reset(
    agent: AgentClient, kernel: Recorder, host: Sysfs
) -> None:
    # VF 1 is not 31:00.4: the VF step is rolled back after its bind.
    code, _ = agent.refusal(placement("pl", vf(1, vf_address="0000:31:00.4")))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert [w for w in kernel.writes if w[1] == "reset"] == []
