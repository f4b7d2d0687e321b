"""(d) Replay of the Alibaba 2023 GPU trace: acceptance, fragmentation and alignment per policy.

The trace is the public ``cluster-trace-gpu-v2023`` of Alibaba's clusterdata
(Weng et al., "Beware of Fragmentation: Scheduling GPU-Sharing Workloads with
Fragmentation Gradient Descent", USENIX ATC'23), copied with its attribution
into ``bench/workloads/alibaba-gpu-v2023/``: the node list (1,213 GPU nodes)
and the default pod list (8,152 tasks).

**Fleet.** One Tessera host per trace node, named by the node's ``sn``, with
the node's GPU count, derived from a fixture host's discovered inventory
(``bench/fleet.py`` ``fixture_inventory``) by keeping its first N GPUs in
address order (the rest of its PCIe tree, NICs and IOMMU groups kept; the
dropped GPUs' functions, groups and NVML entries removed). Trace GPU models
map to fixture GPU classes by what they can share (:data:`MODEL_CLASS`):

* ``G2`` (8 GPUs) -> ``hgx-8gpu`` (H100, MIG mode on), ``G3`` (8) ->
  ``dgx-a100`` (A100, MIG mode on): the anonymized models are taken as the
  MIG-capable generation. MIG mode on costs a GPU nothing whole: a MIG GPU
  with no instance can still be passed through.
* ``V100M16``, ``V100M32``, ``T4``, ``P100``, ``A10`` (no MIG; all vGPU
  capable) -> mdev GPUs: the topology of ``hgx-8gpu`` (8 GPUs),
  ``dgx-a100``'s first 4 (4 GPUs: 2 switches, 2 NUMA nodes) or ``vgpu`` (2
  GPUs, one per socket; 1 GPU: its first), NVML's MIG view removed and every
  GPU given the Tesla P4's vGPU types (the ``vgpu`` fixture's, single type per
  GPU as on pre-Ampere vGPU): P4-1Q (1/8 GPU), P4-2Q (1/4), P4-4C (1/2),
  P4-8C (1).

**Tasks.** ``num_gpu == 0`` tasks (CPU only) are skipped (counted). Whole-GPU
tasks (``gpu_milli == 1000``) become a passthrough claim of ``num_gpu`` GPUs
with ``numa_policy: preferred`` (so NUMA alignment can be measured; the
baselines, speaking DRA, drop the preference). Fractional tasks (``0 <
gpu_milli < 1000``) become one shared claim accepting both forms (isolation
SHARED): a MIG instance of the smallest profile with at least ``gpu_milli/1000``
of the GPU's 7 compute slices (1, 2, 3, 4 or 7 slices: H100 ``1g.10gb`` ...,
A100 ``1g.5gb`` ...), or the smallest P4 vGPU type whose share of the GPU is
at least ``gpu_milli/1000``. CPU and memory columns are not modelled (Tessera
places devices), nor ``gpu_spec`` (empty in the default list).

**Events.** Arrivals at ``creation_time``, departures at ``deletion_time``,
in time order, departures first at equal times; a task that does not fit on
arrival is rejected (counted, not queued), and its departure ignored.

**Metrics.** Acceptance (tasks, and GPU demand: ``num_gpu * gpu_milli``);
fragmentation sampled over time (:func:`host_fragment`, the ATC'23 measure);
MIG fragmentation (Tessera's ``fragmentation_score`` on GPUs in MIG use);
NUMA and PCIe-switch alignment of 2- and 4-GPU placements (8-GPU tasks take
a whole host and can align nowhere); wall time per policy; slot collisions
(a plan taking a slot already held: must be 0).

    PYTHONPATH=. .venv/bin/python bench/trace_replay.py [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make ``bench`` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fleet import fixture_inventory, snapshot
from bench.policies import POLICIES
from bench.report import bar_plot, line_plot, summary_ms, table
from tessera.scheduler.core.checker import check_placements
from tessera.scheduler.core.host import HostView
from tessera.scheduler.core.identity import HostId, PciAddress, PlacementId, RequestId, TenantName
from tessera.scheduler.core.mig_geometry import capacity, fragmentation_score
from tessera.scheduler.core.occupancy import DeviceMode, Occupancy, build_occupancy, mdev_free
from tessera.scheduler.core.plan import Plan, WholeDeviceAssignment
from tessera.scheduler.core.request import (
    Claim,
    DeviceForm,
    DeviceKind,
    Isolation,
    NumaPolicy,
    PlacementRequest,
)
from tessera.scheduler.core.snapshot import (
    ClusterSnapshot,
    HostState,
    with_release,
    with_reservation,
)
from tessera.v1 import inventory_pb2

TRACE_DIR = Path(__file__).parent / "workloads" / "alibaba-gpu-v2023"
NODES_FILE = "openb_node_list_gpu_node.csv"
TASKS_FILE = "openb_pod_list_default.csv"
OUT = Path(__file__).parent / "out"
SEED = 20230710

#: Trace GPU model -> how its GPUs share: "mig" (MIG-capable fixture GPU) or "mdev".
MODEL_CLASS: Mapping[str, str] = {
    "G2": "mig",
    "G3": "mig",
    "V100M16": "mdev",
    "V100M32": "mdev",
    "T4": "mdev",
    "P100": "mdev",
    "A10": "mdev",
}

#: MIG-capable models -> the fixture whose GPUs they get.
MIG_FIXTURE: Mapping[str, str] = {"G2": "hgx-8gpu", "G3": "dgx-a100"}

#: Compute slices (of 7) of the MIG profiles a shared task may take.
MIG_SLICES = (1, 2, 3, 4, 7)

#: Tesla P4 vGPU types (the ``vgpu`` fixture's), by instances per GPU: each
#: takes 1/instances of the GPU.
MDEV_TYPES: Mapping[int, str] = {8: "nvidia-63", 4: "nvidia-64", 2: "nvidia-288", 1: "nvidia-289"}

#: Fragmentation samples over the replay.
SAMPLES = 120


# ---------------------------------------------------------------- the trace


@dataclass(frozen=True)
class TraceNode:
    """One node of the trace's node list."""

    sn: str
    gpus: int
    model: str


