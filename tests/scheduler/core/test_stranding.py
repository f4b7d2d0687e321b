"""What a placement strands under the task mix, and the packing scorer built on it.

Each case is one of the three places where FGD's next-task view misleads on
MIG and vGPU geometry (see :mod:`scheduler.core.stranding`), or one of the
host-level losses both measures share.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tessera.scheduler.core.engine.batch import solve_batch
from tessera.scheduler.core.engine.fastpath import _SEEN_KEPT, Engine, packing_profile
from tessera.scheduler.core.engine.plugins import PackingScorer
from tessera.scheduler.core.engine.policies import FgdPolicy
from tessera.scheduler.core.fragmentation import TaskMix, TaskMixLearner, TaskShape, occupancy_after
from tessera.scheduler.core.host import HostView, NumaNodeView
from tessera.scheduler.core.identity import PlacementId, RequestId, TenantName
from tessera.scheduler.core.mig import GpuInstance
from tessera.scheduler.core.occupancy import build_occupancy
from tessera.scheduler.core.plan import Plan
from tessera.scheduler.core.request import (
    Claim,
    DeviceForm,
    DeviceKind,
    Isolation,
    PlacementRequest,
)
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState, with_reservation
from tessera.scheduler.core.stranding import (
    cpu_memory_shortfall,
    demand_per_gpu,
    gangs_lost,
    geometry_mix,
    geometry_of,
    geometry_value,
    rare_hole_closed,
    stranded_share,
    unfillable_hole,
)

from .checker_topologies import A100, H100, HALF, QUARTER, gpu_host

# H100 GPU instances: (start, memory slices, profile id, compute slices).
FOUR_AT_0 = GpuInstance(0, 4, 5, 4)
TWO_AT_4 = GpuInstance(4, 2, 14, 2)
ONE_AT_6 = GpuInstance(6, 1, 19, 1)

WHOLE_1 = TaskShape(gpus=1)
PAIR = TaskShape(gpus=2)
ONE_SLICE = TaskShape(mig_profiles=frozenset({"1g.10gb"}), mdev_types=frozenset({QUARTER}))
QUARTER_TASK = TaskShape(mig_profiles=frozenset({"2g.20gb"}), mdev_types=frozenset({QUARTER}))
THIRD_TASK = TaskShape(mig_profiles=frozenset({"3g.40gb"}), mdev_types=frozenset({HALF}))
HALF_TASK = TaskShape(mig_profiles=frozenset({"4g.40gb"}), mdev_types=frozenset({HALF}))

#: Mostly whole GPUs, some quarter-GPU tasks, a few thirds, 1-slice tasks rare.
MIX: TaskMix = {WHOLE_1: 0.7, QUARTER_TASK: 0.2, THIRD_TASK: 0.09, ONE_SLICE: 0.01}


def state_of(view: HostView) -> HostState:
    return HostState(view, 1)


def shared_request(rid: str, profile: str, mdev_type: str) -> PlacementRequest:
    claim = Claim(
        "gpu", DeviceKind.GPU, 1, forms=frozenset({DeviceForm.MIG, DeviceForm.MDEV}),
        mig_profiles=frozenset({profile}), mdev_types=frozenset({mdev_type}),
        min_isolation=Isolation.SHARED,
    )  # fmt: skip
    return PlacementRequest(RequestId(rid), TenantName("t"), (claim,))


def whole_request(rid: str) -> PlacementRequest:
    return PlacementRequest(RequestId(rid), TenantName("t"), (Claim("gpu", DeviceKind.GPU, 1),))


def packing_engine(mix: TaskMix, **settings: float) -> Engine:
    """Tessera's packing profile with the mix given (as a trace's replay would give FGD).

    ``settings`` replace the packing scorer's (``rare=0``: no credit for closing holes).
    """
    profile = packing_profile(TaskMixLearner(prior=mix))
    for scorer in profile.scorers:
        if isinstance(scorer, PackingScorer):
            for name, value in settings.items():
                setattr(scorer, name, value)
    return Engine(profile=profile, feasible_hosts=0)


# ---------------------------------------------------------------- the measure


def test_a_slice_almost_nothing_in_the_mix_can_use_is_stranded() -> None:
    """4g at 0 and 2g at 4 leave one slice: only 1-slice tasks, 1% of the mix, can use it."""
    view = gpu_host("h", mig=[(FOUR_AT_0, TWO_AT_4)])
    occ = build_occupancy(state_of(view))
    assert stranded_share(view, occ, MIX, floor=0.03) == pytest.approx(1 / 7)
    assert stranded_share(view, occ, MIX, floor=0.005) == 0.0


def test_a_hole_a_popular_shape_can_use_is_not_stranded() -> None:
    view = gpu_host("h", mig=[(FOUR_AT_0,)], vgpu=[{"u1": QUARTER}])
    occ = build_occupancy(state_of(view))
    # The 3-slice hole serves thirds, quarters and 1-slice tasks (30%), the
    # vGPU GPU's three free quarters serve quarter tasks (21%).
    assert stranded_share(view, occ, MIX, floor=0.03) == 0.0


def test_a_host_no_shape_of_the_mix_fits_for_cpu_strands_all_its_free_share() -> None:
    view = gpu_host("h", plain=2)
    view = replace(view, numa_nodes=(NumaNodeView(0, (10,), cpus=4, memory_mib=65_536),))
    occ = build_occupancy(state_of(view))
    hungry = {replace(WHOLE_1, cpu_milli=8000): 1.0}
    assert stranded_share(view, occ, hungry, floor=0.03) == pytest.approx(2.0)
    assert stranded_share(view, occ, {replace(WHOLE_1, cpu_milli=4000): 1.0}, 0.03) == 0.0


def test_the_mix_asks_cpu_and_memory_per_gpu_it_takes() -> None:
    """Half whole GPUs with 8 CPUs, half quarter-GPU tasks with 2: 5 CPUs per 0.625 GPU."""
    whole = replace(WHOLE_1, cpu_milli=8000, memory_mib=32_768)
    quarter = replace(QUARTER_TASK, cpu_milli=2000, memory_mib=8192)
    mix = {whole: 0.5, quarter: 0.5}
    least = {geometry_of(QUARTER_TASK): 0.25}
    assert demand_per_gpu(mix, least) == pytest.approx((8000.0, 32_768.0))
    # A shared shape whose share is not known yet is left out of both sums.
    assert demand_per_gpu(mix, {}) == pytest.approx((8000.0, 32_768.0))
    assert demand_per_gpu({quarter: 1.0}, {}) == (0.0, 0.0)


def test_free_gpus_the_cpu_left_cannot_serve_are_short() -> None:
    """4 free GPUs at 8 CPUs each want 32 CPUs; with 24 a quarter of them go unserved."""
    view = replace(
        gpu_host("h", plain=4),
        numa_nodes=(NumaNodeView(0, (10,), cpus=24, memory_mib=262_144),),
    )
    occ = build_occupancy(state_of(view))
    assert cpu_memory_shortfall(view, occ, 4.0, (8000.0, 0.0)) == pytest.approx(1.0)
    assert cpu_memory_shortfall(view, occ, 3.0, (8000.0, 0.0)) == 0.0
    # Memory, whichever is shorter: 4 GPUs at 128 GiB want 512 of the 256 left.
    assert cpu_memory_shortfall(view, occ, 4.0, (8000.0, 131_072.0)) == pytest.approx(2.0)
    assert cpu_memory_shortfall(view, occ, 0.0, (8000.0, 131_072.0)) == 0.0


def test_gpus_too_few_of_a_gangs_models_are_stranded_for_it() -> None:
    """One A100 and one H100 untouched: no pair of A100s, whatever the count says."""
    view = gpu_host("h", mig=[()], plain=1)
    view = replace(view, gpus={a: replace(g, mig_enabled=False) for a, g in view.gpus.items()})
    occ = build_occupancy(state_of(view))
    a100_pairs = {replace(PAIR, models=frozenset({A100})): 1.0}
    assert stranded_share(view, occ, a100_pairs, floor=0.03) == pytest.approx(2.0)
    assert stranded_share(view, occ, {PAIR: 1.0}, floor=0.03) == 0.0


def test_a_hole_its_own_kind_fills_is_not_unfillable() -> None:
    """One quarter vGPU opened a GPU: the next three quarter tasks fill it."""
    view = gpu_host("h", vgpu=[{"u1": QUARTER}])
    after = build_occupancy(state_of(view))
    (gpu,) = view.gpus
    assert unfillable_hole(view, after, gpu, QUARTER_TASK, geometry_mix(MIX)) == 0.0


def test_the_slice_a_2g_leaves_in_a_3_slice_hole_is_unfillable() -> None:
    """FGD likes the 2g there (the hole shrinks); the slice left waits for 1% of the mix."""
    view = gpu_host("h", mig=[(FOUR_AT_0, TWO_AT_4)])
    after = build_occupancy(state_of(view))
    (gpu,) = view.gpus
    hole = unfillable_hole(view, after, gpu, QUARTER_TASK, geometry_mix(MIX))
    assert hole == pytest.approx(1 / 7 * (1 - 0.01 / 0.2))


#: Whole GPUs, half-GPU tasks (4 slices) and thirds (3): few tasks take a 3-slice hole.
HALVES_OUTNUMBER_THIRDS: TaskMix = {WHOLE_1: 0.8, HALF_TASK: 0.1, THIRD_TASK: 0.1}


def test_filling_a_hole_few_shapes_can_use_is_credited_for_the_share_filled() -> None:
    """4g at 0 leaves 3 slices that only thirds (10% of the mix) take: 3/7 x (1 - 0.1/0.25)."""
    view = gpu_host("h", mig=[(FOUR_AT_0,)])
    occ = build_occupancy(state_of(view))
    (gpu,) = view.gpus
    geometry = geometry_mix(HALVES_OUTNUMBER_THIRDS)

    def closed(after: float, mix: dict[TaskShape, float] = geometry) -> float:
        return rare_hole_closed(
            view, occ, gpu, mix, 0.25, free_before={gpu: 3 / 7}, free_after={gpu: after}
        )

    assert closed(0.0) == pytest.approx(3 / 7 * 0.6)
    assert closed(1 / 7) == pytest.approx(2 / 7 * 0.6)
    # A hole a quarter of the mix or more can use is not rare.
    assert closed(0.0, geometry_mix({WHOLE_1: 0.7, THIRD_TASK: 0.3})) == 0.0
    # An untouched GPU has no hole to close.
    fresh = gpu_host("f", mig=[()])
    (new_gpu,) = fresh.gpus
    untouched = build_occupancy(state_of(fresh))
    before, after = {new_gpu: 1.0}, {new_gpu: 4 / 7}
    kept = rare_hole_closed(
        fresh, untouched, new_gpu, geometry, 0.25, free_before=before, free_after=after
    )
    assert kept == 0.0


def _hole_or_vgpu() -> ClusterSnapshot:
    """An H100 with a 2-slice hole left (4g at 0, 1g at 6), and an A16 holding one quarter."""
    mig = gpu_host("mig", mig=[(FOUR_AT_0, ONE_AT_6)])
    vgpu = gpu_host("vgpu", vgpu=[{"u1": QUARTER}])
    return ClusterSnapshot(hosts={v.host_id: state_of(v) for v in (mig, vgpu)})


#: Quarter-GPU tasks (2 slices) are a tenth of the mix: the 2-slice hole's only users.
#: The A16's free quarters serve them and a shape three times as common.
FEW_QUARTERS: TaskMix = {
    WHOLE_1: 0.6,
    HALF_TASK: 0.1,
    QUARTER_TASK: 0.1,
    TaskShape(mig_profiles=frozenset({"3g.40gb"}), mdev_types=frozenset({QUARTER})): 0.2,
}


@pytest.mark.parametrize("rid", [f"q{n}" for n in range(8)])
def test_a_quarter_task_closes_a_hole_few_tasks_fit_rather_than_open_a_vgpu(rid: str) -> None:
    plan = packing_engine(FEW_QUARTERS).schedule(
        _hole_or_vgpu(), shared_request(rid, "2g.20gb", QUARTER)
    )
    assert isinstance(plan, Plan) and plan.host_id == "mig"


def test_without_the_credit_the_quarter_task_opens_the_vgpu() -> None:
    """The test above is decided by the credit: without it the vGPU's exact quarter wins."""
    for n in range(8):
        plan = packing_engine(FEW_QUARTERS, rare=0.0).schedule(
            _hole_or_vgpu(), shared_request(f"q{n}", "2g.20gb", QUARTER)
        )
        assert isinstance(plan, Plan) and plan.host_id == "vgpu"


