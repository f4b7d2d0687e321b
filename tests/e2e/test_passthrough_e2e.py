"""One placement end to end: separate scheduler and agent processes, real gRPC,
the embedded Valkey, and fake host trees driven through the kernel emulator.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tessera.scheduler.local_cluster import LocalCluster
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

#: host id -> fixture. Each test targets its own host by label, so tests do
#: not see each other's allocations.
HOSTS = {"ws-pass": "gpu-workstation", "ws-race": "gpu-workstation", "virt": "virt-2s"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as c:
        c.start_valkey()
        c.start_scheduler()
        for host_id, fixture in HOSTS.items():
            c.start_agent(host_id, c.build_fake_host(fixture, host_id), {"name": host_id})
        c.wait_for_hosts(set(HOSTS))
        yield c


@pytest.fixture
def stub(cluster: LocalCluster) -> scheduler_pb2_grpc.SchedulerStub:
    return cluster.stub()


def gpu_request(request_id: str, host: str, **claim: object) -> placement_pb2.PlacementRequest:
    fields: dict[str, object] = {
        "name": "gpu",
        "kind": placement_pb2.DEVICE_KIND_GPU,
        "count": 1,
        "forms": [placement_pb2.DEVICE_FORM_WHOLE_DEVICE],
    }
    fields.update(claim)
    return placement_pb2.PlacementRequest(
        request_id=request_id,
        tenant="acme",
        claims=[placement_pb2.Claim(**fields)],  # type: ignore[arg-type]
        host_selector={"name": host},
    )


def place(
    stub: scheduler_pb2_grpc.SchedulerStub, req: placement_pb2.PlacementRequest
) -> placement_pb2.Placement:
    return stub.Place(scheduler_pb2.PlaceRequest(request=req), timeout=60).placement


def driver_of(root: Path, address: str) -> str | None:
    link = root / "sys" / "bus" / "pci" / "devices" / address / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def test_a_multi_endpoint_group_is_bound_whole_and_restored_on_release(
    cluster: LocalCluster, stub: scheduler_pb2_grpc.SchedulerStub
) -> None:
    root = cluster.workdir / "hosts" / "ws-pass"
    placement = place(stub, gpu_request("pass-1", "ws-pass"))
    assert placement.state == placement_pb2.PLACEMENT_STATE_READY
    (alloc,) = placement.allocations
    endpoints = list(alloc.whole_device.group_endpoints)
    assert len(endpoints) > 1, "the workstation GPU shares its group with its audio function"
    assert alloc.vfio_path == f"/dev/vfio/{alloc.iommu_group}"
    assert (root / "dev" / "vfio" / str(alloc.iommu_group)).exists()
    original = {
        "0000:01:00.0": "nvidia",
        "0000:01:00.1": "snd_hda_intel",
        "0000:02:00.0": "nvidia",
        "0000:02:00.1": "snd_hda_intel",
    }
    for endpoint in endpoints:
        assert driver_of(root, endpoint) == "vfio-pci"
        group_link = root / "sys" / "bus" / "pci" / "devices" / endpoint / "iommu_group"
        assert os.path.basename(os.readlink(group_link)) == str(alloc.iommu_group)

    stub.Release(scheduler_pb2.ReleaseRequest(placement_id=placement.placement_id), timeout=60)
    for endpoint in endpoints:
        assert driver_of(root, endpoint) == original[endpoint]
        override = root / "sys" / "bus" / "pci" / "devices" / endpoint / "driver_override"
        assert override.read_text() == "(null)\n"
    assert not (root / "dev" / "vfio" / str(alloc.iommu_group)).exists()
    with pytest.raises(grpc.RpcError) as err:
        stub.GetPlacement(scheduler_pb2.GetPlacementRequest(placement_id=placement.placement_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_two_concurrent_places_for_the_last_gpu_one_wins(
    stub: scheduler_pb2_grpc.SchedulerStub,
) -> None:
    first = place(stub, gpu_request("race-0", "ws-race"))
    assert first.state == placement_pb2.PLACEMENT_STATE_READY
    results: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def racer(rid: str) -> None:
        barrier.wait()
        try:
            results[rid] = place(stub, gpu_request(rid, "ws-race"))
        except grpc.RpcError as e:
            results[rid] = e

    threads = [threading.Thread(target=racer, args=(f"race-{i}",)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results.values() if isinstance(r, placement_pb2.Placement)]
    lost = [r for r in results.values() if isinstance(r, grpc.RpcError)]
    assert len(won) == 1 and len(lost) == 1
    assert lost[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "iommu-group-allocated" in (lost[0].details() or "")
    assert won[0].allocations[0].iommu_group != first.allocations[0].iommu_group
    for p in (first, won[0]):
        stub.Release(scheduler_pb2.ReleaseRequest(placement_id=p.placement_id), timeout=60)


GPU_KIND = placement_pb2.DEVICE_KIND_GPU
GPU_CLAIM = placement_pb2.Claim(name="gpu", kind=GPU_KIND, count=1)


def _store_dump(url: str) -> dict[bytes, bytes | None]:
    client = redis.Redis.from_url(url)
    try:
        return {k: client.dump(k) for k in sorted(client.scan_iter())}
    finally:
        client.close()


@pytest.mark.parametrize(
    ("request_msg", "field"),
    [
        (
            placement_pb2.PlacementRequest(
                request_id="bad-1",
                tenant="",
                claims=[GPU_CLAIM],
            ),
            "tenant",
        ),
        (
            placement_pb2.PlacementRequest(
                request_id="bad-2",
                tenant="acme",
                claims=[placement_pb2.Claim(name="gpu", kind=GPU_KIND, count=0)],
            ),
            "claims[0].count",
        ),
        (
            placement_pb2.PlacementRequest(
                request_id="bad-3",
                tenant="acme",
                claims=[
                    placement_pb2.Claim(
                        name="gpu",
                        kind=placement_pb2.DEVICE_KIND_GPU,
                        count=1,
                        forms=[placement_pb2.DEVICE_FORM_MIG],
                        mig_profiles=["5g.3tb"],
                        min_isolation=placement_pb2.ISOLATION_PARTITIONED,
                    )
                ],
            ),
            "claims[0].mig_profiles[0]",
        ),
    ],
    ids=["empty-tenant", "count-zero", "unknown-mig-profile"],
)
def test_a_malformed_request_names_the_field_and_changes_nothing(
    cluster: LocalCluster,
    stub: scheduler_pb2_grpc.SchedulerStub,
    request_msg: placement_pb2.PlacementRequest,
    field: str,
) -> None:
    before = _store_dump(cluster.redis_url)
    with pytest.raises(grpc.RpcError) as err:
        stub.Place(scheduler_pb2.PlaceRequest(request=request_msg))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(f"{field}:")
    after = _store_dump(cluster.redis_url)
    # Heartbeats refresh the host records (tessera:{sNN}:H:host) meanwhile;
    # nothing else may change: no slot, placement or request index.
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert all(k.endswith(b":host") for k in changed), changed


def test_the_same_request_id_gives_the_same_placement(
    stub: scheduler_pb2_grpc.SchedulerStub,
) -> None:
    req = placement_pb2.PlacementRequest(
        request_id="idem-1",
        tenant="initech",
        claims=[placement_pb2.Claim(name="nic", kind=placement_pb2.DEVICE_KIND_NIC, count=1)],
        host_selector={"name": "virt"},
    )
    first = place(stub, req)
    again = place(stub, req)
    assert again.placement_id == first.placement_id
    assert list(again.allocations) == list(first.allocations)
    listed = stub.ListPlacements(scheduler_pb2.ListPlacementsRequest(tenant="initech")).placements
    assert [p.placement_id for p in listed] == [first.placement_id]
    reused = placement_pb2.PlacementRequest()
    reused.CopyFrom(req)
    reused.claims[0].count = 2  # the same id for another request of the same tenant
    with pytest.raises(grpc.RpcError) as err:
        place(stub, reused)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # Request ids are each tenant's own: another tenant's "idem-1" is its own.
    other = placement_pb2.PlacementRequest()
    other.CopyFrom(req)
    other.tenant = "someone-else"
    theirs = place(stub, other)
    assert theirs.placement_id != first.placement_id
    for tenant in ("initech", "someone-else"):
        stub.Release(scheduler_pb2.ReleaseRequest(request_id="idem-1", tenant=tenant), timeout=60)


def test_explain_says_why_a_migratable_gpu_cannot_be_placed(
    stub: scheduler_pb2_grpc.SchedulerStub,
) -> None:
    answer = stub.Explain(
        scheduler_pb2.ExplainRequest(request=gpu_request("explain-1", "ws-pass", migratable=True))
    )
    assert not answer.placeable
    reasons = [r for v in answer.verdicts for r in v.reasons]
    assert any(r.startswith("passthrough-not-migratable") for r in reasons)
    fits = stub.Explain(scheduler_pb2.ExplainRequest(request=gpu_request("explain-2", "ws-pass")))
    assert fits.placeable and fits.placement.host_id == "ws-pass"


def test_reflection_lists_the_services_and_health_is_serving(cluster: LocalCluster) -> None:
    channel = cluster.channel()
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"tessera.v1.Scheduler", "tessera.v1.Registry", "grpc.health.v1.Health"} <= services
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tessera.v1.Scheduler"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_an_all_or_nothing_batch_places_nothing_when_one_request_cannot_fit(
    cluster: LocalCluster, stub: scheduler_pb2_grpc.SchedulerStub
) -> None:
    root = cluster.workdir / "hosts" / "ws-pass"
    batch = [
        gpu_request("batch-1", "ws-pass"),
        gpu_request("batch-2", "ws-pass"),
        gpu_request("batch-3", "ws-pass", count=3),
    ]
    answer = stub.PlaceBatch(
        scheduler_pb2.PlaceBatchRequest(requests=batch, all_or_nothing=True), timeout=120
    )
    assert list(answer.placements) == []
    assert {u.request_id for u in answer.unplaced} == {"batch-1", "batch-2", "batch-3"}
    assert driver_of(root, "0000:01:00.0") == driver_of(root, "0000:02:00.0") == "nvidia"
    assert not stub.ListPlacements(
        scheduler_pb2.ListPlacementsRequest(host_id="ws-pass")
    ).placements

    partial = stub.PlaceBatch(scheduler_pb2.PlaceBatchRequest(requests=batch), timeout=120)
    assert sorted(p.request_id for p in partial.placements) == ["batch-1", "batch-2"]
    (refused,) = partial.unplaced
    # Solved jointly: batch-3's three GPUs never fit the two-GPU host.
    assert refused.request_id == "batch-3" and "too-few-free-units" in refused.reasons[0]
    for p in partial.placements:
        stub.Release(scheduler_pb2.ReleaseRequest(placement_id=p.placement_id), timeout=60)
