"""Placement engine on a synthetic fleet: single-request latency and a solved batch.

(a) Latency of the pure fast path, ``Engine().schedule(snapshot, request)``, in
process, on fleets of 1,000 and 10,000 hosts (bench/fleet.py: clones of the
fixture hosts, some GPUs in MIG mode), for six request shapes, on the empty
cluster and on a partially filled one (a few hundred mixed requests placed
first with the same engine and ``with_reservation``). The first call on a
fresh engine builds every host's index and is reported apart; the steady
state is >= 50 calls per shape, shapes interleaved, each plan committed to
the snapshot (untimed) before the next call, as a live scheduler would.

(c) A batch of mixed requests solved jointly with ``solve_batch`` (CP-SAT),
against the greedy seed alone (``use_solver=False``), and both results checked
by the independent checker (``check_placements``); violations must be 0.

Writes JSON (default bench/out/engine.json) and prints a short report.
Asserts nothing about time.

    .venv/bin/python bench/engine.py [--quick] [--out bench/out/engine.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make ``bench`` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import latency_summary
from bench.fleet import build_fleet, describe, fixture_inventory, snapshot
from bench.report import git_state, machine
from tessera.scheduler.core.checker import check_placements
from tessera.scheduler.core.engine.batch import BatchResult, BatchSettings, solve_batch
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.identity import PlacementId, RequestId, TenantName
from tessera.scheduler.core.plan import Plan
from tessera.scheduler.core.request import (
    Affinity,
    AffinityScope,
    Claim,
    DeviceForm,
    DeviceKind,
    Isolation,
    NumaPolicy,
    PlacementRequest,
)
from tessera.scheduler.core.snapshot import ClusterSnapshot, with_reservation

OUT = Path(__file__).parent / "out"
SEED = 20261124

# ---------------------------------------------------------------- requests


def _req(rid: str, tenant: str, *claims: Claim, **kw: Any) -> PlacementRequest:
    return PlacementRequest(RequestId(rid), TenantName(tenant), tuple(claims), **kw)


def gpu_1(rid: str, tenant: str) -> PlacementRequest:
    """One whole GPU."""
    return _req(rid, tenant, Claim("gpu", DeviceKind.GPU, 1))


def gpu_2_numa(rid: str, tenant: str) -> PlacementRequest:
    """Two whole GPUs on one NUMA node."""
    return _req(
        rid, tenant, Claim("gpu", DeviceKind.GPU, 2), numa_policy=NumaPolicy.SINGLE_NUMA_NODE
    )


def gpu_nic_switch(rid: str, tenant: str) -> PlacementRequest:
    """A whole GPU and a whole NIC under one PCIe switch (required)."""
    return _req(
        rid,
        tenant,
        Claim("gpu", DeviceKind.GPU, 1),
        Claim("nic", DeviceKind.NIC, 1),
        affinities=(Affinity("gpu", "nic", AffinityScope.SAME_SWITCH, required=True),),
    )


def mig_1g(rid: str, tenant: str) -> PlacementRequest:
    """One MIG 1g.10gb instance."""
    claim = Claim(
        "mig",
        DeviceKind.GPU,
        1,
        forms=frozenset({DeviceForm.MIG}),
        mig_profiles=frozenset({"1g.10gb"}),
        min_isolation=Isolation.PARTITIONED,
    )
    return _req(rid, tenant, claim)


def vf_2(rid: str, tenant: str) -> PlacementRequest:
    """Two SR-IOV VFs of NICs."""
    claim = Claim(
        "vf", DeviceKind.NIC, 2, forms=frozenset({DeviceForm.VF}), min_isolation=Isolation.SHARED
    )
    return _req(rid, tenant, claim)


def mdev_1(rid: str, tenant: str) -> PlacementRequest:
    """One mediated device (vGPU) of any type."""
    claim = Claim(
        "vgpu",
        DeviceKind.GPU,
        1,
        forms=frozenset({DeviceForm.MDEV}),
        min_isolation=Isolation.SHARED,
    )
    return _req(rid, tenant, claim)


def gpu_8(rid: str, tenant: str) -> PlacementRequest:
    """Eight whole GPUs (a whole HGX or DGX host); used for fill and batch only."""
    return _req(rid, tenant, Claim("gpu", DeviceKind.GPU, 8))


Shape = Callable[[str, str], PlacementRequest]

#: The shapes whose single-request latency is measured.
SHAPES: Mapping[str, Shape] = {
    "1-gpu": gpu_1,
    "2-gpu-single-numa": gpu_2_numa,
    "gpu+nic-same-switch": gpu_nic_switch,
    "mig-1g.10gb": mig_1g,
    "2-vf": vf_2,
    "1-mdev": mdev_1,
}

#: Shares of shapes in fill traffic and in the batch.
MIXED: Mapping[str, tuple[Shape, float]] = {
    "1-gpu": (gpu_1, 0.25),
    "2-gpu-single-numa": (gpu_2_numa, 0.15),
    "gpu+nic-same-switch": (gpu_nic_switch, 0.15),
    "mig-1g.10gb": (mig_1g, 0.15),
    "2-vf": (vf_2, 0.12),
    "1-mdev": (mdev_1, 0.10),
    "8-gpu": (gpu_8, 0.08),
}

TENANTS = 24


def mixed_requests(n: int, rng: random.Random, prefix: str) -> list[PlacementRequest]:
    """``n`` requests of the mixed shapes, random tenants and priorities 0..2."""
    names = list(MIXED)
    weights = [MIXED[k][1] for k in names]
    out = []
    for i in range(n):
        name = rng.choices(names, weights)[0]
        request = MIXED[name][0](f"{prefix}-{i:05d}-{name}", f"tenant-{rng.randrange(TENANTS):02d}")
        out.append(_with_priority(request, rng.choice((0, 0, 0, 1, 2))))
    return out


def _with_priority(request: PlacementRequest, priority: int) -> PlacementRequest:
    return PlacementRequest(
        request.request_id,
        request.tenant,
        request.claims,
        priority=priority,
        numa_policy=request.numa_policy,
        affinities=request.affinities,
        exclusivity=request.exclusivity,
        host_selector=request.host_selector,
    )


# ---------------------------------------------------------------- figures


def commit(snap: ClusterSnapshot, request: PlacementRequest, plan: Plan) -> ClusterSnapshot:
    """The snapshot after ``plan`` commits."""
    return with_reservation(
        snap, plan.host_id, plan.slots, PlacementId(f"p:{request.request_id}"), request.tenant
    )


def fill(
    snap: ClusterSnapshot, n: int, rng: random.Random
) -> tuple[ClusterSnapshot, dict[str, Any]]:
    """Place ``n`` mixed requests one by one; the snapshot after, and counts."""
    engine = Engine()
    placed = 0
    started = time.perf_counter()
    for request in mixed_requests(n, rng, "fill"):
        result = engine.schedule(snap, request)
        if isinstance(result, Plan):
            snap = commit(snap, request, result)
            placed += 1
    busy = sum(1 for state in snap.hosts.values() if state.allocations)
    slots = sum(len(state.allocations) for state in snap.hosts.values())
    return snap, {
        "requests": n,
        "placed": placed,
        "hosts_in_use": busy,
        "slots_taken": slots,
        "wall_s": round(time.perf_counter() - started, 3),
    }


class GcPauses:
    """Full (generation 2) collections and their pauses while active."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._started = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif info["generation"] == 2:
            self.pauses.append(time.perf_counter() - self._started)

    def figures(self) -> dict[str, float]:
        """Count, longest and total pause in ms."""
        return {
            "gen2_collections": len(self.pauses),
            "max_pause_ms": round(max(self.pauses, default=0.0) * 1000, 3),
            "total_pause_ms": round(sum(self.pauses) * 1000, 3),
        }