def test_a_hole_only_a_shape_new_to_the_mix_can_use_counts_in_full() -> None:
    """A shape not in the published mix yet is rarer than anything: nothing else fills it."""
    view = gpu_host("h", mig=[(FOUR_AT_0, TWO_AT_4)])
    after = build_occupancy(state_of(view))
    (gpu,) = view.gpus
    newcomer = TaskShape(mig_profiles=frozenset({"2g.20gb"}))
    assert unfillable_hole(view, after, gpu, newcomer, {WHOLE_1: 1.0}) == pytest.approx(1 / 7)
    assert unfillable_hole(view, after, gpu, newcomer, geometry_mix(MIX)) == 0.0  # 1g fills it
    # A newcomer on a vGPU GPU of its type fills what it leaves, as any shape does.
    vgpu = gpu_host("v", vgpu=[{"u1": QUARTER}])
    (parent,) = vgpu.gpus
    quarters = TaskShape(mdev_types=frozenset({QUARTER}))
    left = build_occupancy(state_of(vgpu))
    assert unfillable_hole(vgpu, left, parent, quarters, {WHOLE_1: 1.0}) == 0.0


def test_a_host_broken_for_gangs_loses_its_free_share_to_them() -> None:
    mix = {WHOLE_1: 0.5, PAIR: 0.5}
    view = gpu_host("h", plain=2)
    occ = build_occupancy(state_of(view))
    assert gangs_lost(view, occ, mix) == 0.0
    one_taken = occupancy_after(
        view, occ, [(DeviceForm.WHOLE_DEVICE, next(iter(view.gpus)), "", -1)]
    )
    # One GPU left: the pairs (half the mix) lose it.
    assert gangs_lost(view, one_taken, mix) == pytest.approx(0.5)


