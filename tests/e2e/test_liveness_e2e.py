"""Liveness: leases expire on silent hosts, and agents re-register when forgotten."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import redis

from tessera.scheduler.local_cluster import LocalCluster
from tessera.v1 import placement_pb2, scheduler_pb2


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("live")) as c:
        c.start_valkey()
        c.start_scheduler("scheduler", "--heartbeat-interval", "1", "--lease", "2")
        c.start_agent("ws", c.build_fake_host("gpu-workstation", "ws"))
        c.wait_for_hosts({"ws"})
        yield c


def schedulable(c: LocalCluster) -> bool:
    (host,) = c.stub().ListHosts(scheduler_pb2.ListHostsRequest()).hosts
    return host.schedulable


def wait_until(predicate: Callable[[], bool], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


GPU = placement_pb2.PlacementRequest(
    request_id="live-1",
    tenant="acme",
    claims=[placement_pb2.Claim(name="gpu", kind=placement_pb2.DEVICE_KIND_GPU, count=1)],
)


def test_a_silent_host_gets_no_new_placements_until_it_speaks_again(cluster: LocalCluster) -> None:
    agent = cluster.agents["ws"]
    agent.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: not schedulable(cluster))
        with pytest.raises(grpc.RpcError) as err:
            cluster.stub().Place(scheduler_pb2.PlaceRequest(request=GPU), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "lease-expired" in (err.value.details() or "")
    finally:
        agent.send_signal(signal.SIGCONT)
    wait_until(lambda: schedulable(cluster))
    placed = cluster.stub().Place(scheduler_pb2.PlaceRequest(request=GPU), timeout=30)
    assert placed.placement.state == placement_pb2.PLACEMENT_STATE_READY


def test_an_agent_registers_again_when_the_scheduler_forgot_its_host(
    cluster: LocalCluster,
) -> None:
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        client.flushdb()
    finally:
        client.close()
    assert not cluster.stub().ListHosts(scheduler_pb2.ListHostsRequest()).hosts
    cluster.wait_for_hosts({"ws"}, timeout_s=15)