def latency(snap: ClusterSnapshot, per_shape: int) -> dict[str, Any]:
    """First call (index build) and steady-state latency per shape on ``snap``.

    Full garbage collections during the calls are counted: on large fleets
    their pauses, not the engine, make the p99.
    """
    with GcPauses() as pauses:
        figures = _latency(snap, per_shape)
    return {**figures, "gc": pauses.figures()}


def _latency(snap: ClusterSnapshot, per_shape: int) -> dict[str, Any]:
    engine = Engine()
    first_request = gpu_1("first", "tenant-first")
    started = time.perf_counter()
    first = engine.schedule(snap, first_request)
    first_s = time.perf_counter() - started
    samples: dict[str, list[float]] = {name: [] for name in SHAPES}
    placed: dict[str, int] = dict.fromkeys(SHAPES, 0)
    for rep in range(per_shape):
        for name, shape in SHAPES.items():
            request = shape(f"{name}-{rep:04d}", f"tenant-{rep % TENANTS:02d}")
            t0 = time.perf_counter()
            result = engine.schedule(snap, request)
            samples[name].append(time.perf_counter() - t0)
            if isinstance(result, Plan):
                placed[name] += 1
                snap = commit(snap, request, result)
    return {
        "first_call_ms": round(first_s * 1000, 3),
        "first_call_placed": isinstance(first, Plan),
        "shapes": {
            name: {**latency_summary(samples[name]), "placed": placed[name]} for name in SHAPES
        },
    }