@dataclass(frozen=True)
class TraceTask:
    """One task (pod) of the trace: GPU demand and lifetime (seconds)."""

    name: str
    num_gpu: int
    gpu_milli: int
    created: int
    deleted: int

    @property
    def gpu_demand(self) -> float:
        """GPUs' worth of demand: ``num_gpu * gpu_milli / 1000``."""
        return self.num_gpu * self.gpu_milli / 1000


def load_nodes(path: Path = TRACE_DIR / NODES_FILE) -> list[TraceNode]:
    """The trace's GPU nodes, in file order."""
    with path.open(newline="") as f:
        return [TraceNode(r["sn"], int(r["gpu"]), r["model"]) for r in csv.DictReader(f)]


def load_tasks(path: Path = TRACE_DIR / TASKS_FILE) -> list[TraceTask]:
    """Every task of the pod list, CPU-only ones included, in file order."""
    with path.open(newline="") as f:
        return [
            TraceTask(
                r["name"],
                int(r["num_gpu"]),
                int(r["gpu_milli"]),
                int(r["creation_time"]),
                int(r["deletion_time"]),
            )
            for r in csv.DictReader(f)
        ]


# ---------------------------------------------------------------- the fleet


def _gpu_addresses(inv: inventory_pb2.HostInventory) -> list[str]:
    """Whole GPUs (display class, not a VF) in address order."""
    return sorted(
        f.address for f in inv.pci_functions if f.class_code >> 16 == 0x03 and not f.physfn
    )


_DERIVED: dict[tuple[str, int, str], inventory_pb2.HostInventory] = {}


