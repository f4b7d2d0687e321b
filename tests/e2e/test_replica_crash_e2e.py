"""A scheduler replica killed with SIGKILL mid-placement.

Clients place (and release some) through two scheduler replicas; mid-run one
replica is killed outright, with calls in flight: some of its placements are
committed PENDING with the agent part way through Prepare, some releases are
RELEASING. The surviving replica goes on serving, and its housekeeper (which
takes the reaper lease once the dead replica's runs out, with a larger fencing
token) tears the stranded work down. Every placement a client got READY for,
from either replica, must still be in the store, and within 30 s of the kill
the independent auditor must find store and hosts clean with nothing left
PENDING or RELEASING.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tessera.scheduler.local_cluster import LocalCluster
from tessera.v1 import scheduler_pb2, scheduler_pb2_grpc

from .auditor import audit, read_store
from .test_store_crash_e2e import CONVERGE_S, HOSTS, SCHEDULER_FLAGS, Clients, wait_clean


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, list[str]]]:
    with LocalCluster(tmp_path_factory.mktemp("replica")) as c:
        c.start_valkey(appendfsync="always")
        addresses = [c.start_scheduler(f"scheduler-{i}", *SCHEDULER_FLAGS) for i in range(2)]
        for host_id, fixture in HOSTS.items():
            c.start_agent(host_id, c.build_fake_host(fixture, host_id))
        c.wait_for_hosts(set(HOSTS))
        yield c, addresses


@pytest.mark.timeout(240)
def test_a_replica_killed_mid_placement_loses_nothing_acknowledged_and_the_cluster_converges(
    cluster: tuple[LocalCluster, list[str]],
) -> None:
    c, addresses = cluster
    roots: dict[str, Path] = {h: c.workdir / "hosts" / h for h in HOSTS}
    clients = Clients([c.channel(a) for a in addresses])
    clients.start()
    try:
        time.sleep(5)  # load on both replicas
        killed_at = time.monotonic()
        c.kill("scheduler-0")
        # Releases the dead replica was carrying may or may not have happened.
        clients.allow_release.clear()
        time.sleep(3)  # the survivor alone serves (calls to the dead one fail)
    finally:
        clients.join()
    survive = clients.must_survive(killed_at)
    assert survive, "no placement was acknowledged before the kill: the test proves nothing"
    assert clients.codes["place/OK"] > 0

    report, took = wait_clean(c, roots, clients.held(), CONVERGE_S)
    assert report.clean, report.text()
    assert not report.states.get("pending") and not report.states.get("releasing")
    assert took <= CONVERGE_S
    stored = read_store_ids(c)
    lost = survive - stored
    assert not lost, f"acknowledged placements lost with the replica: {sorted(lost)}"

    # Everything released through the survivor: nothing may be left anywhere.
    with c.channel(addresses[1]) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for pid in sorted(stored):
            stub.Release(scheduler_pb2.ReleaseRequest(placement_id=pid), timeout=30)
    final = audit(c.redis_url, roots, check_hosts=True, final=True)
    assert final.clean, final.text()


def read_store_ids(c: LocalCluster) -> set[str]:
    """Placement ids the store holds now."""
    client = redis.Redis.from_url(c.redis_url)
    try:
        return read_store(client).placement_ids()
    finally:
        client.close()