def test_a_gpu_is_worth_the_shapes_it_serves_at_their_least_share() -> None:
    """A vGPU GPU gives quarters and halves exactly; a MIG GPU serves thirds best (3g)."""
    view = gpu_host("h", mig=[()], vgpu=[{}])
    mig_gpu, vgpu_gpu = view.gpus
    mix = {WHOLE_1: 0.4, QUARTER_TASK: 0.3, HALF_TASK: 0.2, THIRD_TASK: 0.1}
    geometry, least = geometry_mix(mix), dict[TaskShape, float]()
    geometry_value(view, mig_gpu, geometry, least)
    geometry_value(view, vgpu_gpu, geometry, least)
    assert least == {QUARTER_TASK: 0.25, HALF_TASK: 0.5, THIRD_TASK: pytest.approx(3 / 7)}
    assert geometry_value(view, vgpu_gpu, geometry, least) == pytest.approx(0.5)
    assert geometry_value(view, mig_gpu, geometry, least) == pytest.approx(0.1)


def test_a_gpu_of_a_model_a_shape_excludes_serves_it_nothing() -> None:
    view = gpu_host("h", vgpu=[{}])
    (gpu,) = view.gpus
    h100_quarters = replace(QUARTER_TASK, models=frozenset({H100}))
    least: dict[TaskShape, float] = {}
    assert geometry_value(view, gpu, {h100_quarters: 1.0}, least) == 0.0
    assert least == {}