def derive_inventory(fixture: str, n_gpus: int, sharing: str) -> inventory_pb2.HostInventory:
    """Fixture ``fixture`` cut to its first ``n_gpus`` GPUs, sharing by MIG or mdev (cached).

    Args:
        fixture: a fixture host with at least ``n_gpus`` GPUs.
        n_gpus: GPUs to keep, lowest addresses first.
        sharing: "mig": MIG mode on for every kept GPU (the fixture must be
            MIG-capable); "mdev": NVML's MIG view dropped and every kept GPU
            given :data:`MDEV_TYPES` (single type per GPU).

    Raises:
        ValueError: the fixture has fewer GPUs, or cannot share that way.
    """
    key = (fixture, n_gpus, sharing)
    found = _DERIVED.get(key)
    if found is not None:
        return found
    inv = inventory_pb2.HostInventory()
    inv.CopyFrom(fixture_inventory(fixture))
    gpus = _gpu_addresses(inv)
    if len(gpus) < n_gpus:
        raise ValueError(f"{fixture} has {len(gpus)} GPUs, not {n_gpus}")
    dropped = set(gpus[n_gpus:])
    kept = gpus[:n_gpus]
    functions = [f for f in inv.pci_functions if f.address not in dropped]
    del inv.pci_functions[:]
    inv.pci_functions.extend(functions)
    groups = []
    for g in inv.iommu_groups:
        members = [m for m in g.members if m not in dropped]
        if members:
            del g.members[:]
            g.members.extend(members)
            groups.append(g)
    del inv.iommu_groups[:]
    inv.iommu_groups.extend(groups)
    if sharing == "mig":
        nvml = [g for g in inv.gpus if g.address in kept]
        if len(nvml) != n_gpus or not all(g.mig_profiles for g in nvml):
            raise ValueError(f"{fixture}: its GPUs are not MIG-capable")
        for gpu in nvml:
            gpu.mig_mode_current = inventory_pb2.MIG_MODE_ENABLED
            gpu.mig_mode_pending = inventory_pb2.MIG_MODE_ENABLED
        del inv.gpus[:]
        inv.gpus.extend(nvml)
        del inv.mdev_parents[:]
    elif sharing == "mdev":
        del inv.gpus[:]
        del inv.mdev_parents[:]
        for address in kept:
            parent = inv.mdev_parents.add(address=address, single_type=True)
            for per_gpu, type_id in MDEV_TYPES.items():
                parent.types.add(
                    id=type_id,
                    name=f"P4 1/{per_gpu}",
                    description=f"max_instance={per_gpu}",
                    available_instances=per_gpu,
                    device_api="vfio-pci",
                )
    else:
        raise ValueError(f"sharing must be 'mig' or 'mdev', not {sharing!r}")
    _DERIVED[key] = inv
    return inv


def fixture_for(node: TraceNode) -> tuple[str, int, str]:
    """``(fixture, GPUs kept, sharing)`` for a trace node."""
    sharing = MODEL_CLASS.get(node.model, "mdev")
    if sharing == "mig":
        return MIG_FIXTURE[node.model], node.gpus, "mig"
    if node.gpus > 4:
        return "hgx-8gpu", node.gpus, "mdev"
    if node.gpus > 2:
        return "dgx-a100", node.gpus, "mdev"
    return "vgpu", node.gpus, "mdev"


def build_trace_fleet(nodes: Sequence[TraceNode]) -> list[inventory_pb2.HostInventory]:
    """One inventory per trace node, ``host_id`` = the node's ``sn``."""
    fleet = []
    for node in nodes:
        fixture, n, sharing = fixture_for(node)
        inv = inventory_pb2.HostInventory()
        inv.CopyFrom(derive_inventory(fixture, n, sharing))
        inv.host_id = node.sn
        inv.boot_id = f"boot-{node.sn}"
        inv.labels["trace.model"] = node.model
        inv.labels["tessera.io/fixture"] = fixture
        fleet.append(inv)
    return fleet


# ---------------------------------------------------------------- task mapping


def mig_slices_for(milli: int) -> int:
    """Compute slices (of 7) of the smallest MIG profile with >= ``milli``/1000 of a GPU."""
    return next(s for s in MIG_SLICES if s * 1000 >= milli * 7)


def mdev_type_for(milli: int) -> str:
    """The P4 vGPU type with the smallest share >= ``milli``/1000 of a GPU."""
    return next(
        t for per_gpu, t in sorted(MDEV_TYPES.items(), reverse=True) if milli * per_gpu <= 1000
    )


def mig_profile_names(slices: int) -> frozenset[str]:
    """Per MIG fixture GPU model, its profile of ``slices`` compute slices with least memory."""
    names = set()
    for fixture in sorted(set(MIG_FIXTURE.values())):
        table = fixture_inventory(fixture).gpus[0].mig_profiles
        fitting = [p for p in table if p.slice_count == slices and "+" not in p.name]
        names.add(min(fitting, key=lambda p: p.memory_mib).name)
    return frozenset(names)


def task_class(task: TraceTask) -> tuple[str, int] | None:
    """What a task needs, as placement sees it: ("whole", GPUs) or ("shared", MIG slices)."""
    if task.num_gpu <= 0 or task.gpu_milli <= 0:
        return None
    if task.gpu_milli >= 1000:
        return ("whole", task.num_gpu)
    return ("shared", mig_slices_for(task.gpu_milli))


