"""What a placement strands under the task mix, and the packing scorer built on it.

Each case is one of the three places where FGD's next-task view misleads on
MIG and vGPU geometry (see :mod:`scheduler.core.stranding`), or one of the
host-level losses both measures share.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from scheduler.core.engine.fastpath import Engine, packing_profile
from scheduler.core.engine.plugins import PackingScorer
from scheduler.core.engine.policies import FgdPolicy
from scheduler.core.fragmentation import TaskMix, TaskMixLearner, TaskShape, occupancy_after
from scheduler.core.host import HostView, NumaNodeView
from scheduler.core.identity import RequestId, TenantName
from scheduler.core.mig import GpuInstance
from scheduler.core.occupancy import build_occupancy
from scheduler.core.plan import Plan
from scheduler.core.request import Claim, DeviceForm, DeviceKind, Isolation, PlacementRequest
from scheduler.core.snapshot import ClusterSnapshot, HostState
from scheduler.core.stranding import (
    gangs_lost,
    geometry_mix,
    geometry_value,
    stranded_share,
    unfillable_hole,
)

from .checker_topologies import HALF, QUARTER, gpu_host

# H100 GPU instances: (start, memory slices, profile id, compute slices).
FOUR_AT_0 = GpuInstance(0, 4, 5, 4)
TWO_AT_4 = GpuInstance(4, 2, 14, 2)

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


def packing_engine(mix: TaskMix) -> Engine:
    """Tessera's packing profile with the mix given (as a trace's replay would give FGD)."""
    return Engine(profile=packing_profile(TaskMixLearner(prior=mix)), feasible_hosts=0)


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


def test_a_floor_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="floor"):
        PackingScorer(TaskMixLearner(), floor=1.5)
