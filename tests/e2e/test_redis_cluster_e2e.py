"""A scheduler process on a Redis Cluster of three primaries: start, register, place, release.

The operator's form, ``REDIS_URL=redis+cluster://HOST:PORT``, end to end: the
scheduler connects with a cluster client, checks every primary's durability,
watches the store's health, and a real agent on a fake GPU workstation
registers, gets a placement carried out (vfio-pci bound) and released, over
mutual TLS. Two replicas share the cluster, each following the change feed.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tessera.scheduler.local_cluster import LocalCluster
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

from ..store.valkey_cluster import valkey_cluster

GPU = placement_pb2.PlacementRequest(
    request_id="on-a-cluster",
    tenant="acme",
    claims=[placement_pb2.Claim(name="gpu", kind=placement_pb2.DEVICE_KIND_GPU, count=1)],
)


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, list[str]]]:
    with (
        valkey_cluster(tmp_path_factory.mktemp("valkey-3")) as ports,
        LocalCluster(tmp_path_factory.mktemp("on-cluster")) as c,
    ):
        c.redis_url = f"redis+cluster://127.0.0.1:{ports[1]}"
        addresses = [c.start_scheduler(f"scheduler-{i}") for i in range(2)]
        c.start_agent("ws", c.build_fake_host("gpu-workstation", "ws"))
        c.wait_for_hosts({"ws"})
        yield c, addresses


def test_two_replicas_on_a_three_primary_cluster_place_and_release(
    cluster: tuple[LocalCluster, list[str]],
) -> None:
    c, addresses = cluster
    first, second = (scheduler_pb2_grpc.SchedulerStub(c.channel(a)) for a in addresses)
    placed = first.Place(scheduler_pb2.PlaceRequest(request=GPU), timeout=30).placement
    assert placed.state == placement_pb2.PLACEMENT_STATE_READY
    # The other replica follows the feed: another GPU request never gets the same device.
    other = placement_pb2.PlacementRequest()
    other.CopyFrom(GPU)
    other.request_id = "on-a-cluster-2"
    try:
        more = second.Place(scheduler_pb2.PlaceRequest(request=other), timeout=30).placement
        groups = {a.iommu_group for a in placed.allocations}
        assert groups.isdisjoint(a.iommu_group for a in more.allocations)
        second.Release(scheduler_pb2.ReleaseRequest(placement_id=more.placement_id), timeout=30)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    second.Release(scheduler_pb2.ReleaseRequest(placement_id=placed.placement_id), timeout=30)
    hosts = first.ListHosts(scheduler_pb2.ListHostsRequest(), timeout=30).hosts
    assert [h.host_id for h in hosts] == ["ws"] and hosts[0].allocated_groups == 0