def request_of(task: TraceTask) -> PlacementRequest | None:
    """The placement request of a task, or None for a CPU-only task."""
    cls = task_class(task)
    if cls is None:
        return None
    rid, tenant = RequestId(task.name), TenantName(f"t-{task.name}")
    if cls[0] == "whole":
        claim = Claim("gpu", DeviceKind.GPU, task.num_gpu)
        return PlacementRequest(rid, tenant, (claim,), numa_policy=NumaPolicy.PREFERRED)
    # A task sharing several GPUs (num_gpu > 1, gpu_milli < 1000) does not
    # occur in the trace; it would take one slot per GPU.
    shared = Claim(
        "gpu",
        DeviceKind.GPU,
        task.num_gpu,
        forms=frozenset({DeviceForm.MIG, DeviceForm.MDEV}),
        mig_profiles=mig_profile_names(cls[1]),
        mdev_types=frozenset({mdev_type_for(task.gpu_milli)}),
        min_isolation=Isolation.SHARED,
    )
    return PlacementRequest(rid, tenant, (shared,))


# ---------------------------------------------------------------- fragmentation

#: A task class for the fragmentation measure: ("whole", GPUs) or ("shared", slices, mdev type).
FragClass = tuple[str, int, str]


def frag_classes(tasks: Iterable[TraceTask]) -> dict[FragClass, float]:
    """The trace's task mix: class -> popularity (share of GPU tasks)."""
    counts: Counter[FragClass] = Counter()
    for t in tasks:
        cls = task_class(t)
        if cls is None:
            continue
        kind, n = cls
        counts[(kind, n, mdev_type_for(t.gpu_milli) if kind == "shared" else "")] += 1
    total = sum(counts.values())
    return {c: n / total for c, n in sorted(counts.items())}


@dataclass(frozen=True)
class HostFrag:
    """Free GPU capacity of a host and the part of it the task mix cannot use."""

    gpus: int
    free: float
    fragmented: float
    mig_scores: tuple[float, ...]


def host_fragment(state: HostState, classes: Mapping[FragClass, float]) -> HostFrag:
    """The ATC'23 fragmentation of one host: ``F_n(M) = sum_m p_m F_n(m)``.

    Per GPU, its free capacity (1 untouched; 0 passed through; 1 - used
    compute slices / 7 in MIG use; 1 - the mdevs' shares in vGPU use). For a
    task class *m* of popularity *p_m*, the fragment ``F_n(m)`` is all the
    host's free capacity if *m* cannot go on the host at all (a whole-GPU
    task needing more untouched GPUs than are left), else the free capacity
    of the GPUs *m* cannot use (a whole-GPU task cannot use a GPU in shared
    use; a shared task cannot use a GPU where its profile has no placement
    left, whose vGPU type differs or is full, or a passed-through one). CPU
    and memory, which the paper also checks, are not modelled.
    """
    view = state.view
    occ = build_occupancy(state)
    free: dict[PciAddress, float] = {}
    untouched: list[PciAddress] = []
    for fn in view.whole_devices(DeviceKind.GPU):
        a = fn.address
        mode = occ.modes.get(a)
        if mode is None:
            free[a] = 1.0
            untouched.append(a)
        elif mode is DeviceMode.MIG and a in occ.mig_layouts:
            free[a] = 1 - occ.mig_layouts[a].used_compute / 7
        elif mode is DeviceMode.MDEV and a in view.mdev_parents:
            parent = view.mdev_parents[a]
            used = occ.mdev_used.get(a, {})
            share = sum(
                (Fraction(n, parent.types[t].max_instances) for t, n in used.items()), Fraction(0)
            )
            free[a] = float(max(Fraction(0), 1 - share))
        else:
            free[a] = 0.0
    total_free = sum(free.values())
    fragmented = 0.0
    for (kind, n, mdev_type), p in classes.items():
        if kind == "whole":
            if len(untouched) < n:
                fragmented += p * total_free
            else:
                fragmented += p * sum(f for a, f in free.items() if a not in untouched)
            continue
        names = mig_profile_names(n)
        lost = 0.0
        for address, f in free.items():
            if f > 0 and not _shared_fits(
                view, occ, address, names, mdev_type, untouched=address in untouched
            ):
                lost += f
        fragmented += p * lost
    scores = tuple(
        fragmentation_score(layout, view.gpus[a].mig_profiles)
        for a, layout in occ.mig_layouts.items()
        if layout.instances
    )
    return HostFrag(len(free), total_free, fragmented, scores)