def bench_latency(
    sizes: Sequence[int], per_shape: int, fill_requests: int, seed: int
) -> dict[str, Any]:
    """Latency figures per fleet size, empty and partially filled."""
    out: dict[str, Any] = {}
    for n in sizes:
        t0 = time.perf_counter()
        fleet = build_fleet(n, seed)
        t1 = time.perf_counter()
        empty = snapshot(fleet)
        t2 = time.perf_counter()
        # Long-lived host views out of the collector's way, as the scheduler
        # does after parsing new inventories (PlacementCoordinator.snapshot).
        gc.freeze()
        # Empty first: its first call meets views fresh from snapshot_of (cold).
        # The filled run's engine is fresh too, but the views the fill used
        # are shared with the empty snapshot, as in a live scheduler.
        on_empty = latency(empty, per_shape)
        filled, fill_info = fill(empty, fill_requests, random.Random(seed + n))
        entry: dict[str, Any] = {
            "fleet": describe(fleet),
            "build_fleet_s": round(t1 - t0, 3),
            "snapshot_of_s": round(t2 - t1, 3),
            "fill": fill_info,
            "empty": on_empty,
            "filled": latency(filled, per_shape),
        }
        out[str(n)] = entry
        print(f"  {n} hosts done ({time.perf_counter() - t0:.1f} s)", flush=True)
    return out


def _batch_figures(
    snap: ClusterSnapshot, requests: Sequence[PlacementRequest], result: BatchResult
) -> dict[str, Any]:
    by_id = {r.request_id: r for r in requests}
    started = time.perf_counter()
    violations = check_placements(snap, [(by_id[rid], plan) for rid, plan in result.plans.items()])
    gap = (result.bound - result.objective) / result.bound if result.bound else 0.0
    return {
        "status": result.status,
        "wall_s": round(result.wall_s, 3),
        "objective": result.objective,
        "bound": result.bound,
        "gap": round(gap, 6),
        "greedy_objective": result.greedy_objective,
        "placed": len(result.plans),
        "unplaced": len(result.unplaced),
        "columns": result.columns,
        "violations": len(violations),
        "violation_samples": [str(v) for v in violations[:5]],
        "check_s": round(time.perf_counter() - started, 3),
    }


def bench_batch(
    n_hosts: int, n_requests: int, time_limit_s: float, workers: int, seed: int
) -> dict[str, Any]:
    """One mixed batch on an empty fleet: greedy seed alone, then solved."""
    snap = snapshot(build_fleet(n_hosts, seed))
    requests = mixed_requests(n_requests, random.Random(seed), "batch")
    greedy = solve_batch(
        Engine(), snap, requests, BatchSettings(use_solver=False, workers=workers, seed=seed)
    )
    started = time.perf_counter()
    solved = solve_batch(
        Engine(),
        snap,
        requests,
        BatchSettings(time_limit_s=time_limit_s, workers=workers, seed=seed),
    )
    wall = time.perf_counter() - started
    shapes: dict[str, int] = {}
    for r in requests:
        key = r.request_id.split("-", 2)[2]
        shapes[key] = shapes.get(key, 0) + 1
    return {
        "hosts": n_hosts,
        "requests": n_requests,
        "shape_mix": dict(sorted(shapes.items())),
        "time_limit_s": time_limit_s,
        "workers": workers,
        "solver": {**_batch_figures(snap, requests, solved), "wall_clock_s": round(wall, 3)},
        "greedy_only": _batch_figures(snap, requests, greedy),
    }


