"""(h) The Alibaba 2023 trace filled the way ATC'23 measures it: unallocated GPUs per policy.

Weng et al., "Beware of Fragmentation: Scheduling GPU-Sharing Workloads with
Fragmentation Gradient Descent" (USENIX ATC'23) compare schedulers by filling
a cluster with tasks sampled from the trace and reading, as the arrived
workload grows, how much of the cluster's GPU capacity is left unallocated:
the less, the less the policy wasted to fragmentation. This replay does the
same on Tessera's fleet of the trace (``bench/trace_replay.py``: one host per
node, MIG GPUs for G2/G3, vGPU types elsewhere, the same task mapping):

* **Arrivals**: GPU tasks drawn with replacement from the task list (seeded)
  until their GPU demand reaches 130% of the fleet's GPUs; no departures. A
  task that does not fit on arrival is refused (counted, not queued).
* **CPU and memory**: each node's ``cpu_milli`` and ``memory_mib`` are a
  budget every task's own columns draw from; a host without room for a task
  is out of scheduling for it (made unschedulable in the snapshot the policy
  sees), the same for every policy.
* **``gpu_spec``**: a task naming GPU models goes only to nodes of those
  models (a host label per distinct spec, the request's host selector).
* **Read at 50, 70, 90 and 100% arrived** (arrived GPU demand over the
  fleet's GPUs): the unallocated GPU share (free capacity over all GPUs, a
  MIG GPU's free share being its free compute slices of 7, a vGPU GPU's its
  free vGPU share) and the fragmented share (``F_n(M)`` summed over hosts,
  the paper's measure under the trace's task mix, over all GPUs); plus
  acceptance (tasks and GPU demand).
* **Policies**: first fit, best fit and random (``scheduler.core.engine.policies``),
  DotProd (the paper's baseline: the feasible host whose free CPU, memory
  and GPU align best with the task's demand), FGD as published (every
  feasible host, the least growth of fragmentation under the trace's mix,
  given to it), Tessera as the scheduler runs it by default, and Tessera
  packing (``tessera-scheduler --policy tessera-packing``: every feasible
  host scored by what it strands under the mix it learns from the requests).

    PYTHONPATH=.:protos .venv/bin/python bench/fill_replay.py [--quick] [--seeds 3]
        [--trace default --trace gpushare100 ...] [--share 4] [--ablations]
        [--no-budgets] [--out FILE.json]
    PYTHONPATH=.:protos .venv/bin/python bench/fill_replay.py --cost [--out FILE.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import latency_summary
from bench.fleet import snapshot
from bench.trace_replay import (
    TRACE_DIR,
    TraceNode,
    TraceTask,
    build_trace_fleet,
    mdev_type_for,
    mig_profile_names,
    request_of,
    task_class,
)
from tessera.scheduler.core.engine.fastpath import Engine, default_profile
from tessera.scheduler.core.engine.plugins import FragmentationScorer
from tessera.scheduler.core.engine.policies import (
    PACKING_POLICY,
    BestFitPolicy,
    FeasibleHostsBaseline,
    FgdPolicy,
    FirstFitPolicy,
    Policy,
    RandomPolicy,
    TesseraPolicy,
    packing_policy,
)
from tessera.scheduler.core.fragmentation import (
    TaskMix,
    TaskMixLearner,
    TaskShape,
    free_shares,
    host_fragmentation,
    share_step,
)
from tessera.scheduler.core.identity import HostId, PlacementId
from tessera.scheduler.core.occupancy import build_occupancy
from tessera.scheduler.core.plan import Plan
from tessera.scheduler.core.request import PlacementRequest
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState, with_reservation

#: The trace's task lists, by variant name.
TRACES: Mapping[str, str] = {
    "default": "openb_pod_list_default.csv",
    "gpushare100": "openb_pod_list_gpushare100.csv",
    "multigpu50": "openb_pod_list_multigpu50.csv",
}
NODES_FILE = "openb_node_list_gpu_node.csv"

#: Arrivals stop once their GPU demand reaches this share of the fleet's GPUs.
INFLATION = 1.3

#: Arrived-workload levels the figures are read at.
LEVELS = (0.5, 0.7, 0.9, 1.0)

OUT = Path(__file__).parent / "out"


# ---------------------------------------------------------------- the trace, whole


@dataclass(frozen=True)
class Node:
    """A trace node with its CPU and memory budget."""

    sn: str
    cpu_milli: int
    memory_mib: int
    gpus: int
    model: str


@dataclass(frozen=True)
class Task:
    """A trace task with its CPU, memory and GPU model constraint."""

    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int
    gpu_spec: tuple[str, ...]

    @property
    def gpu_demand(self) -> float:
        """GPUs' worth of demand: ``num_gpu * gpu_milli / 1000``."""
        return self.num_gpu * self.gpu_milli / 1000

    def as_trace_task(self, name: str) -> TraceTask:
        """The replay's task (no lifetime: nothing departs here)."""
        return TraceTask(name, self.num_gpu, self.gpu_milli, 0, 0)