def _shared_fits(
    view: HostView,
    occ: Occupancy,
    address: PciAddress,
    names: frozenset[str],
    mdev_type: str,
    *,
    untouched: bool,
) -> bool:
    gpu = view.gpus.get(address)
    parent = view.mdev_parents.get(address)
    if gpu is not None and gpu.mig_enabled:
        layout = occ.mig_layouts.get(address)
        if layout is None:
            return False
        profiles = [p for p in gpu.mig_profiles if p.name in names]
        return any(n > 0 for n in capacity(layout, profiles).values())
    if parent is not None and mdev_type in parent.types:
        if untouched:
            return True
        used = occ.mdev_used.get(address, {})
        return mdev_free(parent, mdev_type, used, occ.mdev_pending.get(address, {})) > 0
    return False


class FragMeter:
    """Cluster fragmentation, recomputing only hosts whose state changed."""

    def __init__(self, classes: Mapping[FragClass, float]) -> None:
        self.classes = classes
        self._memo: dict[HostId, tuple[HostState, HostFrag]] = {}

    def measure(self, snap: ClusterSnapshot) -> dict[str, float]:
        """Allocation and fragmentation rates of the whole cluster now."""
        gpus = free = fragmented = 0.0
        scores: list[float] = []
        for host_id, state in snap.hosts.items():
            memo = self._memo.get(host_id)
            if memo is None or memo[0] is not state:
                memo = (state, host_fragment(state, self.classes))
                self._memo[host_id] = memo
            h = memo[1]
            gpus += h.gpus
            free += h.free
            fragmented += h.fragmented
            scores.extend(h.mig_scores)
        return {
            "allocated": 1 - free / gpus if gpus else 0.0,
            "fragmented_of_free": fragmented / free if free else 0.0,
            "fragmented_of_all": fragmented / gpus if gpus else 0.0,
            "mig_fragmentation": sum(scores) / len(scores) if scores else 0.0,
            "mig_gpus_in_use": len(scores),
        }


# ---------------------------------------------------------------- replay


def events(tasks: Sequence[TraceTask], departures: bool = True) -> list[tuple[int, int, int]]:
    """``(time, 0 departure | 1 arrival, task index)`` in time order, departures first.

    Without departures (the ATC'23 evaluation's way: tasks arrive until the
    cluster is full), arrivals only, in creation order.
    """
    out = []
    for i, t in enumerate(tasks):
        out.append((t.created, 1, i))
        if departures:
            out.append((t.deleted, 0, i))
    out.sort()
    return out


def _aligned(view: HostView, plan: Plan) -> tuple[bool, bool]:
    """Whether a plan's whole GPUs share one NUMA node, and one PCIe switch."""
    addresses = [a.address for a in plan.assignments if isinstance(a, WholeDeviceAssignment)]
    numa = {view.functions[a].numa_node for a in addresses}
    switches = [set(view.functions[a].switches) for a in addresses]
    common = set.intersection(*switches) if switches else set()
    return len(numa) == 1, bool(common)


