"""Replicas placing on one cluster split it: each walks its own share of the hosts first.

Two replicas plan on the same state at once and commit optimistically; both
reaching for the host best fit likes most makes one commit conflict. With a
roster (:meth:`Engine.set_peers`) each replica prefers its share, chosen by
rendezvous hashing of replica and host names:

* the shares of a roster partition the hosts, and two replicas alone on an
  empty cluster place on disjoint hosts;
* a replica whose share has no room places on the others' (no capacity is
  lost to the split);
* a replica leaving moves only its own share;
* a replica alone plans exactly as without a roster, and a warm engine whose
  roster changed plans as a fresh one with that roster.
"""

from __future__ import annotations

import random

from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.identity import HostId, PlacementId
from tessera.scheduler.core.plan import Plan
from tessera.scheduler.core.snapshot import ClusterSnapshot, with_reservation
from tests.scheduler.core.test_engine_incremental import _clones, _request, outcome
from tests.scheduler.core.topologies import dgx, workstation

A, B, C = "replica-a", "replica-b", "replica-c"


def cluster(n: int = 12) -> ClusterSnapshot:
    """``n`` DGX and ``n`` workstation hosts, empty."""
    rng = random.Random(3)
    return ClusterSnapshot(
        hosts={**_clones(dgx(), "dgx-", n, rng), **_clones(workstation(), "ws-", n, rng)}
    )


def replica(name: str, *peers: str) -> Engine:
    """An engine placing as ``name`` beside ``peers``."""
    engine = Engine(affinity=name)
    engine.set_peers({name, *peers})
    return engine


def place_all(engine: Engine, snap: ClusterSnapshot, n: int, seed: int = 1) -> list[Plan | None]:
    """Place ``n`` requests one after the other (kept); None for each refusal."""
    rng = random.Random(seed)
    out: list[Plan | None] = []
    for i in range(n):
        request = _request(i, rng)
        plan = engine.schedule(snap, request)
        if isinstance(plan, Plan):
            snap = with_reservation(
                snap, plan.host_id, plan.slots, PlacementId(f"p{i}"), request.tenant
            )
            out.append(plan)
        else:
            out.append(None)
    return out


def test_the_shares_of_a_roster_partition_the_hosts() -> None:
    hosts = sorted(cluster().hosts)
    engines = [replica(name, A, B, C) for name in (A, B, C)]
    owners = {h: [e.affinity for e in engines if e.in_share(h)] for h in hosts}
    assert all(len(names) == 1 for names in owners.values()), owners
    # Every replica gets some of 24 hosts (a fixed hash: not left to chance).
    assert {names[0] for names in owners.values()} == {A, B, C}


def test_two_replicas_alone_on_an_empty_cluster_place_on_disjoint_hosts() -> None:
    snap = cluster()
    a = {p.host_id for p in place_all(replica(A, B), snap, 12) if p is not None}
    b = {p.host_id for p in place_all(replica(B, A), snap, 12) if p is not None}
    assert a and b
    assert not a & b
    assert all(replica(A, B).in_share(h) for h in a)


def test_a_replica_whose_share_is_full_places_on_the_others() -> None:
    snap = cluster(4)
    alone = place_all(Engine(affinity=A), snap, 300)
    shared = place_all(replica(A, B), snap, 300)
    # Nothing is lost to the split: as many placements, on both shares.
    assert sum(p is not None for p in shared) == sum(p is not None for p in alone)
    used = {p.host_id for p in shared if p is not None}
    engine = replica(A, B)
    assert any(engine.in_share(h) for h in used)
    assert any(not engine.in_share(h) for h in used)


def test_a_replica_leaving_moves_only_its_own_share() -> None:
    hosts = sorted(cluster().hosts)
    three = replica(A, B, C)
    two = replica(A, B)
    before = {h for h in hosts if three.in_share(h)}
    after = {h for h in hosts if two.in_share(h)}
    assert before <= after
    # What A gained was C's, never B's.
    c = replica(C, A, B)
    assert all(c.in_share(h) for h in after - before)


def test_a_replica_alone_plans_as_without_a_roster() -> None:
    snap = cluster()
    without = place_all(Engine(affinity=A), snap, 150, seed=4)
    alone = place_all(replica(A), snap, 150, seed=4)
    assert without == alone


def test_a_warm_engine_whose_roster_changed_plans_as_a_fresh_one() -> None:
    rng = random.Random(9)
    snap = cluster(6)
    warm = replica(A, B)
    rosters = [{A, B}, {A, B, C}, {A}, {A, C}, {A, B}]
    for i in range(200):
        if i % 40 == 0:
            warm.set_peers(rosters[i // 40])
        request = _request(i, rng)
        fresh = replica(A, *rosters[i // 40])
        expected = fresh.schedule(snap, request)
        assert outcome(warm.schedule(snap, request)) == outcome(expected), i
        if isinstance(expected, Plan):
            snap = with_reservation(
                snap, expected.host_id, expected.slots, PlacementId(f"p{i}"), request.tenant
            )


def test_without_an_affinity_every_host_is_the_engines() -> None:
    engine = Engine()
    engine.set_peers({A, B})
    assert all(engine.in_share(HostId(h)) for h in cluster().hosts)
