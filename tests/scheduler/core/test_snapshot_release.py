"""with_release: the snapshot after a placement goes, as the store would record it."""

from __future__ import annotations

import pytest

from scheduler.core.host import HostView
from scheduler.core.identity import HostId, PlacementId, SlotKey, TenantName
from scheduler.core.snapshot import ClusterSnapshot, HostState, with_release, with_reservation

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
