"""Safety invariants of placement, for any allocation state and any request."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.identity import (
    IommuGroupNumber,
    RequestId,
    TenantName,
    iommu_group_slot,
)
from tessera.scheduler.core.plan import Plan, WholeDeviceAssignment
from tessera.scheduler.core.request import Claim, DeviceKind, NumaPolicy, PlacementRequest

from .topologies import dgx, snapshot, workstation


def whole(plan: Plan) -> list[WholeDeviceAssignment]:
    """The plan's assignments, which are all whole devices here."""
    out = [a for a in plan.assignments if isinstance(a, WholeDeviceAssignment)]
    assert len(out) == len(plan.assignments)
    return out


HOSTS = (dgx("dgx"), workstation("ws"))
ALL_GROUPS = {h.host_id: sorted(h.iommu_groups) for h in HOSTS}


@st.composite
def states(draw: st.DrawFn) -> dict[str, list[int]]:
    return {
        host: draw(st.lists(st.sampled_from(groups), unique=True))
        for host, groups in ALL_GROUPS.items()
    }


@settings(max_examples=300, deadline=None)
@given(
    taken=states(),
    counts=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    policy=st.sampled_from(list(NumaPolicy)),
)
def test_no_slot_twice_no_allocated_group_numa_single_never_crosses(
    taken: dict[str, list[int]], counts: list[int], policy: NumaPolicy
) -> None:
    snap = snapshot(*HOSTS, taken=taken)
    claims = tuple(Claim(f"c{i}", DeviceKind.GPU, n) for i, n in enumerate(counts))
    result = Engine().schedule(
        snap, PlacementRequest(RequestId("r"), TenantName("t"), claims, numa_policy=policy)
    )
    if not isinstance(result, Plan):
        return
    state = snap.hosts[result.host_id]
    groups = [a.iommu_group for a in whole(result)]
    # No slot assigned twice, none that was already allocated.
    assert len(groups) == len(set(groups)) == sum(counts)
    assert not {iommu_group_slot(g) for g in groups} & set(state.allocations)
    assert set(result.slots) == {iommu_group_slot(g) for g in groups}
    # A whole group goes to one tenant: every endpoint of it is in the plan.
    for a in whole(result):
        assert a.group_endpoints == state.view.group_endpoints(IommuGroupNumber(a.iommu_group))
        assert a.address in a.group_endpoints
    if policy is NumaPolicy.SINGLE_NUMA_NODE:
        assert len({a.numa_node for a in whole(result)}) == 1
