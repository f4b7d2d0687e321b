"""The engine's incremental indexes never change a result.

The engine keeps indexes across calls (hosts by hardware class in fast-path
order, judgements shared by identical hosts in identical states, per-class
"never fits" verdicts and PCIe distances) and brings them up to date from
each snapshot, through the live model's change record when the snapshot
carries one, by comparing host states when it does not. Whatever path it
takes, the plans must be those of a fresh engine:

* a long seeded sequence of places, releases, lease flips, inventory changes,
  removals and returns gives the same plans (and the same refusal reasons)
  on snapshots with and without change tracking, and from a fresh engine;
* identical hosts in identical states share one judgement;
* a stale or forgetful change record only costs a full comparison.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Set
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.scheduler.core.engine import fastpath
from tessera.scheduler.core.engine.fastpath import _NEVER_KEPT, Engine
from tessera.scheduler.core.host import HostView
from tessera.scheduler.core.identity import HostId, PlacementId, RequestId, TenantName
from tessera.scheduler.core.plan import Plan, Unschedulable
from tessera.scheduler.core.request import (
    Claim,
    DeviceForm,
    DeviceKind,
    NumaPolicy,
    PlacementRequest,
)
from tessera.scheduler.core.snapshot import (
    ClusterSnapshot,
    HostState,
    with_release,
    with_reservation,
)
from tessera.scheduler.core.topology import TopologyGraph, pcie_distance
from tests.scheduler.core.test_engine_properties import hosts, requests
from tests.scheduler.core.topologies import dgx, workstation


class FakeModel:
    """A live cluster model's change record: which hosts changed at which revision.

    Forgets history older than ``memory`` revisions, as a real one may.
    """

    def __init__(self, states: dict[HostId, HostState], memory: int = 1_000) -> None:
        self.states = dict(states)
        self.revision = 0
        self.memory = memory
        self.log: list[tuple[int, HostId]] = []

    def set(self, host: HostId, state: HostState | None) -> None:
        """Record a host's new state (None: gone)."""
        self.revision += 1
        self.log.append((self.revision, host))
        if state is None:
            self.states.pop(host, None)
        else:
            self.states[host] = state

    def changed_since(self, revision: int) -> Set[HostId] | None:
        """See :class:`scheduler.core.snapshot.HostChanges`."""
        if revision < self.revision - self.memory:
            return None
        return {h for r, h in self.log if r > revision}

    def snapshot(self) -> ClusterSnapshot:
        """The model now, as the scheduler service hands it to the engine."""
        return ClusterSnapshot(hosts=dict(self.states), revision=self.revision, changes=self)


def outcome(result: Plan | Unschedulable) -> object:
    """What must not depend on the indexes: the plan, or the refusal's reasons and counts."""
    if isinstance(result, Plan):
        return result
    return result.summary, tuple((r.plugin, r.reason, r.count) for r in result.rejections)


def _clones(base: HostView, prefix: str, n: int, rng: random.Random) -> dict[HostId, HostState]:
    out: dict[HostId, HostState] = {}
    for i in range(n):
        host = HostId(f"{prefix}{i:02d}")
        view = replace(base, host_id=host, labels={"zone": rng.choice("ab")})
        out[host] = HostState(view, alloc_generation=0)
    return out


def _request(i: int, rng: random.Random) -> PlacementRequest:
    tenant = TenantName(f"t{rng.randrange(4)}")
    rid = RequestId(f"r{i}")
    choice = rng.randrange(4)
    if choice == 0:
        return PlacementRequest(rid, tenant, (Claim("gpu", DeviceKind.GPU, rng.choice((1, 2))),))
    if choice == 1:
        return PlacementRequest(
            rid,
            tenant,
            (Claim("gpu", DeviceKind.GPU, 2),),
            numa_policy=NumaPolicy.SINGLE_NUMA_NODE,
        )
    if choice == 2:
        return PlacementRequest(
            rid,
            tenant,
            (Claim("gpu", DeviceKind.GPU, 1), Claim("nic", DeviceKind.NIC, 1)),
        )
    return PlacementRequest(
        rid,
        tenant,
        (Claim("gpu", DeviceKind.GPU, 1, forms=frozenset({DeviceForm.WHOLE_DEVICE})),),
        host_selector={"zone": rng.choice("ab")},
    )


