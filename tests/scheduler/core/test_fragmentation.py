"""The ATC'23 fragmentation measure, the learnt task mix, and FGD built on them."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tessera.scheduler.core.engine.fastpath import Engine, default_profile
from tessera.scheduler.core.engine.plugins import FragmentationScorer
from tessera.scheduler.core.engine.policies import FgdPolicy
from tessera.scheduler.core.fragmentation import (
    TaskMixLearner,
    TaskShape,
    free_shares,
    host_fragmentation,
    occupancy_after,
    share_step,
    task_shape,
)
from tessera.scheduler.core.host import NumaNodeView
from tessera.scheduler.core.identity import HostId, RequestId, TenantName
from tessera.scheduler.core.occupancy import build_occupancy
from tessera.scheduler.core.plan import Plan
from tessera.scheduler.core.request import (
    Claim,
    DeviceForm,
    DeviceKind,
    Isolation,
    PlacementRequest,
)
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState

from .checker_topologies import GPU_A, GPU_B, MDEV_GPU, MDEV_SINGLE, MIG_GPU, mixed

WHOLE_1 = TaskShape(gpus=1)
QUARTER_VGPU = TaskShape(mdev_types=frozenset({"nvidia-1"}))


def whole(rid: str, n: int = 1) -> PlacementRequest:
    return PlacementRequest(RequestId(rid), TenantName("t"), (Claim("gpu", DeviceKind.GPU, n),))


def quarter(rid: str) -> PlacementRequest:
    claim = Claim(
        "gpu", DeviceKind.GPU, 1, forms=frozenset({DeviceForm.MDEV}),
        mdev_types=frozenset({"nvidia-1"}), min_isolation=Isolation.SHARED,
    )  # fmt: skip
    return PlacementRequest(RequestId(rid), TenantName("t"), (claim,))


@pytest.fixture
def empty_mixed() -> HostState:
    """The mixed host as discovered: one live quarter vGPU, one live 3-slice MIG instance."""
    return HostState(mixed("h"), 1)


def test_a_gpus_free_share_follows_its_geometry(empty_mixed: HostState) -> None:
    free = free_shares(empty_mixed.view, build_occupancy(empty_mixed))
    assert free[GPU_A] == 1.0
    assert free[MDEV_SINGLE] == pytest.approx(0.75)  # one of four nvidia-1
    assert free[MIG_GPU] == pytest.approx(4 / 7)  # 3 of 7 compute slices taken


def test_whole_gpu_tasks_lose_every_sliced_gpu(empty_mixed: HostState) -> None:
    occ = build_occupancy(empty_mixed)
    frag = host_fragmentation(empty_mixed.view, occ, {WHOLE_1: 1.0})
    assert frag.fragmented == pytest.approx(0.75 + 4 / 7)


def test_a_task_the_host_cannot_take_loses_all_its_free_capacity(empty_mixed: HostState) -> None:
    occ = build_occupancy(empty_mixed)
    frag = host_fragmentation(empty_mixed.view, occ, {TaskShape(gpus=64): 1.0})
    assert frag.fragmented == pytest.approx(frag.free)


def test_a_task_short_of_host_cpu_or_memory_loses_all_the_free_gpus(
    empty_mixed: HostState,
) -> None:
    """The paper's rule for a node whose CPU is spent: its idle GPUs are lost to the task."""
    view = replace(empty_mixed.view, numa_nodes=(NumaNodeView(0, (10,), 8, 16_384),))
    occ = build_occupancy(replace(empty_mixed, view=view))
    fits = host_fragmentation(view, occ, {TaskShape(gpus=1, cpu_milli=8000): 1.0})
    assert fits.fragmented == pytest.approx(0.75 + 4 / 7)  # as without CPU: sliced GPUs only
    for short in (TaskShape(gpus=1, cpu_milli=8001), TaskShape(gpus=1, memory_mib=16_385)):
        assert host_fragmentation(view, occ, {short: 1.0}).fragmented == pytest.approx(fits.free)
    # What a plan leaves counts the CPU it takes: 4 CPUs left are short of 8.
    after = occupancy_after(view, occ, [], share=(4000, 0))
    assert after.cpu_used == occ.cpu_used + 4000
    frag = host_fragmentation(view, after, {TaskShape(gpus=1, cpu_milli=8000): 1.0})
    assert frag.fragmented == pytest.approx(frag.free)


def test_a_task_asking_no_cpu_is_never_short_of_it(empty_mixed: HostState) -> None:
    """A host whose CPU shrank under its placements' shares loses nothing to GPU-only tasks."""
    view = replace(empty_mixed.view, numa_nodes=(NumaNodeView(0, (10,), 8, 16_384),))
    over = occupancy_after(view, build_occupancy(replace(empty_mixed, view=view)), [], (12_000, 0))
    for shape in (TaskShape(gpus=1), TaskShape(gpus=1, memory_mib=1024)):
        frag = host_fragmentation(view, over, {shape: 1.0})
        assert frag.fragmented == pytest.approx(0.75 + 4 / 7)  # as without CPU


def test_a_shape_counts_host_cpu_and_memory_to_a_step_of_root_two() -> None:
    request = replace(whole("w"), cpu_milli=12_000, memory_mib=61_440)
    assert task_shape(request) == TaskShape(gpus=1, cpu_milli=11_585, memory_mib=65_536)
    assert [share_step(n) for n in (0, 1, 1000, 8000)] == [0, 1, 1024, 8192]


