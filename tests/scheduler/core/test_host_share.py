"""Host CPU and memory beside the devices: asked for, held, counted, guarded, never overcommitted.

A request may ask for host CPU (``cpu_milli``) and memory (``memory_mib``)
beside its devices, as a VM needs vCPUs and RAM beside its GPU. A host
offers what its agent reports (its NUMA nodes' CPUs and memory); a
placement holds its share through one ``host-share`` slot, which the
occupancy sums, the commit guards and the checker re-derives.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.scheduler.core import guards
from tessera.scheduler.core.checker import RULE_CAPACITY, check_placements
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.engine.policies import BestFitPolicy, FirstFitPolicy, RandomPolicy
from tessera.scheduler.core.host import HostView, NumaNodeView
from tessera.scheduler.core.identity import HostId, PlacementId, RequestId, SlotKey, TenantName
from tessera.scheduler.core.occupancy import build_occupancy
from tessera.scheduler.core.plan import Plan, Unschedulable
from tessera.scheduler.core.request import Claim, DeviceKind, PlacementRequest
from tessera.scheduler.core.slots import HostShareSlot, host_share_slot, parse_slot
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState, with_reservation
from tessera.scheduler.core.validation import MAX_CPU_MILLI, MAX_MEMORY_MIB, validate_request

from .topologies import snapshot, workstation


def with_cpus(view: HostView, cpus: int, memory_mib: int) -> HostView:
    """``view`` with one NUMA node of ``cpus`` CPUs and ``memory_mib`` of memory."""
    return replace(view, numa_nodes=(NumaNodeView(0, (10,), cpus, memory_mib),))


def gpu(request_id: str, cpu_milli: int = 0, memory_mib: int = 0) -> PlacementRequest:
    return PlacementRequest(
        RequestId(request_id),
        TenantName("acme"),
        (Claim("g", DeviceKind.GPU, 1),),
        cpu_milli=cpu_milli,
        memory_mib=memory_mib,
    )


def test_a_host_share_slot_names_its_amounts_tenant_and_request() -> None:
    key = host_share_slot(4500, 16384, TenantName("acme"), RequestId("vm-1"))
    assert key == "host-share:4500,16384#acme|vm-1"
    assert parse_slot(key) == HostShareSlot(4500, 16384, TenantName("acme"), RequestId("vm-1"))
    # Request ids are each tenant's own: another tenant's same id is another slot.
    assert host_share_slot(4500, 16384, TenantName("globex"), RequestId("vm-1")) != key
    # Hostile keys in the store are opaque, never negative amounts.
    assert parse_slot("host-share:-1,0#x") is None
    assert parse_slot("host-share:1#x") is None


def test_the_occupancy_sums_every_share_and_the_commit_guards_them() -> None:
    view = with_cpus(workstation(), 32, 128_000)
    state = HostState(
        view,
        1,
        allocations={
            SlotKey(host_share_slot(8000, 1000, TenantName("t"), RequestId("a"))): PlacementId(
                "pa"
            ),
            SlotKey(host_share_slot(500, 24, TenantName("t"), RequestId("b"))): PlacementId("pb"),
        },
    )
    occupancy = build_occupancy(state)
    assert (occupancy.cpu_used, occupancy.memory_used) == (8500, 1024)
    slot = SlotKey(host_share_slot(1, 1, TenantName("t"), RequestId("c")))
    assert guards.changed_by(view, [slot]) == (guards.HOST_SHARE,)
    assert guards.HOST_SHARE in guards.guards(view, [slot], exclusive=False)


def test_the_engine_holds_the_share_and_skips_hosts_without_room() -> None:
    small = with_cpus(workstation("small"), 4, 8_000)
    large = with_cpus(workstation("large"), 64, 256_000)
    snap = snapshot(small, large)
    engine = Engine()
    plan = engine.schedule(snap, gpu("vm", cpu_milli=8000, memory_mib=16_000))
    assert isinstance(plan, Plan), plan
    assert plan.host_id == "large"
    assert host_share_slot(8000, 16_000, TenantName("acme"), RequestId("vm")) in plan.slots
    refused = engine.schedule(snap, gpu("too-big", cpu_milli=65_000))
    assert isinstance(refused, Unschedulable)
    assert ("host-share", "host-cpu-short") in {(r.plugin, r.reason) for r in refused.rejections}
    # A request asking for neither places where no CPU is reported at all.
    assert isinstance(engine.schedule(snapshot(workstation("bare")), gpu("plain")), Plan)


def test_the_checker_finds_a_host_promised_more_cpu_than_it_has() -> None:
    view = with_cpus(workstation(), 8, 64_000)
    snap = ClusterSnapshot(hosts={HostId(view.host_id): HostState(view, 1)})
    engine = Engine()
    first = engine.schedule(snap, gpu("a", cpu_milli=6000))
    assert isinstance(first, Plan)
    # A second plan made on the same (stale) state: each alone fits.
    second = engine.schedule(snap, gpu("b", cpu_milli=6000))
    assert isinstance(second, Plan) and second.slots != first.slots
    found = check_placements(snap, [(gpu("a", cpu_milli=6000), first), (gpu("b", 6000), second)])
    assert any(v.rule == RULE_CAPACITY and "host CPU" in v.detail for v in found), found


@settings(max_examples=40, deadline=None)
@given(
    cpus=st.integers(0, 16),
    memory=st.integers(0, 64_000),
    asks=st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 70_000)), max_size=8),
)
def test_placements_one_by_one_never_hold_more_than_the_host_has(
    cpus: int, memory: int, asks: list[tuple[int, int]]
) -> None:
    view = with_cpus(workstation(), cpus, memory)
    snap = ClusterSnapshot(hosts={HostId(view.host_id): HostState(view, 1)})
    engine = Engine()
    placed = []
    for i, (cpu, mem) in enumerate(asks):
        request = gpu(f"r{i}", cpu, mem)
        result = engine.schedule(snap, request)
        if isinstance(result, Plan):
            placed.append((request, result))
            snap = with_reservation(
                snap, result.host_id, result.slots, PlacementId(f"p{i}"), request.tenant
            )
    start = ClusterSnapshot(hosts={HostId(view.host_id): HostState(view, 1)})
    assert check_placements(start, placed) == []
    occupancy = build_occupancy(snap.hosts[HostId(view.host_id)])
    assert occupancy.cpu_used <= view.cpu_milli and occupancy.memory_used <= view.memory_mib


def test_asking_past_any_host_is_invalid_naming_the_field() -> None:
    bad = gpu("r", cpu_milli=MAX_CPU_MILLI + 1, memory_mib=MAX_MEMORY_MIB + 1)
    assert {v.field for v in validate_request(bad)} == {"cpu_milli", "memory_mib"}
    assert validate_request(gpu("r", MAX_CPU_MILLI, MAX_MEMORY_MIB)) == []


def test_the_baseline_policies_judge_every_request_by_its_own_share() -> None:
    """Feasibility memoised per request shape keys on the share: no ask is judged as another."""
    for policy in (FirstFitPolicy(), BestFitPolicy(), RandomPolicy()):
        snap = snapshot(with_cpus(workstation("w1"), 8, 64_000))
        small = policy.place(snap, gpu("small", cpu_milli=2000))
        assert isinstance(small, Plan), (policy.name, small)
        # The same claims asking past the host: refused, not judged feasible as the small one was.
        large = policy.place(snap, gpu("large", cpu_milli=16_000))
        assert isinstance(large, Unschedulable), (policy.name, large)
        # Nor is a small one refused because a large one was first.
        again = type(policy)()
        assert isinstance(again.place(snap, gpu("large", cpu_milli=16_000)), Unschedulable)
        assert isinstance(again.place(snap, gpu("small", cpu_milli=2000)), Plan), policy.name


def test_a_host_over_on_cpu_still_takes_a_request_asking_only_memory() -> None:
    """What a request does not ask for is never short: a host whose CPU shrank under its shares
    (SMT turned off at a reboot) refuses CPU, not memory."""
    view = with_cpus(workstation(), 8, 64_000)
    held = SlotKey(host_share_slot(12_000, 1000, TenantName("t"), RequestId("old")))
    state = HostState(
        view,
        1,
        allocations={held: PlacementId("p-old")},
        tenants={PlacementId("p-old"): TenantName("t")},
    )
    snap = ClusterSnapshot(hosts={HostId(view.host_id): state})
    engine = Engine()
    assert isinstance(engine.schedule(snap, gpu("cpu", cpu_milli=1000)), Unschedulable)
    request = gpu("memory", memory_mib=1000)
    plan = engine.schedule(snap, request)
    assert isinstance(plan, Plan), plan
    # The checker blames the host's CPU on what was there, not on a placement taking none.
    assert [v for v in check_placements(snap, [(request, plan)]) if v.request_id] == []