def test_a_long_sequence_plans_alike_with_and_without_change_tracking() -> None:
    rng = random.Random(12)
    start = {
        **_clones(dgx(), "dgx-", 12, rng),
        **_clones(workstation(), "ws-", 12, rng),
    }
    model = FakeModel(start, memory=40)
    plain, tracked = Engine(), Engine()
    snap = ClusterSnapshot(hosts=dict(start))
    held: list[tuple[HostId, PlacementId]] = []
    gone: dict[HostId, HostState] = {}
    placed = refused = 0

    def change(host: HostId, state: HostState | None) -> None:
        nonlocal snap
        hosts = dict(snap.hosts)
        if state is None:
            hosts.pop(host)
        else:
            hosts[host] = state
        snap = ClusterSnapshot(hosts=hosts)
        model.set(host, state)

    for i in range(400):
        roll = rng.random()
        if roll < 0.25 and held:
            host, pid = held.pop(rng.randrange(len(held)))
            snap = with_release(snap, host, pid)
            model.set(host, snap.hosts[host])
        elif roll < 0.30:
            host = rng.choice(sorted(snap.hosts))
            state = snap.hosts[host]
            change(host, replace(state, schedulable=not state.schedulable))
        elif roll < 0.33 and len(snap.hosts) > 2:
            host = rng.choice(sorted(snap.hosts))
            gone[host] = snap.hosts[host]
            held = [(h, p) for h, p in held if h != host]
            change(host, None)
        elif roll < 0.36 and gone:
            host = rng.choice(sorted(gone))
            change(host, gone.pop(host))
        elif roll < 0.38:
            # New inventory: the host moves to the other hardware class.
            host = rng.choice(sorted(snap.hosts))
            state = snap.hosts[host]
            other = workstation(host) if len(state.view.functions) > 20 else dgx(host)
            held = [(h, p) for h, p in held if h != host]
            change(host, HostState(other, state.alloc_generation + 1))
        request = _request(i, rng)
        expected = plain.schedule(snap, request)
        assert outcome(tracked.schedule(model.snapshot(), request)) == outcome(expected), i
        if i % 50 == 0:
            assert outcome(Engine().schedule(snap, request)) == outcome(expected), i
        if isinstance(expected, Plan):
            placed += 1
            pid = PlacementId(f"p{i}")
            snap = with_reservation(snap, expected.host_id, expected.slots, pid, request.tenant)
            model.set(expected.host_id, snap.hosts[expected.host_id])
            held.append((expected.host_id, pid))
        else:
            refused += 1
    # The sequence exercised both outcomes.
    assert placed > 100 and refused > 10


def test_switching_between_a_live_model_and_derived_snapshots_plans_alike() -> None:
    rng = random.Random(5)
    start = _clones(dgx(), "dgx-", 8, rng)
    model = FakeModel(start)
    engine = Engine()
    for i in range(60):
        base = model.snapshot()
        request = _request(i, rng)
        first = engine.schedule(base, request)
        assert outcome(first) == outcome(Engine().schedule(base, request))
        if not isinstance(first, Plan):
            continue
        # A batch plans ahead on derived snapshots, then the model moves on.
        ahead = with_reservation(base, first.host_id, first.slots, PlacementId("x"), request.tenant)
        again = _request(i + 1000, rng)
        assert outcome(engine.schedule(ahead, again)) == outcome(Engine().schedule(ahead, again))
        pid = PlacementId(f"p{i}")
        committed = with_reservation(base, first.host_id, first.slots, pid, request.tenant)
        model.set(first.host_id, committed.hosts[first.host_id])