# ---------------------------------------------------------------- the scorer


def test_a_quarter_task_opens_a_vgpu_gpu_rather_than_strand_a_mig_slice() -> None:
    """FGD fills the MIG hole with a 2g; packing sends the task where its kind fills the rest."""
    mig = gpu_host("mig", mig=[(FOUR_AT_0,)])
    vgpu = gpu_host("vgpu", vgpu=[{}])
    snap = ClusterSnapshot(hosts={v.host_id: state_of(v) for v in (mig, vgpu)})
    request = shared_request("q", "2g.20gb", QUARTER)
    fgd = FgdPolicy(prior=MIX).place(snap, request)
    packed = packing_engine(MIX).schedule(snap, request)
    assert isinstance(fgd, Plan) and fgd.host_id == "mig"
    assert isinstance(packed, Plan) and packed.host_id == "vgpu"
    assert any(line.startswith("packing ") for line in packed.reasons)


@pytest.mark.parametrize("charge", ["stranded_weight", "hole_weight"])
def test_either_charge_alone_keeps_the_mig_slice_unstranded(charge: str) -> None:
    """The packing scorer by itself, one charge at a time: each sends the task to the vGPU GPU."""
    weights = dict.fromkeys(
        (
            "stranded_weight",
            "hole_weight",
            "gangs_weight",
            "geometry_weight",
            "short_weight",
            "consumed_weight",
        ),
        0,
    )
    scorer = PackingScorer(TaskMixLearner(prior=MIX), **(weights | {charge: 1000}))
    profile = replace(packing_profile(), scorers=(scorer,), observers=())
    mig = gpu_host("mig", mig=[(FOUR_AT_0,)])
    vgpu = gpu_host("vgpu", vgpu=[{}])
    snap = ClusterSnapshot(hosts={v.host_id: state_of(v) for v in (mig, vgpu)})
    for n in range(8):  # tie-breaks differ per request id; the charge must decide
        plan = Engine(profile=profile, feasible_hosts=0).schedule(
            snap, shared_request(f"q{n}", "2g.20gb", QUARTER)
        )
        assert isinstance(plan, Plan) and plan.host_id == "vgpu", charge