def replay(
    policy_name: str,
    snap: ClusterSnapshot,
    tasks: Sequence[TraceTask],
    classes: Mapping[FragClass, float],
    *,
    samples: int = SAMPLES,
    check: bool = False,
    departures: bool = True,
) -> dict[str, Any]:
    """Replay ``tasks`` (GPU tasks) on ``snap`` with one policy; its figures.

    Args:
        policy_name: a :data:`POLICIES` key.
        snap: the empty cluster.
        tasks: the tasks to replay; CPU-only ones must be filtered out.
        classes: the task mix for the fragmentation measure.
        samples: fragmentation samples, evenly spaced over the events.
        check: also verify every plan with the independent checker
            (``check_placements``) against the state it was made on.
        departures: release tasks at their deletion time; False: arrivals
            only, until the trace is exhausted (the cluster fills up).
    """
    policy = POLICIES[policy_name]()
    requests = [request_of(t) for t in tasks]
    meter = FragMeter(classes)
    evs = events(tasks, departures)
    every = max(1, len(evs) // samples)
    held: dict[int, tuple[HostId, PlacementId]] = {}
    accepted = rejected = collisions = violations = 0
    demand_asked = demand_placed = 0.0
    multi = numa_ok = switch_ok = 0
    by_class: dict[str, list[int]] = {}
    latencies: list[float] = []
    series: list[dict[str, float]] = []
    started = time.perf_counter()
    for k, (when, kind, i) in enumerate(evs):
        if kind == 0:
            if i in held:
                host_id, pid = held.pop(i)
                snap = with_release(snap, host_id, pid)
        else:
            request, task = requests[i], tasks[i]
            assert request is not None
            cls = task_class(task)
            key = f"{cls[0]}-{cls[1]}" if cls else "none"
            counts = by_class.setdefault(key, [0, 0])
            counts[0] += 1
            demand_asked += task.gpu_demand
            t0 = time.perf_counter()
            result = policy.place(snap, request)
            latencies.append(time.perf_counter() - t0)
            if isinstance(result, Plan):
                state = snap.hosts[result.host_id]
                collisions += sum(1 for s in result.slots if s in state.allocations)
                if check:
                    violations += len(check_placements(snap, [(request, result)]))
                pid = PlacementId(f"p:{task.name}")
                snap = with_reservation(snap, result.host_id, result.slots, pid, request.tenant)
                held[i] = (result.host_id, pid)
                accepted += 1
                counts[1] += 1
                demand_placed += task.gpu_demand
                if task.gpu_milli >= 1000 and 1 < task.num_gpu < 8:
                    multi += 1
                    numa, switch = _aligned(state.view, result)
                    numa_ok += numa
                    switch_ok += switch
            else:
                rejected += 1
        if k % every == 0 or k == len(evs) - 1:
            series.append({"t": when, "event": k, **meter.measure(snap)})
    wall = time.perf_counter() - started
    n = accepted + rejected

    def mean(key: str) -> float:
        return sum(s[key] for s in series) / len(series) if series else 0.0

    # Time averages over the busy part (allocation above half its peak): the
    # trace's start and end are a nearly empty cluster, fragmentation there
    # says little.
    peak = max((s["allocated"] for s in series), default=0.0)
    busy = [s for s in series if s["allocated"] >= peak / 2] or series
    return {
        "policy": policy_name,
        "tasks": n,
        "accepted": accepted,
        "rejected": rejected,
        "acceptance": accepted / n if n else 0.0,
        "gpu_demand": round(demand_asked, 3),
        "gpu_demand_placed": round(demand_placed, 3),
        "demand_acceptance": demand_placed / demand_asked if demand_asked else 0.0,
        "by_class": {k: {"tasks": v[0], "accepted": v[1]} for k, v in sorted(by_class.items())},
        "multi_gpu_placed": multi,
        "numa_aligned": numa_ok / multi if multi else 0.0,
        "switch_aligned": switch_ok / multi if multi else 0.0,
        "fragmented_of_free_busy_mean": sum(s["fragmented_of_free"] for s in busy) / len(busy),
        "fragmented_of_all_busy_mean": sum(s["fragmented_of_all"] for s in busy) / len(busy),
        "mig_fragmentation_mean": mean("mig_fragmentation"),
        "allocated_peak": peak,
        "slot_collisions": collisions,
        "checker_violations": violations if check else None,
        "wall_s": round(wall, 3),
        "place_latency": summary_ms(latencies),
        "series": series,
    }


def select(
    nodes: Sequence[TraceNode], tasks: Sequence[TraceTask], quick: bool, seed: int = SEED
) -> tuple[list[TraceNode], list[TraceTask], dict[str, Any]]:
    """The nodes and GPU tasks replayed, and how they were chosen.

    Full: every node and every GPU task. Quick: a seeded twentieth of the
    nodes and every twentieth GPU task by creation time, so the demand keeps
    its proportion to the fleet.
    """
    gpu_tasks = [t for t in tasks if task_class(t) is not None]
    info: dict[str, Any] = {
        "trace_tasks": len(tasks),
        "cpu_only_skipped": len(tasks) - len(gpu_tasks),
        "trace_nodes": len(nodes),
    }
    if not quick:
        info.update(nodes=len(nodes), tasks=len(gpu_tasks), sampling="none: the whole trace")
        return list(nodes), gpu_tasks, info
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(nodes)), len(nodes) // QUICK_SHARE))
    sub_nodes = [nodes[i] for i in picked]
    ordered = sorted(gpu_tasks, key=lambda t: (t.created, t.name))
    sub_tasks = ordered[::QUICK_SHARE]
    info.update(
        nodes=len(sub_nodes),
        tasks=len(sub_tasks),
        sampling=f"quick: a seeded 1/{QUICK_SHARE} of the nodes, every {QUICK_SHARE}th GPU task "
        "by creation time",
    )
    return sub_nodes, sub_tasks, info