@st.composite
def cloned_clusters(draw: st.DrawFn) -> dict[HostId, HostState]:
    """One to three random hosts, each cloned one to three times under new names."""
    states: dict[HostId, HostState] = {}
    for i in range(draw(st.integers(1, 3))):
        base = draw(hosts(f"b{i}"))
        for j in range(draw(st.integers(1, 3))):
            host = HostId(f"h{i}{j}")
            view = replace(base, host_id=host, labels={"zone": draw(st.sampled_from("ab"))})
            states[host] = HostState(view, 0, schedulable=draw(st.integers(0, 9)) > 0)
    return states


@given(start=cloned_clusters(), data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_a_warm_engine_plans_as_a_fresh_one(
    start: dict[HostId, HostState], data: st.DataObject
) -> None:
    warm = Engine()
    snap = ClusterSnapshot(hosts=start)
    for i in range(data.draw(st.integers(1, 12))):
        request = data.draw(requests(i))
        result = warm.schedule(snap, request)
        assert outcome(result) == outcome(Engine().schedule(snap, request))
        assert outcome(warm.schedule(snap, request, explain=True)) == outcome(
            Engine().schedule(snap, request, explain=True)
        )
        if isinstance(result, Plan):
            snap = with_reservation(
                snap, result.host_id, result.slots, PlacementId(f"p{i}"), request.tenant
            )


def test_identical_hosts_in_identical_states_share_one_judgement() -> None:
    rng = random.Random(1)
    states = _clones(dgx(), "dgx-", 30, rng)
    engine = Engine()
    request = PlacementRequest(RequestId("r"), TenantName("t"), (Claim("gpu", DeviceKind.GPU, 1),))
    snap = ClusterSnapshot(hosts=states)
    fits, _ = engine.candidates(snap, request, 0)
    assert len(fits) == 30
    classes = {engine.host_index(s).hardware.uid for s in states.values()}
    assert len(classes) == 1
    (cls,) = {engine.host_index(s).hardware for s in states.values()}
    # Thirty empty hosts of one class: one judgement serves them all.
    assert len(cls.judged) == 1
    # And each host's fit is its own: its state, the same picks and score.
    assert {f.state.view.host_id for f in fits} == set(states)
    assert len({(f.picks, f.score) for f in fits}) == 1


def test_a_host_judged_through_its_twin_gets_the_twins_judgement_under_its_own_name() -> None:
    rng = random.Random(2)
    states = _clones(workstation(), "ws-", 3, rng)
    engine = Engine()
    # Asks for more GPUs than a workstation has: every host says why, by name.
    request = PlacementRequest(RequestId("r"), TenantName("t"), (Claim("gpu", DeviceKind.GPU, 8),))
    result = engine.schedule(ClusterSnapshot(hosts=states), request, explain=True)
    assert isinstance(result, Unschedulable)
    fresh = Engine().schedule(ClusterSnapshot(hosts=states), request, explain=True)
    assert outcome(result) == outcome(fresh)
    for rejection in result.rejections:
        if rejection.detail.startswith("ws-"):
            assert rejection.detail.split(":")[0] in states


def test_a_change_record_that_forgot_falls_back_to_comparing_hosts() -> None:
    rng = random.Random(3)
    start = _clones(dgx(), "dgx-", 6, rng)
    model = FakeModel(start, memory=0)
    engine = Engine()
    request = PlacementRequest(RequestId("r"), TenantName("t"), (Claim("gpu", DeviceKind.GPU, 8),))
    for i in range(6):
        asked = replace(request, request_id=RequestId(f"r{i}"))
        result = engine.schedule(model.snapshot(), asked)
        assert isinstance(result, Plan)
        assert result == Engine().schedule(model.snapshot(), asked)
        state = model.states[result.host_id]
        committed = with_reservation(
            ClusterSnapshot(hosts={result.host_id: state}),
            result.host_id,
            result.slots,
            PlacementId(f"p{i}"),
            TenantName("t"),
        ).hosts[result.host_id]
        # Two changes per round: the model remembers none of them.
        model.set(result.host_id, committed)
        model.set(result.host_id, committed)
    # Six hosts of eight GPUs, each taken whole: nothing is left, and the
    # engine knows it although the model could not say what changed.
    last = replace(request, request_id=RequestId("r-last"))
    assert isinstance(engine.schedule(model.snapshot(), last), Unschedulable)
    assert {s.alloc_generation for s in model.states.values()} == {1}


def test_pcie_distance_without_a_graph_is_the_graphs() -> None:
    graph = TopologyGraph()
    for view in (dgx(), workstation()):
        graph.upsert_host(view)
        addresses = sorted(view.functions)
        for a in addresses:
            for b in addresses:
                assert pcie_distance(view, a, b) == graph.pcie_distance(view.host_id, a, b)


def _drive(
    seed: int,
    steps: int,
    judge: Callable[[int, ClusterSnapshot, PlacementRequest], Plan | Unschedulable],
    *,
    vary_cpu: float = 0.0,
) -> None:
    """A seeded run of places and releases on six DGX and six workstation clones.

    ``judge`` plans each request (and checks what it must); its plans are
    committed, and three steps in ten first release one of them. ``vary_cpu``:
    the share of requests given a new CPU ask, a new request shape each.
    """
    rng = random.Random(seed)
    start = {**_clones(dgx(), "dgx-", 6, rng), **_clones(workstation(), "ws-", 6, rng)}
    snap = ClusterSnapshot(hosts=dict(start))
    held: list[tuple[HostId, PlacementId]] = []
    for i in range(steps):
        if rng.random() < 0.3 and held:
            host, pid = held.pop(rng.randrange(len(held)))
            snap = with_release(snap, host, pid)
        request = _request(i, rng)
        if rng.random() < vary_cpu:
            request = replace(request, cpu_milli=rng.randrange(1, 10**6))
        result = judge(i, snap, request)
        if isinstance(result, Plan):
            pid = PlacementId(f"p{i}")
            snap = with_reservation(snap, result.host_id, result.slots, pid, request.tenant)
            held.append((result.host_id, pid))


def test_an_engine_that_forgets_its_signatures_plans_as_a_fresh_one() -> None:
    """Signatures are interned in a bounded table: a long-lived scheduler meets ever
    new occupancies. Forgetting them must only cost memo misses, never let an index
    still holding an old number match another state's judgement. Request shapes
    alike (a client varying its CPU ask makes a new shape each time; no host here
    reports CPUs: it fits nowhere, and that verdict is kept)."""
    forgetful, kept = Engine(interned_kept=3), Engine()

    def judge(i: int, snap: ClusterSnapshot, request: PlacementRequest) -> Plan | Unschedulable:
        expected = kept.schedule(snap, request)
        assert outcome(forgetful.schedule(snap, request)) == outcome(expected), i
        assert len(forgetful._signatures) <= 3 and len(forgetful._tenancies) <= 3
        assert len(forgetful._shape_ids) <= 3
        return expected

    _drive(7, 300, judge, vary_cpu=0.2)
    assert len(kept._signatures) > 3  # the sequence did meet more than the bound


def test_an_engine_met_with_ever_new_request_shapes_keeps_few_orders() -> None:
    """Each order key keeps an entry per host, and requests (untrusted) choose the
    keys: past ``orders_kept`` the engine drops its orders and rebuilds them as
    needed, which must only cost time, never change a plan."""
    rng = random.Random(11)
    start = {**_clones(dgx(), "dgx-", 6, rng), **_clones(workstation(), "ws-", 6, rng)}
    forgetful, kept = Engine(orders_kept=2), Engine()
    snap = ClusterSnapshot(hosts=dict(start))
    for i in range(120):
        # Whole-device-only counts and kinds make new order keys.
        count = rng.randrange(1, 9)
        claims = [Claim("gpu", DeviceKind.GPU, count, forms=frozenset({DeviceForm.WHOLE_DEVICE}))]
        if rng.random() < 0.5:
            claims.append(Claim("nic", DeviceKind.NIC, rng.randrange(1, 3)))
        request = PlacementRequest(RequestId(f"r{i}"), TenantName("t"), tuple(claims))
        expected = kept.schedule(snap, request)
        assert outcome(forgetful.schedule(snap, request)) == outcome(expected), i
        assert len(forgetful._heads) <= 2
        if isinstance(expected, Plan) and rng.random() < 0.7:
            pid = PlacementId(f"p{i}")
            snap = with_reservation(snap, expected.host_id, expected.slots, pid, request.tenant)
    assert len(kept._heads) > 2  # the sequence did meet more than the bound


def test_never_fits_verdicts_are_kept_for_a_bounded_number_of_shapes() -> None:
    """Requests choose their shapes (a CPU ask is part of one): a stream of ever new
    shapes that fit nowhere must not grow each hardware class's verdicts for ever."""
    rng = random.Random(5)
    start = {**_clones(dgx(), "dgx-", 3, rng), **_clones(workstation(), "ws-", 3, rng)}
    engine = Engine()
    snap = ClusterSnapshot(hosts=dict(start))
    for i in range(_NEVER_KEPT + 100):
        request = PlacementRequest(
            RequestId(f"r{i}"), TenantName("t"), (Claim("gpu", DeviceKind.GPU, 1),), cpu_milli=i + 1
        )
        assert isinstance(engine.schedule(snap, request), Unschedulable)
    classes = [cls for found in engine._classes.values() for cls in found]
    assert classes and all(len(cls.never) <= _NEVER_KEPT for cls in classes)


def test_an_order_met_often_outlives_a_stream_of_new_keys() -> None:
    """Past ``orders_kept`` the order met least recently goes, not every order: a
    stream of new shapes must not make the usual mix rebuild its orders each time."""
    rng = random.Random(13)
    snap = ClusterSnapshot(hosts=_clones(dgx(), "dgx-", 4, rng))
    engine = Engine(orders_kept=3)
    hot = PlacementRequest(RequestId("hot"), TenantName("t"), (Claim("gpu", DeviceKind.GPU, 1),))
    whole = frozenset({DeviceForm.WHOLE_DEVICE})
    key = fastpath._order_key(hot)
    for i in range(20):
        engine.schedule(snap, hot)
        new = PlacementRequest(
            RequestId(f"r{i}"), TenantName("t"), (Claim("gpu", DeviceKind.GPU, 9 + i, forms=whole),)
        )
        assert isinstance(engine.schedule(snap, new), Unschedulable)
        assert key in engine._heads and len(engine._heads) <= 3, i


@pytest.mark.parametrize(
    ("floor", "per_host", "memo"),
    [
        ("_PREFIXES_KEPT", "_PREFIXES_PER_HOST", "prefixes"),
        ("_LEFT_KEPT", "_LEFT_PER_HOST", "left"),
    ],
    ids=["order-places", "leftovers"],
)
def test_memos_per_occupancy_stay_within_their_bound(
    floor: str, per_host: str, memo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests choose their CPU asks, so each placement may make a new occupancy:
    a class's memos per occupancy (host places in orders, what is left) must stay
    bounded, and forgetting them must never change a plan."""
    monkeypatch.setattr(fastpath, floor, 5)
    monkeypatch.setattr(fastpath, per_host, 0)
    forgetful, kept = Engine(), Engine()

    def judge(i: int, snap: ClusterSnapshot, request: PlacementRequest) -> Plan | Unschedulable:
        expected = Engine().schedule(snap, request)
        assert outcome(forgetful.schedule(snap, request)) == outcome(expected), i
        assert outcome(kept.schedule(snap, request)) == outcome(expected), i
        return expected

    _drive(17, 200, judge)
    classes = [cls for found in forgetful._classes.values() for cls in found]
    assert classes and all(len(getattr(cls, memo)) <= 5 for cls in classes)