def test_a_new_mix_is_scored_afresh() -> None:
    """The scorer's memo of a host's state does not outlive the mix it was measured under."""
    learner = TaskMixLearner(prior={WHOLE_1: 0.9, QUARTER_TASK: 0.1}, republish=0.0)
    engine = Engine(profile=packing_profile(learner), feasible_hosts=0)
    view = gpu_host("h", mig=[(FOUR_AT_0,)])
    snap = ClusterSnapshot(hosts={view.host_id: state_of(view)})
    first = engine.candidates(snap, shared_request("a", "2g.20gb", QUARTER), 0)[0][0].score
    for n in range(100):
        learner.observe(shared_request(f"b{n}", "1g.10gb", QUARTER))
    second = engine.candidates(snap, shared_request("c", "2g.20gb", QUARTER), 0)[0][0].score
    # 1-slice tasks now fill the slice a 2g leaves: nothing is stranded.
    assert second > first


def test_a_request_planned_again_is_counted_in_the_mix_once() -> None:
    """The service plans a request again after each commit it loses; the mix counts demand."""
    learner = TaskMixLearner(republish=0.0)
    engine = Engine(profile=packing_profile(learner), feasible_hosts=0)
    view = gpu_host("h", plain=2)
    snap = ClusterSnapshot(hosts={view.host_id: state_of(view)})
    for _ in range(3):
        engine.schedule(snap, whole_request("same"))
    solve_batch(engine, snap, [whole_request("same")])  # its plan lost, placed again alone
    engine.schedule(snap, shared_request("other", "2g.20gb", QUARTER))
    assert learner.mix == pytest.approx({WHOLE_1: 0.5, QUARTER_TASK: 0.5}, rel=1e-2)
    # Request ids are each tenant's own: another tenant's "same" is another request.
    engine.schedule(
        snap, replace(shared_request("same", "2g.20gb", QUARTER), tenant=TenantName("other"))
    )
    assert learner.mix == pytest.approx({WHOLE_1: 1 / 3, QUARTER_TASK: 2 / 3}, rel=1e-2)