def load_nodes(path: Path = TRACE_DIR / NODES_FILE) -> list[Node]:
    """The trace's GPU nodes, in file order."""
    with path.open(newline="") as f:
        return [
            Node(r["sn"], int(r["cpu_milli"]), int(r["memory_mib"]), int(r["gpu"]), r["model"])
            for r in csv.DictReader(f)
        ]


def load_tasks(path: Path) -> list[Task]:
    """The GPU tasks of a task list (CPU-only ones are not placed by Tessera)."""
    with path.open(newline="") as f:
        out = [
            Task(
                r["name"],
                int(r["cpu_milli"]),
                int(r["memory_mib"]),
                int(r["num_gpu"]),
                int(r["gpu_milli"]),
                # The multigpu50 list has no gpu_spec column: no constraint.
                tuple(sorted(m for m in (r.get("gpu_spec") or "").split("|") if m)),
            )
            for r in csv.DictReader(f)
        ]
    return [t for t in out if t.num_gpu > 0 and t.gpu_milli > 0]


def sample_arrivals(tasks: Sequence[Task], gpus: int, seed: int) -> list[Task]:
    """Tasks drawn with replacement until their GPU demand reaches :data:`INFLATION` x ``gpus``."""
    rng = random.Random(seed)
    out: list[Task] = []
    demand = 0.0
    while demand < INFLATION * gpus:
        task = rng.choice(tasks)
        out.append(task)
        demand += task.gpu_demand
    return out


def spec_label(spec: Sequence[str]) -> str:
    """The host label that marks the nodes a ``gpu_spec`` accepts."""
    return "trace.gpu-spec." + "-".join(spec)


def task_mix(tasks: Sequence[Task]) -> TaskMix:
    """The task list's mix in the fragmentation measure's shapes (popularity per shape)."""
    counts: dict[TaskShape, float] = {}
    for t in tasks:
        shape = shape_of(t)
        counts[shape] = counts.get(shape, 0.0) + 1
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()}


def shape_of(task: Task) -> TaskShape:
    """A task's shape as the measure (and the requests) see it, CPU and memory to their step."""
    cls = task_class(task.as_trace_task(task.name))
    assert cls is not None
    cpu, memory = share_step(task.cpu_milli), share_step(task.memory_mib)
    if cls[0] == "whole":
        return TaskShape(gpus=cls[1], cpu_milli=cpu, memory_mib=memory)
    return TaskShape(
        mig_profiles=mig_profile_names(cls[1]),
        mdev_types=frozenset({mdev_type_for(task.gpu_milli)}),
        cpu_milli=cpu,
        memory_mib=memory,
    )


# ---------------------------------------------------------------- policies


@dataclass
class DotProdPolicy(FeasibleHostsBaseline):
    """The paper's DotProd baseline: the feasible host whose free resources align best.

    Score of a host: the dot product of the task's demand and the host's
    free capacity, each dimension (CPU, memory, GPUs) normalised by the
    host's own capacity; the highest wins, ties to the name. Every feasible
    host is scored.
    """

    name: str = "dot-prod"
    ledger: Ledger | None = None
    demand: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def _enough(self, n_hosts: int) -> int:
        return n_hosts

    def _order(self, snapshot: ClusterSnapshot) -> Iterator[HostState]:
        for host_id in sorted(snapshot.hosts):
            yield snapshot.hosts[host_id]

    def _choose(self, fits: list[HostState], request: PlacementRequest) -> HostState:
        assert self.ledger is not None
        ledger = self.ledger
        cpu, mem, gpu = self.demand

        def aligned(state: HostState) -> tuple[float, str]:
            host = state.view.host_id
            node = ledger.nodes[host]
            free_gpu = ledger.gpu_free(state)
            score = (
                cpu * ledger.cpu_free[host] / node.cpu_milli / max(1, node.cpu_milli)
                + mem * ledger.mem_free[host] / node.memory_mib / max(1, node.memory_mib)
                + gpu * free_gpu / max(1, node.gpus) / max(1, node.gpus)
            )
            return -score, host

        return min(fits, key=aligned)