#: Quick mode keeps 1 node and 1 task in this many.
QUICK_SHARE = 20
#: The timed replay (with departures) of the full run keeps 1 task in this many:
#: it never loads the cluster beyond ~1% (see the section), so more tasks add time only.
TIMED_SHARE = 6


def run(
    quick: bool, policies: Sequence[str] | None = None, check: bool | None = None
) -> dict[str, Any]:
    """Replay the trace with every policy, filling and timed (see the module docstring)."""
    started = time.perf_counter()
    nodes, tasks, info = select(load_nodes(), load_tasks(), quick)
    fleet = build_trace_fleet(nodes)
    snap = snapshot(fleet)
    classes = frag_classes(tasks)
    mapping = Counter(f"{n.gpus}x {n.model} -> {'/'.join(map(str, fixture_for(n)))}" for n in nodes)
    timed_tasks = tasks[::TIMED_SHARE]
    result: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "selection": info,
        "timed_tasks": len(timed_tasks),
        "fleet": {
            "hosts": len(fleet),
            "gpus": sum(n.gpus for n in nodes),
            "mapping": dict(sorted(mapping.items())),
        },
        "task_mix": {
            f"{c[0]}-{c[1]}{'-' + c[2] if c[2] else ''}": round(p, 4) for c, p in classes.items()
        },
        "policies": {},
        "timed": {},
    }
    checked = quick if check is None else check
    for name in policies or list(POLICIES):
        fill = replay(name, snap, tasks, classes, check=checked, departures=False)
        result["policies"][name] = fill
        # The checker runs on the filling replay only: it is where plans meet
        # crowded hosts, and checking both would double the quick run.
        timed = replay(name, snap, timed_tasks, classes, samples=40)
        result["timed"][name] = timed
        print(f"  {name}: filling {fill['wall_s']} s, timed {timed['wall_s']} s", flush=True)
    result["total_s"] = round(time.perf_counter() - started, 3)
    return result


# ---------------------------------------------------------------- report


