"""The ATC'23-style fill: arrivals reach 130% of the GPUs, budgets hold, every policy runs."""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench import fill_replay as fr
from bench.trace_replay import TRACE_DIR
from tessera.scheduler.core.checker import check_placements
from tessera.scheduler.core.fragmentation import TaskMix
from tessera.scheduler.core.identity import PlacementId
from tessera.scheduler.core.plan import Plan
from tessera.scheduler.core.request import DeviceKind
from tessera.scheduler.core.snapshot import ClusterSnapshot, with_reservation


def test_arrivals_stop_once_they_reach_130_percent_of_the_gpus() -> None:
    tasks = fr.load_tasks(TRACE_DIR / fr.TRACES["default"])
    arrivals = fr.sample_arrivals(tasks, 100, seed=7)
    demand = sum(t.gpu_demand for t in arrivals)
    assert 130 <= demand < 130 + max(t.gpu_demand for t in tasks)
    assert arrivals == fr.sample_arrivals(tasks, 100, seed=7)  # seeded


def test_every_variant_loads_with_its_task_mix() -> None:
    for trace, file in fr.TRACES.items():
        tasks = fr.load_tasks(TRACE_DIR / file)
        mix = fr.task_mix(tasks)
        assert tasks and abs(sum(mix.values()) - 1) < 1e-9, trace
    shared = fr.load_tasks(TRACE_DIR / fr.TRACES["gpushare100"])
    assert all(t.gpu_milli < 1000 for t in shared)


def test_a_gpu_spec_confines_a_task_to_the_nodes_of_its_models() -> None:
    nodes = [fr.Node("a", 64000, 262144, 2, "T4"), fr.Node("b", 64000, 262144, 2, "P100")]
    base = fr.fleet_of(nodes, {("P100",)})
    task = fr.Task("t", 1000, 1024, 1, 1000, ("P100",))
    request = fr._request(task, "t")
    for _ in range(2):
        plan = fr.policies({}, 1)["first-fit"]().place(base, request)
        assert isinstance(plan, Plan) and plan.host_id == "b"


@dataclass(frozen=True)
class SmallFill:
    """A seeded handful of the trace's nodes, empty, and the arrivals that fill them."""

    nodes: list[fr.Node]
    mix: TaskMix
    base: ClusterSnapshot
    arrivals: list[fr.Task]


def small_fill(trace: str, n_nodes: int, seed: int) -> SmallFill:
    rng = random.Random(seed)
    nodes = sorted(rng.sample(fr.load_nodes(), n_nodes), key=lambda n: n.sn)
    tasks = fr.load_tasks(TRACE_DIR / fr.TRACES[trace])
    arrivals = fr.sample_arrivals(tasks, sum(n.gpus for n in nodes), seed=seed)
    return SmallFill(nodes, fr.task_mix(tasks), fr.fleet_of(nodes, set()), arrivals)


def test_a_fill_keeps_every_budget_and_never_double_allocates() -> None:
    fill = small_fill("default", 30, seed=3)
    nodes, mix, base, arrivals = fill.nodes, fill.mix, fill.base, fill.arrivals
    for name, make in fr.policies(mix, 3).items():
        result = fr.fill(name, make, base=base, nodes=nodes, arrivals=arrivals, mix=mix)
        assert 0 < result["accepted"] < len(arrivals), name
        assert set(result["levels"]) == {"50", "70", "90", "100"}
        at = result["levels"]
        assert at["50"]["unallocated"] >= at["100"]["unallocated"] >= 0, name
        assert result["gpu_demand_placed"] <= result["gpu_demand"]


def test_the_fill_plans_pass_the_independent_checker() -> None:
    """Each plan against the state it was made on, CPU budgets aside (the checker's rules)."""
    fill = small_fill("gpushare100", 12, seed=5)
    snap = fill.base
    policy = fr.policies(fill.mix, 5)["tessera"]()
    placed = 0
    for k, task in enumerate(fill.arrivals):
        request = fr._request(task, f"r{k}")
        plan = policy.place(snap, request)
        if not isinstance(plan, Plan):
            continue
        assert not check_placements(snap, [(request, plan)])
        assert all(c.kind is DeviceKind.GPU for c in request.claims)
        snap = with_reservation(
            snap, plan.host_id, plan.slots, PlacementId(f"p{k}"), request.tenant
        )
        placed += 1
    assert placed > 0


def test_the_cost_of_a_request_is_measured_for_both_tessera_policies() -> None:
    cost = fr.policy_cost(((40, 12),))
    assert set(cost) == {"40/tessera", "40/tessera-packing"}
    for figures in cost.values():
        assert 0 < figures["placed"] <= figures["requests"] == 12
        assert 0 < figures["p50_ms"] <= figures["p99_ms"]
