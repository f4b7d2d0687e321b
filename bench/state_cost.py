"""What the cluster state costs: build time and memory at 12,500 hosts, and one host's update.

Measured on the seeded default fleet (bench/fleet.py; quick: 1,000 hosts),
stage by stage as the scheduler builds it:

* parse: every inventory into the scheduler's host view
  (``host_view_from_inventory``, what ``snapshot_of`` and the coordinator run);
* snapshot: the ``ClusterSnapshot`` of those views;
* engine indexes: what each policy's engine builds on its first request on
  the empty snapshot (Tessera indexes every host; a first-fit baseline stops
  at the first host that fits);
* topology graph: the ``networkx`` graph (``TopologyGraph.upsert_host``) of
  one host of each hardware class, and extrapolated to the fleet's mix.

Time is measured untraced; memory twice: the RSS delta of the untraced pass
(``/proc/self/statm``; pymalloc keeps freed arenas, so a delta can be low
when memory freed earlier is reused) and the ``tracemalloc`` peak of a second
traced pass (slower, not timed). The baselines share the snapshot and host
views with Tessera (same ``Engine`` filters, unscored): parse, snapshot and
graph costs are theirs too; only the engine's indexes differ.

One host's update, p50/p99 over repeated samples: a new inventory for one
host (re-parse + a new snapshot with that host replaced), and one commit
(``with_reservation``: copy-on-write of the snapshot's host map).

    PYTHONPATH=. .venv/bin/python bench/state_cost.py [--quick] [--out bench/out/state_cost.json]
"""

from __future__ import annotations

import gc
import os
import sys
import time
import tracemalloc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):
    # Run as a script: make ``bench`` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.engine import gpu_1
from bench.fleet import DEFAULT_MIX, FIXTURE_LABEL, build_fleet, fixture_inventory
from bench.policies import POLICIES
from tessera.scheduler.core.identity import HostId, PlacementId, SlotKey, TenantName
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState, with_reservation
from tessera.scheduler.core.topology import TopologyGraph
from tessera.scheduler.service.convert import host_view_from_inventory

OUT = Path(__file__).parent / "out"
SEED = 20261124
UPDATE_SAMPLES = 200

T = TypeVar("T")


def _rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _mib(n: float) -> float:
    return round(n / 2**20, 2)


def measure(build: Callable[[], T]) -> tuple[T, dict[str, float]]:
    """Run ``build`` untraced (time, RSS delta), then traced (tracemalloc peak).

    Returns:
        The untraced pass's result and the figures.
    """
    gc.collect()
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    result = build()
    wall = time.perf_counter() - t0
    rss = _rss_bytes() - rss0
    gc.collect()
    tracemalloc.start()
    traced = build()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del traced
    gc.collect()
    return result, {
        "wall_s": round(wall, 3),
        "rss_delta_mib": _mib(rss),
        "traced_mib": _mib(current),
        "traced_peak_mib": _mib(peak),
    }


def _first_request_cost(snap: ClusterSnapshot) -> dict[str, Any]:
    """Each policy's first request on a fresh engine: time and what its indexes hold."""
    out: dict[str, Any] = {}
    request = gpu_1("first", "tenant-first")
    for name, factory in POLICIES.items():

        def first(make: Callable[[], Any] = factory) -> Any:
            policy = make()
            policy.place(snap, request)
            return policy  # kept alive: its engine's indexes are what is measured

        policy, figures = measure(first)
        del policy
        out[name] = figures
        print(f"    first request {name}: {figures}", flush=True)
    return out


def _topology_per_class(counts: Mapping[str, int]) -> dict[str, Any]:
    """The networkx graph of one host per hardware class, and times its count in the fleet."""
    out: dict[str, Any] = {}
    for name in sorted(counts):
        view = host_view_from_inventory(fixture_inventory(name))

        def graph(v: Any = view) -> TopologyGraph:
            g = TopologyGraph()
            g.upsert_host(v)
            return g

        _, figures = measure(graph)
        out[name] = {
            **figures,
            "hosts_in_fleet": counts[name],
            "fleet_traced_mib": round(figures["traced_mib"] * counts[name], 1),
            "fleet_build_s": round(figures["wall_s"] * counts[name], 2),
        }
    return out