def policies(
    mix: TaskMix, seed: int, *, ablations: bool = False
) -> dict[str, Callable[[], Policy]]:
    """The policies compared, each built fresh per replay.

    With ``ablations``, Tessera's engine also runs with its scorers changed
    (64 hosts scored, the mix learnt from the requests):
    ``tessera+fragmentation`` adds the FGD charge to its scorers;
    ``tessera-best-fit+consumed`` drops the best-fit scorer (fewest idle
    devices left) for a charge on the GPU capacity a placement consumes;
    ``tessera-best-fit+fragmentation`` drops it for the FGD charge and a
    lighter capacity charge, every feasible host scored.
    """
    out: dict[str, Callable[[], Policy]] = {
        "first-fit": FirstFitPolicy,
        "best-fit": BestFitPolicy,
        "random": lambda: RandomPolicy(seed=seed),
        "dot-prod": DotProdPolicy,
        "fgd": lambda: FgdPolicy(prior=mix),
        "tessera": TesseraPolicy,
        PACKING_POLICY: packing_policy,
    }
    if ablations:
        out["tessera+fragmentation"] = lambda: _ablation(keep_best_fit=True, weight=1000)
        out["tessera-best-fit+consumed"] = lambda: _ablation(keep_best_fit=False, weight=0)
        out["tessera-best-fit+fragmentation"] = lambda: _ablation(
            keep_best_fit=False, weight=1000, consumed=200, hosts=0
        )
    return out


def _ablation(*, keep_best_fit: bool, weight: int, consumed: int = 1000, hosts: int = 64) -> Policy:
    """Tessera's engine with the fragmentation scorer and, or without, its best-fit scorer."""
    learner = TaskMixLearner()
    base = default_profile()
    scorers = tuple(s for s in base.scorers if keep_best_fit or s.name != "best-fit")
    scorer = FragmentationScorer(learner, weight=weight, consumed_weight=consumed)
    profile = replace(base, scorers=(*scorers, scorer), observers=(learner,))
    return TesseraPolicy(engine=Engine(profile=profile, feasible_hosts=hosts))


# ---------------------------------------------------------------- the replay


