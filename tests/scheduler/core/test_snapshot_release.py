"""with_release: the snapshot after a placement goes, as the store would record it."""

from __future__ import annotations

import pytest

from tessera.scheduler.core.host import HostView
from tessera.scheduler.core.identity import HostId, PlacementId, SlotKey, TenantName
from tessera.scheduler.core.snapshot import (
    ClusterSnapshot,
    HostState,
    with_release,
    with_reservation,
)

HOST = HostId("h1")


def _snapshot() -> ClusterSnapshot:
    view = HostView(host_id=HOST, functions={}, iommu_groups={})
    return ClusterSnapshot(hosts={HOST: HostState(view, alloc_generation=3)})


def test_release_drops_slots_and_tenant_and_bumps_generation() -> None:
    a, b = PlacementId("pa"), PlacementId("pb")
    snap = with_reservation(
        _snapshot(), HOST, (SlotKey("group:1"), SlotKey("group:2")), a, TenantName("x")
    )
    snap = with_reservation(snap, HOST, (SlotKey("group:3"),), b, TenantName("y"))
    released = with_release(snap, HOST, a)
    state = released.hosts[HOST]
    assert dict(state.allocations) == {SlotKey("group:3"): b}
    assert dict(state.tenants) == {b: TenantName("y")}
    assert state.alloc_generation == snap.hosts[HOST].alloc_generation + 1
    assert state.planned[-1] == PlacementId("released:pa")
    # Pure: the snapshot released from is untouched.
    assert snap.hosts[HOST].allocations[SlotKey("group:1")] == a


def test_release_then_reserve_again_never_repeats_a_state_key() -> None:
    a = PlacementId("pa")
    snap = with_reservation(_snapshot(), HOST, (SlotKey("group:1"),), a, TenantName("x"))
    released = with_release(snap, HOST, a)
    empty = _snapshot().hosts[HOST]
    state = released.hosts[HOST]
    assert not state.allocations
    assert (state.alloc_generation, state.planned) != (empty.alloc_generation, empty.planned)


def test_release_of_an_unknown_placement_is_refused() -> None:
    with pytest.raises(KeyError):
        with_release(_snapshot(), HOST, PlacementId("nope"))


def test_a_long_chain_of_derived_snapshots_reads_as_plain_copies_would() -> None:
    """Derived snapshots share their parent's map (a batch derives thousands in a
    row); each must still read as its own copy, and leave its parents as they were."""
    hosts = [HostId(f"h{i}") for i in range(20)]
    view = {h: HostView(host_id=h, functions={}, iommu_groups={}) for h in hosts}
    start = ClusterSnapshot(hosts={h: HostState(view[h], alloc_generation=0) for h in hosts})
    chain = [start]
    expected = [dict(start.hosts)]
    for i in range(60):  # past the share at which a copy is taken, more than once
        host = hosts[(i * 7) % len(hosts)]
        snap = with_reservation(
            chain[-1], host, (SlotKey(f"group:{i}"),), PlacementId(f"p{i}"), TenantName("t")
        )
        chain.append(snap)
        expected.append({**expected[-1], host: snap.hosts[host]})
    for snap, want in zip(chain, expected, strict=True):
        assert list(snap.hosts) == hosts
        assert len(snap.hosts) == len(hosts)
        assert dict(snap.hosts.items()) == want
        assert all(snap.hosts[h] is want[h] and snap.hosts.get(h) is want[h] for h in hosts)
        assert HostId("absent") not in snap.hosts and snap.hosts.get(HostId("absent")) is None
        with pytest.raises(KeyError):
            snap.hosts[HostId("absent")]
    with pytest.raises(KeyError):
        with_reservation(chain[-1], HostId("absent"), (), PlacementId("x"), TenantName("t"))
    assert chain[-1] == ClusterSnapshot(hosts=expected[-1])