def _update_costs(snap: ClusterSnapshot, fleet: list[Any], samples: int) -> dict[str, Any]:
    """One host's new inventory (re-parse + new snapshot), and one commit."""
    reparse: list[float] = []
    resnap: list[float] = []
    commits: list[float] = []
    step = max(1, len(fleet) // samples)
    for i in range(samples):
        inventory = fleet[(i * step) % len(fleet)]
        host = HostId(inventory.host_id)
        t0 = time.perf_counter()
        view = host_view_from_inventory(inventory)
        t1 = time.perf_counter()
        updated = ClusterSnapshot(hosts={**snap.hosts, host: HostState(view, alloc_generation=0)})
        t2 = time.perf_counter()
        reparse.append(t1 - t0)
        resnap.append(t2 - t1)
        del updated
        t3 = time.perf_counter()
        committed = with_reservation(
            snap, host, (SlotKey(f"bench-slot-{i}"),), PlacementId(f"p-{i}"), TenantName("t")
        )
        commits.append(time.perf_counter() - t3)
        del committed
    return {
        "samples": samples,
        "reparse_one_host": report.summary_ms(reparse),
        "new_snapshot": report.summary_ms(resnap),
        "inventory_update": report.summary_ms(
            [a + b for a, b in zip(reparse, resnap, strict=True)]
        ),
        "commit_with_reservation": report.summary_ms(commits),
    }


def run(quick: bool) -> dict[str, Any]:
    """Measure; a JSON-able result (see the module doc)."""
    return state_cost(1_000 if quick else 12_500, UPDATE_SAMPLES, quick=quick)


def state_cost(hosts: int, samples: int, *, quick: bool = False) -> dict[str, Any]:
    """Every figure of the module doc on a fleet of ``hosts``, ``samples`` updates."""
    started = time.perf_counter()
    for name in DEFAULT_MIX:
        fixture_inventory(name)  # discovery is not the state's cost
    fleet = build_fleet(hosts, SEED)
    counts: dict[str, int] = {}
    for inv in fleet:
        counts[inv.labels[FIXTURE_LABEL]] = counts.get(inv.labels[FIXTURE_LABEL], 0) + 1
    print(f"  {hosts} hosts: parse ...", flush=True)
    views, parse = measure(lambda: [host_view_from_inventory(inv) for inv in fleet])
    print(f"    parse {parse}", flush=True)
    snap, snapshot_cost = measure(
        lambda: ClusterSnapshot(hosts={v.host_id: HostState(v, alloc_generation=0) for v in views})
    )
    # The views live as long as their hosts: out of the collector's way, as
    # the scheduler does after parsing.
    gc.freeze()
    result: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "seed": SEED,
        "hosts": hosts,
        "per_type": dict(sorted(counts.items())),
        "inventory_bytes": sum(inv.ByteSize() for inv in fleet),
        "parse": parse,
        "snapshot": snapshot_cost,
        "first_request": _first_request_cost(snap),
        "topology_per_class": _topology_per_class(counts),
        "update": _update_costs(snap, fleet, samples),
    }
    gc.unfreeze()
    result["wall_s"] = round(time.perf_counter() - started, 3)
    return result


def section(result: Mapping[str, Any], plots: Path) -> str:
    """The Markdown section: build costs, per-class graphs, one host's update."""
    stages = [
        ("parse inventories -> host views", result["parse"]),
        ("ClusterSnapshot", result["snapshot"]),
    ]
    stages += [
        (f"engine indexes, first request ({k})", v) for k, v in result["first_request"].items()
    ]
    rows = [
        [label, f["wall_s"], f["rss_delta_mib"], f["traced_mib"], f["traced_peak_mib"]]
        for label, f in stages
    ]
    topo = result["topology_per_class"]
    topo_rows = [
        [
            name,
            t["traced_mib"] * 1024,
            t["wall_s"] * 1000,
            t["hosts_in_fleet"],
            t["fleet_traced_mib"],
        ]
        for name, t in topo.items()
    ]
    u = result["update"]
    update_rows = [
        [label, u[key]["p50_ms"], u[key]["p99_ms"]]
        for label, key in (
            ("re-parse one host's inventory", "reparse_one_host"),
            ("new snapshot with it", "new_snapshot"),
            ("inventory update (both)", "inventory_update"),
            ("one commit (with_reservation)", "commit_with_reservation"),
        )
    ]
    plot = report.bar_plot(
        plots / "state_cost_memory.png",
        f"State memory at {result['hosts']:,} hosts (tracemalloc, MiB)",
        "MiB",
        [label.split(",")[0].split(" (")[0][:18] for label, _ in stages],
        {
            "retained": [f["traced_mib"] for _, f in stages],
            "peak": [f["traced_peak_mib"] for _, f in stages],
        },
    )
    return "\n\n".join(
        [
            "## Cost of the cluster state",
            f"{result['hosts']:,} hosts of the default mix "
            f"({result['inventory_bytes'] / 2**20:,.0f} MiB of serialized inventories). "
            "Time untraced; memory as the RSS delta of that "
            "pass and as tracemalloc's retained and peak figures of a second, traced pass. "
            "The baselines share the host views and the snapshot (their engines run the same "
            "filters); only their engines' indexes differ: first fit and random index the "
            "hosts they try, Tessera every host on its first request.",
            report.table(["stage", "s", "RSS delta MiB", "retained MiB", "peak MiB"], rows),
            plot,
            "The networkx topology graph (`TopologyGraph.upsert_host`) of one host of each "
            "fixture type. The engine puts one host per hardware class into its graph (hosts of "
            "a class share their PCIe tree), not every host; the last column is what a graph of "
            "every host of the type would take, which is what that design avoids:",
            report.table(
                ["type", "KiB per host", "ms per host", "hosts", "every host in the graph, MiB"],
                topo_rows,
            ),
            f"One host's update, {u['samples']} samples:",
            report.table(["operation", "p50 ms", "p99 ms"], update_rows),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run, write JSON, print a summary."""
    return report.part_main(argv, __doc__, run, OUT / "state_cost.json", "1,000 hosts")


if __name__ == "__main__":
    raise SystemExit(main())