def section(result: Mapping[str, Any], plots: Path) -> str:
    """The Markdown section of BENCHMARKS.md for a replay result."""
    sel, fleet, pols = result["selection"], result["fleet"], result["policies"]
    names = list(pols)
    prefix = "trace-" + ("quick-" if result["mode"] == "quick" else "")
    rows = [
        [
            n,
            p["tasks"],
            p["acceptance"],
            p["demand_acceptance"],
            p["fragmented_of_free_busy_mean"],
            p["fragmented_of_all_busy_mean"],
            p["mig_fragmentation_mean"],
            p["numa_aligned"],
            p["switch_aligned"],
            p["multi_gpu_placed"],
            p["place_latency"]["mean_ms"],
            p["wall_s"],
        ]
        for n, p in pols.items()
    ]
    frag_plot = line_plot(
        plots / f"{prefix}fragmentation.png",
        "Unallocated GPU capacity that is fragmented",
        "GPUs allocated (share of all)",
        "fragmented share of free",
        {
            n: sorted((s["allocated"], s["fragmented_of_free"]) for s in p["series"])
            for n, p in pols.items()
        },
    )
    accept_plot = bar_plot(
        plots / f"{prefix}acceptance.png",
        "Acceptance on the Alibaba 2023 trace",
        "share accepted",
        ["tasks", "GPU demand", "NUMA aligned", "switch aligned"],
        {
            n: [p["acceptance"], p["demand_acceptance"], p["numa_aligned"], p["switch_aligned"]]
            for n, p in pols.items()
        },
    )
    mapping_rows = [[k, v] for k, v in fleet["mapping"].items()]
    mix_rows = [[k, v] for k, v in result["task_mix"].items()]
    class_rows = (
        [
            [c, pols[names[0]]["by_class"][c]["tasks"]]
            + [pols[n]["by_class"].get(c, {}).get("accepted", 0) for n in names]
            for c in pols[names[0]]["by_class"]
        ]
        if names
        else []
    )
    return "\n\n".join(
        [
            "## (d) Alibaba GPU trace replay",
            "The public Alibaba `cluster-trace-gpu-v2023` (Weng et al., *Beware of Fragmentation*, "
            "USENIX ATC'23; CC BY 4.0, see `bench/workloads/alibaba-gpu-v2023/ATTRIBUTION.md`), "
            "replayed in time order on a Tessera fleet mirroring its nodes. "
            f"{sel['nodes']:,} of {sel['trace_nodes']:,} nodes ({fleet['gpus']:,} GPUs), "
            f"{sel['tasks']:,} GPU tasks; {sel['cpu_only_skipped']:,} of the "
            f"{sel['trace_tasks']:,} tasks are CPU-only and skipped. Sampling: {sel['sampling']}.",
            "**Nodes -> hosts** (trace GPUs x model -> fixture / GPUs kept / sharing): a fixture "
            "host's discovered inventory cut to its first N GPUs. `G2`, `G3` (anonymized) are "
            "taken as MIG-capable (H100 of `hgx-8gpu`, A100 of `dgx-a100`, MIG mode on: a GPU "
            "without instances still passes through whole); V100, T4, P100, A10 GPUs get the "
            "Tesla P4 vGPU types (1/8, 1/4, 1/2, 1 GPU; one type per GPU).",
            table(["trace nodes", "hosts"], mapping_rows),
            "**Tasks -> requests**: `gpu_milli == 1000` -> a passthrough claim of `num_gpu` GPUs, "
            "`numa_policy: preferred` (dropped for the baselines, which speak DRA); "
            "`0 < gpu_milli < 1000` -> one shared claim accepting a MIG instance of the smallest "
            "profile with at least `gpu_milli/1000` of the 7 compute slices or the smallest P4 "
            "vGPU type with at least that share. CPU and memory are not modelled. Arrivals at "
            "`creation_time`, departures at `deletion_time` (first at equal times); a task that "
            "does not fit is rejected, not queued.",
            "**Fragmentation** (the ATC'23 measure): per host, the expected fragment over the "
            "task mix below, `F_n = sum_m p_m F_n(m)`, where `F_n(m)` is all the host's free "
            "GPU capacity if task class m cannot go there at all, else the free capacity of the "
            "GPUs m cannot use (a whole-GPU task: GPUs in shared use; a shared task: GPUs where "
            "its MIG profile has no placement left or whose vGPU type differs or is full, "
            "passed-through GPUs). Free capacity: 1 for an untouched GPU, 1 - used compute "
            "slices / 7 in MIG use, 1 - mdev shares in vGPU use. Reported as the share of free "
            "capacity that is fragmented (and of all GPUs), averaged over the samples where "
            "allocation is at least half its peak; MIG fragmentation is Tessera's "
            "`fragmentation_score` (largest profile placeable now against after an ideal "
            "repacking) averaged over GPUs in MIG use. Alignment: 2- and 4-GPU placements "
            "with every GPU on one NUMA node / under one PCIe switch.",
            table(["task class", "share"], mix_rows),
            table(
                [
                    "policy",
                    "tasks",
                    "accepted",
                    "GPU demand accepted",
                    "fragmented / free",
                    "fragmented / all GPUs",
                    "MIG frag.",
                    "NUMA aligned",
                    "switch aligned",
                    "multi-GPU placed",
                    "mean place ms",
                    "wall s",
                ],
                rows,
            ),
            table(["class", "tasks", *[f"{n} accepted" for n in names]], class_rows),
            accept_plot,
            frag_plot,
            "Slot collisions (a plan taking a held slot) per policy: "
            + ", ".join(f"{n} {p['slot_collisions']}" for n, p in pols.items())
            + (
                "; independent checker violations: "
                + ", ".join(f"{n} {p['checker_violations']}" for n, p in pols.items())
                if any(p["checker_violations"] is not None for p in pols.values())
                else ""
            )
            + ".",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run the replay, write JSON, print a summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a sample of nodes and tasks, for CI")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--policy", action="append", help="only these policies (repeatable)")
    opts = p.parse_args(argv)
    out = opts.out or OUT / ("trace_replay-quick.json" if opts.quick else "trace_replay.json")
    result = run(opts.quick, opts.policy)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["policies"].items():
        print(
            f"{name:10} accepted {r['acceptance']:.3f} (demand {r['demand_acceptance']:.3f})"
            f"  frag/free {r['fragmented_of_free_busy_mean']:.3f}"
            f"  MIG frag {r['mig_fragmentation_mean']:.3f}  NUMA {r['numa_aligned']:.2f}"
            f"  switch {r['switch_aligned']:.2f}  wall {r['wall_s']} s"
        )
    print(f"total {result['total_s']} s; written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