def test_a_shared_task_uses_untouched_and_roomy_gpus_of_its_type(empty_mixed: HostState) -> None:
    view, occ = empty_mixed.view, build_occupancy(empty_mixed)
    free = free_shares(view, occ)
    frag = host_fragmentation(view, occ, {QUARTER_VGPU: 1.0})
    # Only the two mdev parents offer nvidia-1: every other GPU is lost to it.
    assert frag.fragmented == pytest.approx(sum(free.values()) - 1.0 - 0.75)


def test_what_a_plan_leaves_is_read_without_building_a_state(empty_mixed: HostState) -> None:
    view, occ = empty_mixed.view, build_occupancy(empty_mixed)
    after = occupancy_after(
        view,
        occ,
        [(DeviceForm.MDEV, MDEV_GPU, "nvidia-1", -1), (DeviceForm.WHOLE_DEVICE, GPU_A, "", -1)],
    )
    free = free_shares(view, after)
    assert free[MDEV_GPU] == pytest.approx(0.75)
    assert free[GPU_A] == 0.0
    assert free_shares(view, occ)[GPU_A] == 1.0  # the state's own occupancy is untouched


def test_a_request_is_counted_by_its_gpu_shape() -> None:
    assert task_shape(whole("w", 2)) == TaskShape(gpus=2)
    assert task_shape(quarter("q")) == QUARTER_VGPU
    nic = PlacementRequest(RequestId("n"), TenantName("t"), (Claim("nic", DeviceKind.NIC, 1),))
    assert task_shape(nic) is None


def test_the_learnt_mix_is_republished_only_when_it_drifts() -> None:
    learner = TaskMixLearner(prior={WHOLE_1: 1.0}, prior_weight=100, republish=0.1)
    assert learner.mix == {WHOLE_1: 1.0}
    start = learner.epoch
    for i in range(5):
        learner.observe(quarter(f"q{i}"))
    assert learner.epoch == start  # 5 of 105: under the drift that republishes
    for i in range(30):
        learner.observe(quarter(f"r{i}"))
    assert learner.epoch > start
    assert learner.mix[QUARTER_VGPU] > 0.1
    assert sum(learner.mix.values()) == pytest.approx(1.0)


def test_the_learnt_mix_stays_bounded_whatever_arrives() -> None:
    learner = TaskMixLearner()
    for n in range(1, 500):
        learner.observe(whole(f"w{n}", n))
    assert len(learner.mix) <= TaskMixLearner.MAX_SHAPES


def test_fgd_slices_a_gpu_already_sliced_rather_than_open_a_whole_one() -> None:
    """With whole-GPU tasks in the mix, a quarter vGPU joins the sliced parent's host."""
    sliced = mixed("sliced")
    # The same host without the live vGPU: placing there opens an untouched GPU.
    parents = dict(sliced.mdev_parents)
    parents[MDEV_SINGLE] = replace(parents[MDEV_SINGLE], live={})
    fresh = replace(sliced, host_id=HostId("fresh"), mdev_parents=parents)
    snap = ClusterSnapshot(hosts={h.host_id: HostState(h, 1) for h in (fresh, sliced)})
    fgd = FgdPolicy(prior={WHOLE_1: 0.8, QUARTER_VGPU: 0.2})
    plan = fgd.place(snap, quarter("q"))
    assert isinstance(plan, Plan)
    assert plan.host_id == "sliced"


def test_an_engine_drops_judgements_scored_under_an_older_mix(empty_mixed: HostState) -> None:
    learner = TaskMixLearner(prior={WHOLE_1: 1.0}, republish=0.0)
    scorer = FragmentationScorer(learner)
    engine = Engine(profile=replace(default_profile(), scorers=(scorer,), observers=(learner,)))
    snap = ClusterSnapshot(hosts={empty_mixed.view.host_id: empty_mixed})
    first = engine.candidates(snap, quarter("a"), 1)[0][0].score
    for i in range(50):
        learner.observe(quarter(f"b{i}"))
    second = engine.candidates(snap, quarter("c"), 1)[0][0].score
    # Quarter vGPUs now dominate the mix: taking one strands less than it did.
    assert second != first


def test_a_whole_gpu_takes_its_whole_iommu_group_out_of_use() -> None:
    """Passthrough takes the group: a GPU sharing one with another leaves neither free."""
    view = mixed("h")
    # Put GPU_B in GPU_A's group: taking one takes both.
    functions = dict(view.functions)
    functions[GPU_B] = replace(functions[GPU_B], iommu_group=functions[GPU_A].iommu_group)
    groups = dict(view.iommu_groups)
    group = functions[GPU_A].iommu_group
    assert group is not None
    groups[group] = replace(groups[group], members=(GPU_A, GPU_B))
    del groups[view.functions[GPU_B].iommu_group]  # type: ignore[arg-type]
    shared = replace(view, functions=functions, iommu_groups=groups)
    state = HostState(shared, 1)
    after = occupancy_after(
        shared, build_occupancy(state), [(DeviceForm.WHOLE_DEVICE, GPU_A, "", -1)]
    )
    free = free_shares(shared, after)
    assert free[GPU_A] == free[GPU_B] == 0.0