# ---------------------------------------------------------------- main


def report(result: Mapping[str, Any]) -> None:
    """The short printed report."""
    m = result["machine"]
    print(f"machine: {m['cpu_model']}, {m['cpu_count']} CPUs, Python {m['python']}")
    print("fast path schedule(), ms (first call = index build):")
    for n, entry in result["latency"].items():
        print(
            f"  {n} hosts: fleet {entry['build_fleet_s']} s, snapshot_of {entry['snapshot_of_s']}"
            f" s, fill {entry['fill']['placed']}/{entry['fill']['requests']} placed"
        )
        for state in ("empty", "filled"):
            lat = entry[state]
            g = lat["gc"]
            print(
                f"    {state:6} first call {lat['first_call_ms']:9.1f}   full GCs during calls:"
                f" {g['gen2_collections']}, longest {g['max_pause_ms']:.1f}"
            )
            for name, s in lat["shapes"].items():
                print(
                    f"      {name:22} p50 {s['p50_ms']:8.2f}  p99 {s['p99_ms']:8.2f}"
                    f"  mean {s['mean_ms']:8.2f}  placed {s['placed']}/{s['n']}"
                )
    b = result["batch"]
    print(
        f"batch: {b['requests']} requests on {b['hosts']} hosts, "
        f"limit {b['time_limit_s']} s, {b['workers']} workers"
    )
    for key in ("greedy_only", "solver"):
        s = b[key]
        print(
            f"  {key:11} {s['status']:8} wall {s['wall_s']:7.2f} s  objective {s['objective']}"
            f"  bound {s['bound']}  gap {s['gap']:.4%}  placed {s['placed']}"
            f"  columns {s['columns']}  violations {s['violations']}"
        )
    print(f"  greedy objective {b['solver']['greedy_objective']}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, write JSON, print the report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, for CI")
    p.add_argument("--out", type=Path, default=OUT / "engine.json")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument(
        "--batch-only",
        type=int,
        metavar="HOSTS",
        help="only the batch of 1,000 requests, on this many hosts (e.g. 150: contended)",
    )
    opts = p.parse_args(argv)
    if opts.batch_only:
        batch = bench_batch(opts.batch_only, 1_000, 30.0, opts.workers, opts.seed)
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps({"batch": batch}, indent=2) + "\n")
        for label in ("greedy_only", "solver"):
            print(label, batch[label])
        return 0
    if opts.quick:
        sizes, per_shape, fill_n = [200], 50, 100
        batch_hosts, batch_requests, limit = 200, 200, 5.0
    else:
        sizes, per_shape, fill_n = [1_000, 10_000], 50, 400
        batch_hosts, batch_requests, limit = 1_000, 1_000, 30.0
    started = time.perf_counter()
    for name in ("hgx-8gpu", "dgx-a100", "virt-2s", "sriov-nic", "vgpu"):
        fixture_inventory(name)
    discover_s = time.perf_counter() - started
    print(f"fixtures discovered in {discover_s:.2f} s", flush=True)
    result: dict[str, Any] = {
        "mode": "quick" if opts.quick else "full",
        "seed": opts.seed,
        "machine": machine(),
        "git": git_state(),
        "fixture_discovery_s": round(discover_s, 3),
        "latency": bench_latency(sizes, per_shape, fill_n, opts.seed),
    }
    print("batch ...", flush=True)
    result["batch"] = bench_batch(batch_hosts, batch_requests, limit, opts.workers, opts.seed)
    result["total_s"] = round(time.perf_counter() - started, 3)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    print(f"written {opts.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
