"""VFs, mdevs and MIG instances end to end: scheduler, agent and fake host as processes.

One virtualization host (virt-2s) whose A100 the operator put in MIG mode
before the agent started. Each test places a sliced form over gRPC, reads the
fake host (sysfs tree, fake driver state) to see it carried out, and releases.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tessera.scheduler.local_cluster import LocalCluster
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

HOST = "virt"
A100 = "0000:4b:00.0"
P4 = "0000:b1:00.0"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("sliced")) as c:
        c.start_valkey()
        c.start_scheduler()
        c.start_agent(HOST, c.build_fake_host("virt-2s", HOST, mig=(A100,)))
        c.wait_for_hosts({HOST})
        yield c


@pytest.fixture
def stub(cluster: LocalCluster) -> scheduler_pb2_grpc.SchedulerStub:
    return cluster.stub()


@pytest.fixture
def root(cluster: LocalCluster) -> Path:
    return cluster.workdir / "hosts" / HOST


def request(
    request_id: str, claim: placement_pb2.Claim, tenant: str = "acme"
) -> placement_pb2.PlacementRequest:
    return placement_pb2.PlacementRequest(request_id=request_id, tenant=tenant, claims=[claim])


def place(
    stub: scheduler_pb2_grpc.SchedulerStub, req: placement_pb2.PlacementRequest
) -> placement_pb2.Placement:
    return stub.Place(scheduler_pb2.PlaceRequest(request=req), timeout=60).placement


def release(stub: scheduler_pb2_grpc.SchedulerStub, placement: placement_pb2.Placement) -> None:
    stub.Release(scheduler_pb2.ReleaseRequest(placement_id=placement.placement_id), timeout=60)


def sysfs(root: Path, *parts: str) -> Path:
    return root.joinpath("sys", *parts)


def driver_of(root: Path, address: str) -> str | None:
    link = sysfs(root, "bus", "pci", "devices", address, "driver")
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def gpu_instances(root: Path) -> list[dict[str, Any]]:
    """GPU instances the fake driver holds on the A100."""
    state = json.loads((root / ".tessera-fake-nvml.json").read_text())
    (gpu,) = [g for g in state["gpus"] if g["bus_id"].endswith("4B:00.0")]
    return list(gpu["instances"])


def test_vfs_are_enabled_bound_to_vfio_and_torn_down(
    stub: scheduler_pb2_grpc.SchedulerStub, root: Path
) -> None:
    claim = placement_pb2.Claim(
        name="vf", kind=placement_pb2.DEVICE_KIND_NIC, count=2,
        forms=[placement_pb2.DEVICE_FORM_VF], min_isolation=placement_pb2.ISOLATION_SHARED,
    )  # fmt: skip
    placed = place(stub, request("vf-1", claim))
    assert placed.state == placement_pb2.PLACEMENT_STATE_READY
    pf = placed.allocations[0].vf.pf_address
    numvfs = sysfs(root, "bus", "pci", "devices", pf, "sriov_numvfs")
    assert int(numvfs.read_text()) == placed.allocations[0].vf.num_vfs > 0
    for a in placed.allocations:
        assert a.vf.vf_address and a.vfio_path == f"/dev/vfio/{a.iommu_group}"
        assert driver_of(root, a.vf.vf_address) == "vfio-pci"
        assert (root / "dev" / "vfio" / str(a.iommu_group)).exists()
    release(stub, placed)
    # The agent enabled the VFs, and nobody else uses them: it turns them off.
    assert int(numvfs.read_text()) == 0


def test_a_migratable_vf_is_created_on_the_migration_driver_its_pf_reported(
    stub: scheduler_pb2_grpc.SchedulerStub, root: Path
) -> None:
    # No PF has VFs: the scheduler places on what the CX-6 Dx PF said of the
    # VFs it would create (15b3:101e, mlx5_vfio_pci), and the agent binds that.
    claim = placement_pb2.Claim(
        name="vf", kind=placement_pb2.DEVICE_KIND_NIC, count=1,
        forms=[placement_pb2.DEVICE_FORM_VF], min_isolation=placement_pb2.ISOLATION_SHARED,
        migratable=True,
    )  # fmt: skip
    placed = place(stub, request("vf-migratable", claim))
    assert placed.state == placement_pb2.PLACEMENT_STATE_READY
    (a,) = placed.allocations
    assert a.vf.vfio_driver == "mlx5_vfio_pci"
    assert driver_of(root, a.vf.vf_address) == "mlx5_vfio_pci"
    release(stub, placed)
    numvfs = sysfs(root, "bus", "pci", "devices", a.vf.pf_address, "sriov_numvfs")
    assert int(numvfs.read_text()) == 0


def test_an_mdev_is_created_under_the_scheduler_chosen_uuid_and_removed(
    stub: scheduler_pb2_grpc.SchedulerStub, root: Path
) -> None:
    claim = placement_pb2.Claim(
        name="vgpu", kind=placement_pb2.DEVICE_KIND_GPU, count=1,
        forms=[placement_pb2.DEVICE_FORM_MDEV], mdev_types=["nvidia-63"],
        min_isolation=placement_pb2.ISOLATION_SHARED,
    )  # fmt: skip
    placed = place(stub, request("mdev-1", claim))
    (a,) = placed.allocations
    assert a.mdev.parent_address == P4
    device = sysfs(root, "bus", "mdev", "devices", a.mdev.uuid)
    assert device.exists()
    assert os.path.basename(os.readlink(device / "mdev_type")) == a.mdev.type_id
    assert a.vfio_path == f"/dev/vfio/{a.iommu_group}"
    release(stub, placed)
    assert not device.exists()


def test_mig_instances_go_where_the_scheduler_says_and_the_gpu_is_then_partitioned_only(
    stub: scheduler_pb2_grpc.SchedulerStub, root: Path
) -> None:
    claim = placement_pb2.Claim(
        name="slice", kind=placement_pb2.DEVICE_KIND_GPU, count=1,
        forms=[placement_pb2.DEVICE_FORM_MIG], mig_profiles=["3g.40gb"],
        min_isolation=placement_pb2.ISOLATION_PARTITIONED,
    )  # fmt: skip
    (before,) = stub.ListHosts(scheduler_pb2.ListHostsRequest()).hosts[0].mig
    assert before.free["3g.40gb"] == 2 and before.free["7g.80gb"] == 1
    first = place(stub, request("mig-1", claim))
    (a,) = first.allocations
    assert a.mig.gpu_address == A100 and a.mig.mig_uuid.startswith("MIG-")
    held = [(g["start"], g["size"], g["profile_id"]) for g in gpu_instances(root)]
    assert held == [(a.mig.placement.start, a.mig.placement.size, a.mig.profile_id)]
    second = place(stub, request("mig-2", claim))
    assert {
        first.allocations[0].mig.placement.start,
        second.allocations[0].mig.placement.start,
    } == {
        0,
        4,
    }
    # Operators see what the GPU can still take: no more 3g, no 7g.
    (host,) = stub.ListHosts(scheduler_pb2.ListHostsRequest()).hosts
    (mig,) = host.mig
    assert mig.gpu_address == A100
    assert mig.free["3g.40gb"] == 0 and mig.free["7g.80gb"] == 0
    # Two 3g.40gb fill the GPU: a third is refused, and Explain says why.
    explained = stub.Explain(scheduler_pb2.ExplainRequest(request=request("mig-3", claim)))
    assert not explained.placeable
    assert any(v.plugin == "capacity" for v in explained.verdicts)
    # A GPU with partitions is never handed over whole.
    whole = placement_pb2.Claim(
        name="gpu", kind=placement_pb2.DEVICE_KIND_GPU, count=1,
        selector=placement_pb2.DeviceSelector(models=["NVIDIA A100 80GB PCIe"]),
    )  # fmt: skip
    with pytest.raises(grpc.RpcError) as refused:
        place(stub, request("whole-a100", whole, tenant="other"))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "device-in-other-mode" in (refused.value.details() or "")
    release(stub, first)
    release(stub, second)
    assert gpu_instances(root) == []
