"""Engine faults a review found, pinned: each test failed before its fix."""

from __future__ import annotations

from dataclasses import replace

from tessera.scheduler.core.engine.batch import BatchSettings, solve_batch
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.host import HostView
from tessera.scheduler.core.identity import HostId, PlacementId, RequestId, TenantName
from tessera.scheduler.core.plan import Plan, Unschedulable
from tessera.scheduler.core.request import (
    Claim,
    DeviceForm,
    DeviceKind,
    ExclusivityDomain,
    Isolation,
    PlacementRequest,
)
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState

from .checker_topologies import MDEV_SINGLE, VF_0, mixed
from .topologies import dgx

SOLVE = BatchSettings(workers=1, time_limit_s=5)


def gpu(
    rid: str, tenant: str, exclusivity: ExclusivityDomain = ExclusivityDomain.NONE
) -> PlacementRequest:
    return PlacementRequest(
        RequestId(rid), TenantName(tenant), (Claim("gpu", DeviceKind.GPU, 1),),
        exclusivity=exclusivity,
    )  # fmt: skip


def test_a_planned_state_never_answers_for_the_real_state_of_the_same_generation() -> None:
    view = dgx("h1")
    at7 = ClusterSnapshot(hosts={view.host_id: HostState(view, 7)})
    engine = Engine()  # long-lived, as the coordinator's
    # A batch plans two placements of tenant A: hypothetical states at 8 and 9.
    solve_batch(engine, at7, [gpu("r1", "A"), gpu("r2", "A")], BatchSettings(use_solver=False))
    # Meanwhile tenant B took the host exclusively: the store is at 8 too.
    q = Engine().schedule(at7, gpu("q", "B", ExclusivityDomain.HOST))
    assert isinstance(q, Plan)
    real8 = HostState(
        view, 8, allocations={s: PlacementId("pl-q") for s in q.slots},
        tenants={PlacementId("pl-q"): TenantName("B")},
    )  # fmt: skip
    again = engine.schedule(ClusterSnapshot(hosts={view.host_id: real8}), gpu("r1", "A"))
    assert isinstance(again, Unschedulable)
    assert "exclusivity/domain-held-exclusively" in again.summary


def vf_claim() -> Claim:
    return Claim("nic", DeviceKind.NIC, 1, frozenset({DeviceForm.VF}),
                 min_isolation=Isolation.SHARED, migratable=True)  # fmt: skip


def test_a_batch_counts_only_the_vfs_the_host_does_not_use() -> None:
    view = mixed("h")
    vf0 = view.functions[VF_0]
    view = replace(view, functions={**view.functions, VF_0: replace(vf0, host_use="mgmt link")})
    snap = ClusterSnapshot(hosts={view.host_id: HostState(view, 0)})
    requests = [PlacementRequest(RequestId(r), TenantName("A"), (vf_claim(),)) for r in "ab"]
    result = solve_batch(Engine(), snap, requests, SOLVE)  # crashed in concretization before
    assert len(result.plans) == 1 and len(result.unplaced) == 1


def test_a_batch_keeps_one_mdev_type_on_a_single_type_parent() -> None:
    view = mixed("h")
    view = replace(
        view, mdev_parents={MDEV_SINGLE: replace(view.mdev_parents[MDEV_SINGLE], live={})}
    )
    snap = ClusterSnapshot(hosts={view.host_id: HostState(view, 0)})
    requests = [
        PlacementRequest(
            RequestId(rid), TenantName("A"),
            (Claim("vgpu", DeviceKind.GPU, 1, frozenset({DeviceForm.MDEV}),
                   mdev_types=frozenset({mdev_type}), min_isolation=Isolation.SHARED),),
        )
        for rid, mdev_type in (("a", "nvidia-1"), ("b", "nvidia-2"))
    ]  # fmt: skip
    result = solve_batch(Engine(), snap, requests, SOLVE)
    types = {
        a.type_id for p in result.plans.values() for a in p.assignments if hasattr(a, "type_id")
    }
    assert len(types) <= 1


def test_requests_on_identical_hosts_spread_over_the_tied_ones_and_each_choice_is_stable() -> None:
    """Concurrent replicas plan different requests on one snapshot: ties must not all
    name the same host, or every commit but one loses the race."""
    snapshot = ClusterSnapshot(
        hosts={HostId(f"h{i}"): HostState(dgx(f"h{i}"), 0) for i in range(4)}
    )
    engine = Engine()
    chosen = {}
    for i in range(16):
        plan = engine.schedule(snapshot, gpu(f"r{i}", "A"))
        assert isinstance(plan, Plan)
        chosen[f"r{i}"] = plan.host_id
    assert len(set(chosen.values())) > 1, chosen
    # A pure function of snapshot and request: a fresh engine answers the same.
    again = Engine()
    for rid, host in chosen.items():
        plan = again.schedule(snapshot, gpu(rid, "A"))
        assert isinstance(plan, Plan) and plan.host_id == host


def _vgpu(rid: str) -> PlacementRequest:
    return PlacementRequest(
        RequestId(rid), TenantName("A"),
        (Claim("vgpu", DeviceKind.GPU, 1, frozenset({DeviceForm.MDEV}),
               min_isolation=Isolation.SHARED),),
    )  # fmt: skip


def _mdev_full(view: HostView) -> HostView:
    """The host with no room left for any mdev on its parents."""
    parents = {
        address: replace(
            parent, types={t: replace(v, available=0) for t, v in parent.types.items()}
        )
        for address, parent in view.mdev_parents.items()
    }
    return replace(view, mdev_parents=parents)


def test_a_vgpu_request_meets_a_host_with_room_before_hosts_whose_parents_are_full() -> None:
    """Best fit ranks hosts by idle GPUs, and a host whose mdev parents are full has
    as few as one with room: each vGPU request judged every full host first (on a
    filled 10,000-host fleet, 1,300 hosts a request)."""
    full = {HostId(f"a{i}"): HostState(_mdev_full(mixed(f"a{i}")), 0) for i in range(8)}
    snapshot = ClusterSnapshot(hosts={**full, HostId("z"): HostState(mixed("z"), 0)})
    engine = Engine()
    found, seen = engine.candidates(snapshot, _vgpu("r"), 1)
    assert [f.state.view.host_id for f in found] == ["z"]
    # Only the host with room was judged: it says what it said alone.
    alone = ClusterSnapshot(hosts={HostId("z"): snapshot.hosts[HostId("z")]})
    assert seen.as_tuple() == Engine().candidates(alone, _vgpu("r"), 1)[1].as_tuple()
    assert DeviceForm.MDEV in engine.open_forms(snapshot.hosts[HostId("z")])[DeviceKind.GPU]
    assert DeviceForm.MDEV not in engine.open_forms(full[HostId("a0")])[DeviceKind.GPU]
    # Explain still fits every host and says why each full one cannot.
    plan = engine.schedule(snapshot, _vgpu("r2"), explain=True)
    assert isinstance(plan, Plan) and plan.host_id == "z"
    refused = engine.schedule(ClusterSnapshot(hosts=full), _vgpu("r3"), explain=True)
    assert isinstance(refused, Unschedulable)
    assert "capacity/no-mdev-instance-free" in refused.summary