def test_the_requests_an_engine_remembers_are_bounded() -> None:
    """A client sending ever new ids never grows the memory of what was counted past its bound."""
    learner = TaskMixLearner(decay=1.0, republish=0.0)
    engine = Engine(profile=packing_profile(learner), feasible_hosts=0)
    engine.observe(shared_request("first", "2g.20gb", QUARTER))
    for n in range(_SEEN_KEPT):
        engine.observe(whole_request(f"w{n}"))
    # "first" has been forgotten: sent again, it is counted again.
    engine.observe(shared_request("first", "2g.20gb", QUARTER))
    assert learner.mix[QUARTER_TASK] == pytest.approx(2 / (_SEEN_KEPT + 2))


def test_one_gpu_tasks_are_packed_when_the_mix_has_no_gang() -> None:
    """Best fit breaks the ties packing leaves: a later 4-GPU task still finds a host."""
    hosts = [gpu_host(f"host-{n}", plain=4) for n in range(8)]
    snap = ClusterSnapshot(hosts={v.host_id: state_of(v) for v in hosts})
    engine = Engine(profile=packing_profile(), feasible_hosts=0)
    for n in range(16):
        plan = engine.schedule(snap, whole_request(f"one-{n}"))
        assert isinstance(plan, Plan)
        snap = with_reservation(
            snap, plan.host_id, plan.slots, PlacementId(f"p{n}"), TenantName("t")
        )
    used = {h for h, s in snap.hosts.items() if s.allocations}
    assert len(used) == 4
    four = PlacementRequest(RequestId("four"), TenantName("t"), (Claim("gpu", DeviceKind.GPU, 4),))
    assert isinstance(engine.schedule(snap, four), Plan)


@pytest.mark.parametrize("rid", [f"w{n}" for n in range(8)])
def test_a_whole_gpu_task_takes_a_mig_gpu_and_leaves_the_vgpu_one_to_shared_tasks(
    rid: str,
) -> None:
    """Each host ties on every other scorer; ties are broken per request id, the charge decides."""
    mix = {WHOLE_1: 0.4, QUARTER_TASK: 0.3, HALF_TASK: 0.2, THIRD_TASK: 0.1}
    mig, vgpu = gpu_host("mig", mig=[()]), gpu_host("vgpu", vgpu=[{}])
    snap = ClusterSnapshot(hosts={v.host_id: state_of(v) for v in (mig, vgpu)})
    plan = packing_engine(mix).schedule(snap, whole_request(rid))
    assert isinstance(plan, Plan) and plan.host_id == "mig"


@pytest.mark.parametrize("rid", [f"w{n}" for n in range(8)])
def test_a_one_gpu_task_keeps_a_pair_of_untouched_gpus_together(rid: str) -> None:
    mix = {WHOLE_1: 0.8, PAIR: 0.2}
    pair, single = gpu_host("pair", plain=2), gpu_host("single", plain=1)
    snap = ClusterSnapshot(hosts={v.host_id: state_of(v) for v in (pair, single)})
    plan = packing_engine(mix).schedule(snap, whole_request(rid))
    assert isinstance(plan, Plan) and plan.host_id == "single"


