"""(c) Contended batches: Tessera's CP-SAT batch against placing one by one with each policy.

Batches of 1,000 and 10,000 mixed requests (``bench/engine.py``
``mixed_requests``: 1 and 2 whole GPUs, GPU + NIC under one switch, MIG 1g,
2 VFs, an mdev, 8 whole GPUs; priorities 0..2) on a fleet of
``bench/fleet.py`` sized so the batch does not all fit (150 hosts for 1,000,
1,500 for 10,000). Tessera solves each batch jointly with ``solve_batch``
(CP-SAT, time limit 60 s, 2 workers); every policy of ``bench/policies.py``
places the same requests one by one in priority order (stable: request order
within a priority), committing each plan before the next.

The objective is ``solve_batch``'s: per placed request its value
(``scheduler.core.engine.batch_value.request_values``: priority rank times
GPU-equivalents, plus one unit for the request, in multiples of
``value_quantum``) plus its quality in ``[0, QUALITY_RANGE]``. Quality is a
column's engine score normalized over the batch's candidate columns, which a
sequential policy does not have; so for the policies the *value* is reported
(the objective without quality), comparable with the solver's objective
rounded down to a multiple of the quantum, and its bound likewise. The bound
holds for any placement of the batch (``scheduler.core.engine.batch_bound``:
capacity as well as candidate columns), so no policy's value exceeds it.

    PYTHONPATH=. .venv/bin/python bench/batches.py [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make ``bench`` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import commit, mixed_requests
from bench.fleet import build_fleet, snapshot
from bench.policies import POLICIES
from bench.report import bar_plot, table
from tessera.scheduler.core.checker import check_placements
from tessera.scheduler.core.engine.batch import BatchSettings, solve_batch
from tessera.scheduler.core.engine.batch_value import (
    gpu_equivalents_of,
    learn_gpu_units,
    request_values,
    value_quantum,
)
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.plan import Plan
from tessera.scheduler.core.request import PlacementRequest
from tessera.scheduler.core.snapshot import ClusterSnapshot

OUT = Path(__file__).parent / "out"
SEED = 20261125

#: (requests, hosts) per batch size, full run; and the quick run's.
FULL_CASES = ((1_000, 150), (10_000, 1_500))
QUICK_CASES = ((200, 30),)


def values(
    snap: ClusterSnapshot, requests: Sequence[PlacementRequest]
) -> tuple[dict[str, int], dict[str, float]]:
    """Per request id, the value ``solve_batch`` gives placing it, and its GPU-equivalents."""
    units = learn_gpu_units(snap, Engine().hardware_and_occupancy)
    gpus = gpu_equivalents_of(requests, units)
    ids = [r.request_id for r in requests]
    return (
        dict(zip(ids, request_values(requests, gpus), strict=True)),
        {rid: float(g) for rid, g in zip(ids, gpus, strict=True)},
    )


def sequential(
    policy_name: str, snap: ClusterSnapshot, requests: Sequence[PlacementRequest]
) -> dict[str, Any]:
    """Place ``requests`` one by one in priority order with a policy; its figures."""
    policy = POLICIES[policy_name]()
    order = sorted(range(len(requests)), key=lambda i: (-requests[i].priority, i))
    w, gpus = values(snap, requests)
    placed: list[tuple[PlacementRequest, Plan]] = []
    start = snap
    started = time.perf_counter()
    for i in order:
        request = requests[i]
        result = policy.place(snap, request)
        if isinstance(result, Plan):
            snap = commit(snap, request, result)
            placed.append((request, result))
    wall = time.perf_counter() - started
    return {
        "placed": len(placed),
        "placed_by_priority": _by_priority(r for r, _ in placed),
        "value": sum(w[r.request_id] for r, _ in placed),
        "gpu_equivalents": round(sum(gpus[r.request_id] for r, _ in placed), 3),
        "wall_s": round(wall, 3),
        "violations": len(check_placements(start, placed)),
    }


def _by_priority(requests: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in requests:
        out[str(r.priority)] = out.get(str(r.priority), 0) + 1
    return dict(sorted(out.items()))


def one_case(
    n_requests: int, n_hosts: int, time_limit_s: float, workers: int, seed: int
) -> dict[str, Any]:
    """One batch size: the solver's figures and every policy's."""
    snap = snapshot(build_fleet(n_hosts, seed))
    requests = mixed_requests(n_requests, random.Random(seed), "batch")
    w, _ = values(snap, requests)
    # Every value is a multiple of it; quality adds less than one.
    quantum = value_quantum(len(requests))
    started = time.perf_counter()
    solved = solve_batch(
        Engine(),
        snap,
        requests,
        BatchSettings(time_limit_s=time_limit_s, workers=workers, seed=seed),
    )
    wall = time.perf_counter() - started
    by_id = {r.request_id: r for r in requests}
    plans = [(by_id[rid], plan) for rid, plan in solved.plans.items()]
    gap = (solved.bound - solved.objective) / solved.bound if solved.bound else 0.0
    value = sum(w[r.request_id] for r, _ in plans)
    value_bound = solved.bound - solved.bound % quantum
    tessera = {
        "status": solved.status,
        "wall_s": round(wall, 3),
        "objective": solved.objective,
        "bound": solved.bound,
        "gap": gap,
        "greedy_objective": solved.greedy_objective,
        "placed": len(solved.plans),
        "placed_by_priority": _by_priority(r for r, _ in plans),
        "value": value,
        "gpu_equivalents": round(float(solved.gpu_equivalents), 3),
        # No placement's value exceeds the bound, a multiple of the quantum.
        "value_bound": value_bound,
        "value_gap": (value_bound - value) / value_bound if value_bound else 0.0,
        "columns": solved.columns,
        "violations": len(check_placements(snap, plans)),
    }
    print(f"  {n_requests} requests: tessera-batch {tessera['wall_s']} s", flush=True)
    policies = {}
    for name in POLICIES:
        policies[name] = sequential(name, snap, requests)
        print(f"  {n_requests} requests: {name} {policies[name]['wall_s']} s", flush=True)
    return {
        "requests": n_requests,
        "hosts": n_hosts,
        "time_limit_s": time_limit_s,
        "workers": workers,
        "tessera-batch": tessera,
        "policies": policies,
    }


def run(quick: bool, workers: int = 2) -> dict[str, Any]:
    """Every batch size (see the module docstring)."""
    started = time.perf_counter()
    cases = QUICK_CASES if quick else FULL_CASES
    limit = 5.0 if quick else 60.0
    result: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "cases": [one_case(n, h, limit, workers, SEED) for n, h in cases],
    }
    result["total_s"] = round(time.perf_counter() - started, 3)
    return result


def section(result: Mapping[str, Any], plots: Path) -> str:
    """The Markdown section of BENCHMARKS.md for the batch results."""
    parts = [
        "## (c) Contended batches: CP-SAT against one by one",
        "Mixed requests of `bench/engine.py` (whole GPUs, GPU + NIC under one switch, MIG, VFs, "
        "mdevs, 8-GPU requests; priorities 0..2) on a synthetic fleet too small for all of "
        "them. `tessera-batch` is `solve_batch` (CP-SAT, greedy seed as hint); the policies "
        "place the same requests one by one in priority order. Objective as `solve_batch` "
        "defines it: per placed request its value (priority rank x GPU-equivalents, plus one "
        "unit for the request; `scheduler/core/engine/batch_value.py`), then placement "
        "quality. The value is what the policies can be compared on, as quality is "
        "normalized over the solver's candidate columns; the value bound holds for any "
        "placement of the batch.",
    ]
    prefix = "batches-" + ("quick-" if result["mode"] == "quick" else "")
    for case in result["cases"]:
        t = case["tessera-batch"]
        parts.append(
            f"**{case['requests']:,} requests on {case['hosts']:,} hosts** (limit "
            f"{case['time_limit_s']} s, {case['workers']} workers): status {t['status']}, "
            f"objective {t['objective']:,} against bound {t['bound']:,} (gap {t['gap']:.3%}), "
            f"greedy seed {t['greedy_objective']:,}, {t['columns']:,} columns, "
            f"checker violations {t['violations']}; value {t['value']:,} against a value "
            f"bound of {t['value_bound']:,} (gap {t['value_gap']:.3%})."
        )
        rows: list[list[object]] = [
            [
                "tessera-batch",
                t["placed"],
                t["placed_by_priority"].get("2", 0),
                t["gpu_equivalents"],
                t["value"],
                t["wall_s"],
                t["violations"],
            ]
        ]
        rows += [
            [
                n,
                p["placed"],
                p["placed_by_priority"].get("2", 0),
                p["gpu_equivalents"],
                p["value"],
                p["wall_s"],
                p["violations"],
            ]
            for n, p in case["policies"].items()
        ]
        parts.append(
            table(
                [
                    "policy",
                    "placed",
                    "placed, priority 2",
                    "GPU-equivalents placed",
                    "value",
                    "wall s",
                    "violations",
                ],
                rows,
            )
        )
        parts.append(
            bar_plot(
                plots / f"{prefix}{case['requests']}.png",
                f"Requests placed of {case['requests']:,}",
                "placed",
                ["placed"],
                {str(r[0]): [float(str(r[1]))] for r in rows},
            )
        )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the batches, write JSON, print a summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200 requests, 30 hosts, 5 s limit")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--workers", type=int, default=2)
    opts = p.parse_args(argv)
    out = opts.out or OUT / ("batches-quick.json" if opts.quick else "batches.json")
    result = run(opts.quick, opts.workers)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for case in result["cases"]:
        t = case["tessera-batch"]
        print(
            f"{case['requests']} requests / {case['hosts']} hosts: tessera-batch {t['status']} "
            f"placed {t['placed']} gap {t['gap']:.3%} wall {t['wall_s']} s"
        )
        for n, r in case["policies"].items():
            print(f"  {n:10} placed {r['placed']} wall {r['wall_s']} s")
    print(f"total {result['total_s']} s; written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
