"""A scheduler process on a primary watched by Redis Sentinel, through a failover.

The operator's form, ``REDIS_URL=redis+sentinel://:PASSWORD@HOST:PORT/SERVICE``,
end to end: the scheduler asks the Sentinel for the primary, a real agent on a
fake GPU workstation registers and gets a placement carried out over mutual
TLS. Then the primary is killed outright. The same scheduler process, not
restarted, answers UNAVAILABLE while the Sentinel promotes the replica, then
places again on the new primary, which still holds the first placement (the
replica had it before the kill).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import redis

from tessera.scheduler.local_cluster import LocalCluster
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

from ..store.valkey_sentinel import PASSWORD, SentinelSet, valkey_sentinel

#: How long the failover may take, the Sentinel's detection included.
FAILOVER_S = 40.0


def gpu(request_id: str) -> placement_pb2.PlacementRequest:
    return placement_pb2.PlacementRequest(
        request_id=request_id,
        tenant="acme",
        claims=[placement_pb2.Claim(name="gpu", kind=placement_pb2.DEVICE_KIND_GPU, count=1)],
    )


@pytest.fixture
def on_sentinel(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalCluster, str, SentinelSet]]:
    with (
        valkey_sentinel(tmp_path_factory.mktemp("sentinel")) as servers,
        LocalCluster(tmp_path_factory.mktemp("on-sentinel")) as c,
    ):
        c.redis_url = servers.url()
        address = c.start_scheduler("scheduler")
        c.start_agent("ws", c.build_fake_host("gpu-workstation", "ws"))
        c.wait_for_hosts({"ws"})
        yield c, address, servers


def replicated(servers: SentinelSet) -> bool:
    """Whether the replica has everything the primary wrote so far."""
    primary = redis.Redis(host="127.0.0.1", port=servers.primary, password=PASSWORD)
    replica = redis.Redis(host="127.0.0.1", port=servers.replica, password=PASSWORD)
    try:
        written = int(primary.info("replication")["master_repl_offset"])
        return int(replica.info("replication")["slave_repl_offset"]) >= written
    finally:
        primary.close()
        replica.close()


def test_a_scheduler_places_through_a_failover_without_a_restart(
    on_sentinel: tuple[LocalCluster, str, SentinelSet],
) -> None:
    c, address, servers = on_sentinel
    stub = scheduler_pb2_grpc.SchedulerStub(c.channel(address))
    first = stub.Place(scheduler_pb2.PlaceRequest(request=gpu("before")), timeout=30).placement
    assert first.state == placement_pb2.PLACEMENT_STATE_READY
    deadline = time.monotonic() + 10
    while not replicated(servers):
        assert time.monotonic() < deadline, "the replica never caught up"
        time.sleep(0.05)
    scheduler = c.processes["scheduler"]
    servers.kill(servers.primary)

    unavailable = 0
    deadline = time.monotonic() + FAILOVER_S
    while True:
        try:
            second = stub.Place(scheduler_pb2.PlaceRequest(request=gpu("after")), timeout=10)
            break
        except grpc.RpcError as err:
            # What a frontend sees meanwhile, and retries with the same id.
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            unavailable += 1
            assert time.monotonic() < deadline, f"no failover within {FAILOVER_S} s: {err}"
            time.sleep(0.2)
    assert scheduler.poll() is None  # the same process, never restarted
    assert second.placement.state == placement_pb2.PLACEMENT_STATE_READY
    # The promoted replica held the first placement: no device handed out twice.
    groups = {a.iommu_group for a in first.allocations}
    assert groups.isdisjoint(a.iommu_group for a in second.placement.allocations)
    for placement_id in (first.placement_id, second.placement.placement_id):
        stub.Release(scheduler_pb2.ReleaseRequest(placement_id=placement_id), timeout=30)
    hosts = stub.ListHosts(scheduler_pb2.ListHostsRequest(), timeout=30).hosts
    assert [h.host_id for h in hosts] == ["ws"] and hosts[0].allocated_groups == 0