def _cpu_hosts(lean: int, roomy: int) -> ClusterSnapshot:
    """Two hosts of four A100s that differ only in their CPUs."""
    hosts = [
        replace(gpu_host(name, plain=4), numa_nodes=(NumaNodeView(0, (10,), cpus=cpus),))
        for name, cpus in (("lean", lean), ("roomy", roomy))
    ]
    return ClusterSnapshot(hosts={v.host_id: state_of(v) for v in hosts})


def _cpu_request(rid: str, cpu_milli: int) -> PlacementRequest:
    return replace(whole_request(rid), cpu_milli=cpu_milli)


#: One whole GPU with 8 CPUs: the mix asks 8 CPUs per GPU.
EIGHT_CPUS_A_GPU: TaskMix = {replace(WHOLE_1, cpu_milli=8000): 1.0}


@pytest.mark.parametrize("rid", [f"c{n}" for n in range(8)])
def test_a_cpu_hungry_task_goes_where_the_cpu_keeps_pace_with_the_gpus(rid: str) -> None:
    """12 CPUs for one GPU: on the lean host 3 GPUs would be left with 12 CPUs, wanting 24.

    Every other charge ties (no shape of the mix is kept off either host),
    so without the shortfall the hosts split over the request ids.
    """
    snap = _cpu_hosts(lean=24, roomy=40)
    plan = packing_engine(EIGHT_CPUS_A_GPU).schedule(snap, _cpu_request(rid, 12_000))
    assert isinstance(plan, Plan) and plan.host_id == "roomy"


@pytest.mark.parametrize("rid", [f"c{n}" for n in range(8)])
def test_a_cpu_light_task_takes_a_gpu_the_lean_host_could_not_serve(rid: str) -> None:
    """1 CPU for one GPU on the lean host: its 4 GPUs wanted 32 CPUs of 24, its 3 want 24 of 23."""
    snap = _cpu_hosts(lean=24, roomy=40)
    plan = packing_engine(EIGHT_CPUS_A_GPU).schedule(snap, _cpu_request(rid, 1000))
    assert isinstance(plan, Plan) and plan.host_id == "lean"


@pytest.mark.parametrize("cpu_milli", [12_000, 1000])
def test_without_the_shortfall_the_cpu_hosts_tie(cpu_milli: int) -> None:
    """The two tests above are decided by the shortfall charge, not by a tie-break."""
    chosen = set()
    for n in range(8):
        plan = packing_engine(EIGHT_CPUS_A_GPU, short_weight=0).schedule(
            _cpu_hosts(lean=24, roomy=40), _cpu_request(f"c{n}", cpu_milli)
        )
        assert isinstance(plan, Plan)
        chosen.add(plan.host_id)
    assert chosen == {"lean", "roomy"}


def test_a_share_of_the_mix_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="floor"):
        PackingScorer(TaskMixLearner(), floor=1.5)
    with pytest.raises(ValueError, match="rare"):
        PackingScorer(TaskMixLearner(), rare=-0.1)


@pytest.mark.parametrize("rid", [f"m{n}" for n in range(8)])
def test_a_whole_gpu_beside_a_mig_slice_still_packs(rid: str) -> None:
    """Best fit counts the kinds taken whole: the request goes where fewer GPUs stay idle."""
    roomy = gpu_host("roomy", mig=[()], plain=3)
    snug = gpu_host("snug", mig=[()], plain=1)
    snap = ClusterSnapshot(hosts={v.host_id: state_of(v) for v in (roomy, snug)})
    slice_claim = Claim(
        "slice", DeviceKind.GPU, 1, forms=frozenset({DeviceForm.MIG}),
        mig_profiles=frozenset({"3g.40gb"}), min_isolation=Isolation.SHARED,
    )  # fmt: skip
    both = PlacementRequest(
        RequestId(rid), TenantName("t"), (Claim("gpu", DeviceKind.GPU, 1), slice_claim)
    )
    engine = packing_engine({WHOLE_1: 0.9, THIRD_TASK: 0.1})
    plan = engine.schedule(snap, both)
    assert isinstance(plan, Plan) and plan.host_id == "snug"