@dataclass
class Ledger:
    """The replay's side of the cluster: each node's CPU and memory left, GPU free memo."""

    nodes: Mapping[str, Node]
    budgets: bool = True
    cpu_free: dict[str, int] = field(default_factory=dict)
    mem_free: dict[str, int] = field(default_factory=dict)
    _gpu: dict[str, tuple[HostState, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for sn, node in self.nodes.items():
            self.cpu_free[sn] = node.cpu_milli
            self.mem_free[sn] = node.memory_mib

    def has_room(self, sn: str, task: Task) -> bool:
        """Whether the node's CPU and memory left can take the task (always, without budgets)."""
        return not self.budgets or (
            self.cpu_free[sn] >= task.cpu_milli and self.mem_free[sn] >= task.memory_mib
        )

    def take(self, sn: str, task: Task) -> None:
        """Charge the task's CPU and memory to the node."""
        self.cpu_free[sn] -= task.cpu_milli
        self.mem_free[sn] -= task.memory_mib

    def gpu_free(self, state: HostState) -> float:
        """Free GPU capacity of a host state (memoised by identity)."""
        host = state.view.host_id
        found = self._gpu.get(host)
        if found is None or found[0] is not state:
            found = (state, sum(free_shares(state.view, build_occupancy(state)).values()))
            self._gpu[host] = found
        return found[1]


def _offered(
    base: ClusterSnapshot,
    ledger: Ledger,
    task: Task,
    blocked: dict[str, tuple[HostState, HostState]],
) -> ClusterSnapshot:
    """The snapshot a policy sees for ``task``: hosts without CPU or memory for it unschedulable.

    Blocked states are kept per base state, so a host blocked for many tasks
    in a row is the same object each time (engines diff by identity).
    """
    hosts = dict(base.hosts)
    for sn, state in base.hosts.items():
        if ledger.has_room(sn, task):
            continue
        found = blocked.get(sn)
        if found is None or found[0] is not state:
            found = (state, replace(state, schedulable=False))
            blocked[sn] = found
        hosts[HostId(sn)] = found[1]
    return ClusterSnapshot(hosts=hosts)


def fill(
    name: str,
    make: Callable[[], Policy],
    *,
    base: ClusterSnapshot,
    nodes: Sequence[Node],
    arrivals: Sequence[Task],
    mix: TaskMix,
    budgets: bool = True,
) -> dict[str, Any]:
    """Fill the empty cluster ``base`` with ``arrivals`` under one policy; its figures.

    Without ``budgets`` nodes have CPU and memory without end: what the GPU
    geometry alone leaves unallocated.
    """
    policy = make()
    by_sn = {n.sn: n for n in nodes}
    ledger = Ledger(by_sn, budgets=budgets)
    if isinstance(policy, DotProdPolicy):
        policy.ledger = ledger
    capacity = sum(n.gpus for n in nodes)
    blocked: dict[str, tuple[HostState, HostState]] = {}
    frag_memo: dict[str, tuple[HostState, float, float]] = {}
    arrived = placed = 0.0
    accepted = 0
    readings: dict[str, dict[str, float]] = {}
    levels = list(LEVELS)
    snap = base
    started = time.perf_counter()

    def measure() -> dict[str, float]:
        free = fragmented = 0.0
        for sn, state in snap.hosts.items():
            found = frag_memo.get(sn)
            if found is None or found[0] is not state:
                h = host_fragmentation(state.view, build_occupancy(state), mix)
                found = (state, h.free, h.fragmented)
                frag_memo[sn] = found
            free += found[1]
            fragmented += found[2]
        return {
            "unallocated": free / capacity,
            "fragmented": fragmented / capacity,
            "accepted_tasks": accepted,
            "demand_placed": placed / arrived if arrived else 0.0,
        }

    for k, task in enumerate(arrivals):
        request = _request(task, f"a{k:06d}-{task.name}", budgets=budgets)
        arrived += task.gpu_demand
        if isinstance(policy, DotProdPolicy):
            policy.demand = (task.cpu_milli, task.memory_mib, task.gpu_demand)
        result = policy.place(_offered(snap, ledger, task, blocked), request)
        if isinstance(result, Plan):
            pid = PlacementId(f"p:{request.request_id}")
            snap = with_reservation(snap, result.host_id, result.slots, pid, request.tenant)
            ledger.take(result.host_id, task)
            accepted += 1
            placed += task.gpu_demand
        while levels and arrived >= levels[0] * capacity:
            readings[f"{round(levels.pop(0) * 100)}"] = measure()
    for level in levels:  # arrivals ended short of a level (a tiny fleet)
        readings[f"{round(level * 100)}"] = measure()
    return {
        "policy": name,
        "arrivals": len(arrivals),
        "accepted": accepted,
        "gpu_demand": round(arrived, 3),
        "gpu_demand_placed": round(placed, 3),
        "levels": readings,
        "wall_s": round(time.perf_counter() - started, 3),
    }


def _request(task: Task, name: str, *, budgets: bool = True) -> PlacementRequest:
    request = request_of(task.as_trace_task(name))
    assert request is not None
    if budgets:
        # The task's CPU and memory go with it: every policy's hosts are
        # those with room for them (the ledger), and Tessera also sees them.
        request = replace(request, cpu_milli=task.cpu_milli, memory_mib=task.memory_mib)
    if task.gpu_spec:
        request = replace(request, host_selector={spec_label(task.gpu_spec): "yes"})
    return request


def fleet_of(nodes: Sequence[Node], specs: set[tuple[str, ...]]) -> ClusterSnapshot:
    """The empty cluster of these nodes, labelled for every ``gpu_spec`` in ``specs``."""
    inventories = build_trace_fleet([TraceNode(n.sn, n.gpus, n.model) for n in nodes])
    by_sn = {n.sn: n for n in nodes}
    for inv in inventories:
        # The node's CPUs and memory, as its agent would report them: split
        # over the fixture's NUMA nodes (the devices name those nodes).
        node, numa = by_sn[inv.host_id], inv.numa_nodes
        cpus, first = node.cpu_milli // 1000, 0
        for k, numa_node in enumerate(numa):
            mine = cpus // len(numa) + (1 if k < cpus % len(numa) else 0)
            numa_node.cpulist = f"{first}-{first + mine - 1}" if mine else ""
            numa_node.memory_kib = node.memory_mib * 1024 // len(numa)
            first += mine
        for spec in specs:
            if by_sn[inv.host_id].model in spec:
                inv.labels[spec_label(spec)] = "yes"
    return snapshot(inventories)


def run(
    quick: bool,
    *,
    traces: Sequence[str] = tuple(TRACES),
    seeds: int = 3,
    share: int = 1,
    only: Sequence[str] = (),
    ablations: bool = False,
    budgets: bool = True,
) -> dict[str, Any]:
    """Every trace x seed x policy; see the module doc.

    Args:
        quick: a twentieth of the nodes, one seed.
        traces: :data:`TRACES` keys.
        seeds: seeds per trace.
        share: keep one node in ``share`` (seeded), arrivals scaled to them.
        only: policies to run (empty: all).
        ablations: also Tessera's scorer ablations (see :func:`policies`).
        budgets: charge tasks' CPU and memory to their nodes.
    """
    started = time.perf_counter()
    all_nodes = load_nodes()
    if quick:
        share, seeds = max(share, 20), 1
    out: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "share": share,
        "budgets": budgets,
        "traces": {},
    }
    for trace in traces:
        tasks = load_tasks(TRACE_DIR / TRACES[trace])
        mix = task_mix(tasks)
        runs: dict[str, list[dict[str, Any]]] = {}
        for s in range(seeds):
            seed = 1000 + s
            rng = random.Random(seed)
            nodes = (
                sorted(rng.sample(all_nodes, len(all_nodes) // share), key=lambda n: n.sn)
                if share > 1
                else list(all_nodes)
            )
            base = fleet_of(nodes, {t.gpu_spec for t in tasks if t.gpu_spec})
            arrivals = sample_arrivals(tasks, sum(n.gpus for n in nodes), seed)
            for name, make in policies(mix, seed, ablations=ablations).items():
                if only and name not in only:
                    continue
                result = fill(
                    name, make, base=base, nodes=nodes, arrivals=arrivals, mix=mix, budgets=budgets
                )
                runs.setdefault(name, []).append(result | {"seed": seed, "hosts": len(nodes)})
                at100 = result["levels"]["100"]
                print(
                    f"  {trace} seed {seed} {name}: unallocated {at100['unallocated']:.4f} "
                    f"fragmented {at100['fragmented']:.4f} accepted {result['accepted']}/"
                    f"{result['arrivals']} in {result['wall_s']} s",
                    flush=True,
                )
        out["traces"][trace] = {"mix": {repr(k): round(v, 4) for k, v in mix.items()}, "runs": runs}
    out["total_s"] = round(time.perf_counter() - started, 3)
    out["summary"] = summary(out)
    return out


def policy_cost(sizes: Sequence[tuple[int, int]] = ((1000, 300), (10000, 60))) -> dict[str, Any]:
    """Per request, Tessera's default against packing on the bench's mixed fleet, in process.

    Each ``(hosts, requests)``: a fleet of ``bench/fleet.py`` (seed 7) and
    that many of ``bench/engine.py``'s mixed requests (seed 11), placed one
    by one, each policy on its own copy of the fleet; p50 and p99 of a
    placement's time.
    """
    from bench.engine import commit, mixed_requests
    from bench.fleet import build_fleet

    out: dict[str, Any] = {}
    for hosts, n in sizes:
        base = snapshot(build_fleet(hosts, seed=7))
        requests = mixed_requests(n, random.Random(11), "c")
        for make in (TesseraPolicy, packing_policy):
            policy: Policy = make()
            snap, times, placed = base, [], 0
            for request in requests:
                started = time.perf_counter()
                result = policy.place(snap, request)
                times.append(time.perf_counter() - started)
                if isinstance(result, Plan):
                    snap, placed = commit(snap, request, result), placed + 1
            out[f"{hosts}/{policy.name}"] = latency_summary(times) | {
                "placed": placed,
                "requests": n,
            }
            print(f"  {hosts} hosts {policy.name}: {out[f'{hosts}/{policy.name}']}", flush=True)
    return out


def section(result: Mapping[str, Any], plots: Path) -> str:
    """The Markdown section of BENCHMARKS.md for a fill result (one table per trace)."""
    del plots  # tables only
    lines = [
        "The trace filled the way ATC'23 measures it (`bench/fill_replay.py`, see its docstring): "
        "GPU tasks sampled with replacement until 130% of the fleet's GPUs arrived, no departures, "
        "each node's CPU and memory a budget for every policy alike; unallocated GPU share "
        "(free capacity over all GPUs) read as the arrived workload passes each level, mean and "
        "spread (population standard deviation) over seeds. Lower is better; FGD is given the "
        "trace's task mix, Tessera learns it from the requests it places. A shared task takes "
        "a MIG profile or vGPU type at least its share of a GPU (a 0.5-GPU task a 4-slice "
        "instance, 4/7), so what it takes beyond its demand counts as allocated: a policy that "
        "packs shared tasks more exactly leaves more unallocated at a given arrived level. "
        "*Demand refused by 100%* is the share of the GPU demand arrived by then that was "
        "turned away: "
        "what the paper's measure reads where a task takes exactly its demand.",
        "",
        f"Fleet: {'a seeded 1/' + str(result['share']) + ' of' if result['share'] > 1 else 'all'} "
        f"the trace's 1,213 nodes; mode {result['mode']}; CPU and memory budgets "
        f"{'on' if result.get('budgets', True) else 'off (GPU geometry alone)'}.",
        "",
    ]
    for trace, rows in result["summary"].items():
        seeds = len(next(iter(result["traces"][trace]["runs"].values()), []))
        lines += [f"**{trace}** ({seeds} seeds)", ""]
        lines.append(
            "| policy | unallocated @50% | @70% | @90% | @100% | fragmented @100% "
            "| demand refused by 100% | GPU demand accepted |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for name, row in rows.items():
            cells = [
                f"{100 * row[f'unallocated@{lv}']:.2f}% ± {100 * row[f'unallocated@{lv}_sd']:.2f}"
                for lv in ("50", "70", "90", "100")
            ]
            lines.append(
                f"| {name} | " + " | ".join(cells) + f" | {100 * row['fragmented@100']:.2f}% "
                f"| {100 * row['refused@100']:.2f}% | {row['demand_accepted']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def summary(result: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per trace and policy: mean and spread over seeds of the figures at each level."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for trace, body in result["traces"].items():
        rows: dict[str, dict[str, float]] = {}
        for name, runs in body["runs"].items():
            row: dict[str, float] = {}
            for level in (str(round(x * 100)) for x in LEVELS):
                for key in ("unallocated", "fragmented"):
                    values = [r["levels"][level][key] for r in runs]
                    row[f"{key}@{level}"] = statistics.fmean(values)
                    row[f"{key}@{level}_sd"] = statistics.pstdev(values)
            demand = [r["gpu_demand_placed"] / r["gpu_demand"] for r in runs]
            row["demand_accepted"] = statistics.fmean(demand)
            # What the paper's measure reads where a task takes exactly its
            # demand: the GPU demand refused by the time 100% has arrived.
            refused = [1 - r["levels"]["100"]["demand_placed"] for r in runs]
            row["refused@100"] = statistics.fmean(refused)
            rows[name] = row
        out[trace] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the replay and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--share", type=int, default=1)
    parser.add_argument("--trace", action="append", choices=sorted(TRACES))
    parser.add_argument("--policy", action="append", default=[])
    parser.add_argument("--ablations", action="store_true", help="also Tessera's scorer ablations")
    parser.add_argument(
        "--no-budgets", action="store_true", help="nodes' CPU and memory without end"
    )
    parser.add_argument(
        "--cost",
        action="store_true",
        help="only what a request costs, Tessera's default against packing, at 1,000 and "
        "10,000 hosts (bench/out/fill_cost.json)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.share < 1:
        parser.error("--seeds and --share must be >= 1")
    if args.cost:
        cost = policy_cost()
        path = args.out or OUT / "fill_cost.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cost, indent=1))
        return 0
    result = run(
        args.quick,
        traces=args.trace or tuple(TRACES),
        seeds=args.seeds,
        share=args.share,
        only=args.policy,
        ablations=args.ablations,
        budgets=not args.no_budgets,
    )
    path = args.out or OUT / ("fill_replay_quick.json" if args.quick else "fill_replay.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
