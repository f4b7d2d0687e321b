r"""Place inside the scheduler process at fleet scale: this tree beside a baseline commit.

What the servicer's Place costs once the request is parsed: the coordinator's
``place`` (claim the request id, bring the cluster state up to date, plan,
the Lua commit, the agent's Prepare, the READY transition) on a real Valkey,
with an in-process stub agent that answers Prepare at once (no gRPC, no
actuation: the figures are the scheduler's own). The fleet is the seeded
default mix (bench/fleet.py), registered through the coordinator; the
requests are bench/engine.py's mixed shapes, placements kept (steady state).

Measured per fleet size, each in a fresh process with a fresh Valkey:

* **sequential**: one Place at a time, p50/p99 of the server-side time,
  after :data:`WARMUP` Places of the same shapes (what a replica that has
  run a while has memoised: per class and shape, what never fits and the
  hosts in order); the first Place after registration (which builds every
  index) reported apart;
* **concurrent**: 64 tasks placing at once for a few seconds on the same
  event loop, as 64 gRPC clients reach one replica, each keeping its
  :data:`KEPT` newest placements and releasing older ones (a steady state:
  the smallest fleet would fill up otherwise): placements per second,
  releases per second, and the commits that conflicted.

With ``--baseline REF`` the same measurement runs on that commit, checked out
in a temporary git worktree, in the same run, so the two sets of figures
are taken side by side on the same (shared, noisy) machine.

    PYTHONPATH=.:protos .venv/bin/python bench/place_server.py [--quick] \\
        [--baseline de3e89d] [--out bench/out/place_server.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"

#: The last commit before the live cluster model (issue 12): every Place
#: read and parsed every host. ``make bench`` measures it beside this tree.
BASELINE = "de3e89d"

#: Concurrent placing tasks in the throughput phase.
CLIENTS = 64

#: Placements each concurrent task keeps; it releases older ones.
KEPT = 8

#: Places before the sequential samples (not measured).
WARMUP = 120

#: Filling rounds: requests per 250 hosts (bench (b)'s 640 on 250 hosts),
#: at most :data:`FILL_MAX` a round, and how many rounds.
FILL_PER_250 = 640
FILL_MAX = 6_400
FILL_ROUNDS = 5

#: PlaceBatch sizes measured on the largest fleet, one after the other
#: (placements kept).
BATCHES = (1_000, 10_000)

#: Samples of bringing one changed host into the replica's state.
UPDATE_SAMPLES = 30


def _rss_mib() -> float:
    """This process's resident memory, MiB (Linux)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _summary_ms(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {"n": 0}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"n": len(ordered), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": at(1.0)}


# ------------------------------------------------------------------ worker side
# Runs inside the measured tree (its own PYTHONPATH): imports only names that
# the baseline has too.


class _StubAgents:
    """The agents' side, in process: Prepare and Unprepare succeed at once."""

    async def prepare(self, address: str, placement: Any) -> Any:
        return placement

    async def unprepare(self, address: str, placement: Any) -> None:
        return None


def fill_size(hosts: int) -> int:
    """Placements in one filling round: bench (b)'s 640 per 250 hosts, at most 6,400."""
    return min(FILL_MAX, FILL_PER_250 * hosts // 250)


async def _filler(
    coordinator: Any, msgs: Iterator[Any], kept: list[str], failed: dict[str, int]
) -> None:
    """One filling task: places messages from the shared iterator until it runs dry."""
    from tessera.scheduler.service.errors import SchedulerError

    for msg in msgs:
        try:
            kept.append((await coordinator.place(msg)).placement_id)
        except SchedulerError as err:
            failed[type(err).__name__] = failed.get(type(err).__name__, 0) + 1


async def _releaser(coordinator: Any, placement_ids: Iterator[str]) -> None:
    """One releasing task: releases placements from the shared iterator.

    A release refused is left held: the next round starts from a fuller
    state, which its refusals show.
    """
    from tessera.scheduler.service.errors import SchedulerError

    for placement_id in placement_ids:
        with contextlib.suppress(SchedulerError):
            await coordinator.release(placement_id, "")


async def _fill_rounds(
    coordinator: Any, hosts: int, request: Callable[[int, str], Any]
) -> dict[str, Any]:
    """Placements per second while 64 tasks fill the fleet, placements kept.

    What bench (b) measured and issue 12 asks of one process: each round,
    :data:`CLIENTS` tasks place :func:`fill_size` requests between them (the
    messages built before the clock starts: building them is the frontend's
    work), then every placement of the round is released, untimed, so each
    round starts from the same state.
    """
    size = fill_size(hosts)
    rounds: list[dict[str, Any]] = []
    for r in range(FILL_ROUNDS):
        msgs = iter([request(i, f"fill{r}") for i in range(size)])
        kept: list[str] = []
        failed: dict[str, int] = {}
        t0 = time.perf_counter()
        await asyncio.gather(*(_filler(coordinator, msgs, kept, failed) for _ in range(CLIENTS)))
        wall = time.perf_counter() - t0
        rounds.append(
            {"placed": len(kept), "seconds": round(wall, 3),
             "per_s": round(len(kept) / wall, 1), "errors": failed}
        )  # fmt: skip
        releases = iter(kept)
        await asyncio.gather(*(_releaser(coordinator, releases) for _ in range(CLIENTS)))
    rates = sorted(r["per_s"] for r in rounds)
    return {"requests": size, "rounds": rounds, "median_per_s": rates[len(rates) // 2],
            "min_per_s": rates[0]}  # fmt: skip


async def _worker(
    hosts: int,
    sequential: int,
    seconds: float,
    seed: int,
    *,
    warmup: int = WARMUP,
    batches: Sequence[int] = (),
) -> dict[str, Any]:
    from bench.engine import SHAPES
    from bench.fleet import build_fleet
    from bench.latency import to_wire
    from tessera.scheduler.service.coordinator import Leases, PlacementCoordinator
    from tessera.scheduler.service.errors import SchedulerError
    from tessera.scheduler.store.connection import connect_store
    from tessera.scheduler.store.embedded import EmbeddedValkey
    from tessera.scheduler.store.redis_store import RedisStateStore

    try:
        # The collector's settings the scheduler process runs with (the
        # baseline has none).
        from tessera.scheduler.service import collector

        collector.tune()
    except ImportError:
        pass
    fleet = build_fleet(hosts, seed)
    with (
        tempfile.TemporaryDirectory(prefix="tessera-place-server-") as tmp,
        EmbeddedValkey(Path(tmp)) as server,
    ):
        # The scheduler's own client (its checks, retries and packing).
        client = await connect_store(server.url)
        store = RedisStateStore(client)
        # No heartbeats in this harness: a lease of a day keeps every host
        # live (the baseline judged leases at each read).
        coordinator = PlacementCoordinator(store, _StubAgents(), Leases(lease_s=86_400))
        t0 = time.perf_counter()
        for inventory in fleet:
            await coordinator.register(inventory, f"{inventory.host_id}:7000")
        register_s = time.perf_counter() - t0
        shapes = list(SHAPES.items())

        def request(i: int, prefix: str) -> Any:
            name, shape = shapes[i % len(shapes)]
            return to_wire(shape(f"{prefix}-{name}-{i:06d}", f"tenant-{i % 16:02d}"))

        rss_before = _rss_mib()
        t0 = time.perf_counter()
        await coordinator.place(request(0, "first"))
        first_s = time.perf_counter() - t0
        rss_after = _rss_mib()
        # One host changed by someone else, then brought into this replica's
        # state: a feed read and one host's read (the baseline reads all).
        bring_up_to_date = getattr(coordinator, "refreshed", coordinator.snapshot)
        update_s: list[float] = []
        host_ids = [inv.host_id for inv in fleet]
        for i in range(UPDATE_SAMPLES):
            host_id = host_ids[(i * 7919) % len(host_ids)]
            await store.cordon_host(host_id, reason="bench", by="bench", now_ms=1)
            await store.uncordon_host(host_id)
            t0 = time.perf_counter()
            await bring_up_to_date()
            update_s.append(time.perf_counter() - t0)
        for i in range(warmup):
            # Refusals (a small fleet filling up) warm the memos all the same.
            with contextlib.suppress(SchedulerError):
                await coordinator.place(request(i, "warm"))
        samples: list[float] = []
        errors: dict[str, int] = {}
        for i in range(sequential):
            msg = request(i, "seq")
            t0 = time.perf_counter()
            try:
                await coordinator.place(msg)
            except SchedulerError as err:
                errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                continue
            samples.append(time.perf_counter() - t0)

        filling = await _fill_rounds(coordinator, hosts, request)

        placed = released = 0
        failed: dict[str, int] = {}
        outcomes_before = dict(getattr(coordinator, "commit_outcomes", {}))
        stats_before = await client.info("commandstats")
        deadline = time.perf_counter() + seconds

        async def one_client(c: int) -> None:
            nonlocal placed, released
            i = 0
            kept: list[str] = []
            while time.perf_counter() < deadline:
                msg = request(c * 1_000_000 + i, f"c{c:02d}")
                i += 1
                try:
                    kept.append((await coordinator.place(msg)).placement_id)
                    placed += 1
                    if len(kept) > KEPT:
                        await coordinator.release(kept.pop(0), "")
                        released += 1
                except SchedulerError as err:
                    failed[type(err).__name__] = failed.get(type(err).__name__, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(CLIENTS)))
        wall = time.perf_counter() - t0
        stats_after = await client.info("commandstats")
        batch_runs: list[dict[str, Any]] = []
        for size in batches:
            msgs = [request(i, f"batch{size}") for i in range(size)]
            t0 = time.perf_counter()
            done, unplaced = await coordinator.place_batch(msgs, False)
            batch_runs.append(
                {
                    "requests": size,
                    "wall_s": round(time.perf_counter() - t0, 3),
                    "placed": len(done),
                    "unplaced": len(unplaced),
                }
            )
        outcomes = {
            k: v - outcomes_before.get(k, 0)
            for k, v in dict(getattr(coordinator, "commit_outcomes", {})).items()
        }
        await client.aclose()

    def calls(stats: Mapping[str, Any], name: str) -> int:
        return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))

    return {
        "hosts": hosts,
        "register_s": round(register_s, 3),
        "first_place_ms": round(first_s * 1000, 3),
        "state_rss_mib": round(rss_after - rss_before, 1),
        "host_update": _summary_ms(update_s),
        "sequential": _summary_ms(samples),
        "sequential_errors": errors,
        "filling": filling,
        "concurrent": {
            "clients": CLIENTS,
            "seconds": round(wall, 3),
            "placed": placed,
            "per_s": round(placed / wall, 1) if wall else 0.0,
            "released_per_s": round(released / wall, 1) if wall else 0.0,
            "commit_outcomes": outcomes,
            "errors": failed,
            "evalsha_calls": calls(stats_after, "evalsha") - calls(stats_before, "evalsha"),
        },
        "batches": batch_runs,
    }


# ------------------------------------------------------------------ driver side


def _run_tree(
    tree: Path,
    hosts: int,
    sequential: int,
    seconds: float,
    seed: int,
    *,
    warmup: int,
    batches: Sequence[int],
) -> dict[str, Any]:
    """One measurement in a fresh process whose imports come from ``tree``."""
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'protos'}"}
    done = subprocess.run(
        [
            sys.executable, str(Path(__file__).resolve()), "--worker",
            "--hosts", str(hosts), "--sequential", str(sequential),
            "--seconds", str(seconds), "--seed", str(seed), "--warmup", str(warmup),
            "--batches", ",".join(map(str, batches)),
        ],
        cwd=tree, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"worker on {tree} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _batches(hosts: int, tree: str, quick: bool) -> Sequence[int]:
    """PlaceBatch sizes to measure: on the largest fleet only; the baseline's 1,000 only.

    The baseline fits every request against every host: its batch of 10,000
    would take most of an hour.
    """
    if quick or hosts < 10_000:
        return ()
    return BATCHES if tree == "this" else BATCHES[:1]


def run(
    quick: bool, baseline: str | None = "", sizes: Sequence[int] | None = None
) -> dict[str, Any]:
    """Measure this tree (and the baseline commit beside it); a JSON-able result.

    Args:
        quick: small sizes, no baseline (CI: it proves the part runs).
        baseline: a commit to measure beside this tree; "" for
            :data:`BASELINE` (none when quick), None for none.
        sizes: fleet sizes (default 250, 1,000, 10,000; quick 250, 1,000).
    """
    if baseline == "":
        baseline = None if quick else BASELINE
    sizes = list(sizes or ([250, 1_000] if quick else [250, 1_000, 10_000]))
    seconds, seed = (3.0, 7) if quick else (10.0, 7)
    warmup = 20 if quick else WARMUP
    trees: dict[str, Path] = {"this": ROOT}
    with tempfile.TemporaryDirectory(prefix="tessera-baseline-") as tmp:
        if baseline:
            worktree = Path(tmp) / "baseline"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), baseline],
                check=True, capture_output=True,
            )  # fmt: skip
            trees["baseline"] = worktree
        try:
            out: dict[str, Any] = {"sizes": sizes, "baseline": baseline, "runs": {}}
            for n in sizes:
                # The baseline takes about a second a Place at 10,000 hosts.
                sequential = 60 if quick or n > 2_000 else 300
                for name, tree in trees.items():
                    result = _run_tree(
                        tree, n, sequential, seconds, seed, warmup=warmup,
                        batches=_batches(n, name, quick),
                    )  # fmt: skip
                    out["runs"].setdefault(str(n), {})[name] = result
                    print(
                        f"  {n:>6} hosts {name:>8}: first {result['first_place_ms']:.0f} ms "
                        f"(+{result['state_rss_mib']} MiB), update {result['host_update']}, "
                        f"sequential {result['sequential']}, "
                        f"{result['concurrent']['per_s']}/s with {CLIENTS} clients "
                        f"{result['concurrent']['errors']}",
                        flush=True,
                    )
            return out
        finally:
            if baseline:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force",
                     str(trees["baseline"])],
                    check=False, capture_output=True,
                )  # fmt: skip


def section(result: Mapping[str, Any], plots: Path) -> str:
    """The Markdown section: one row per fleet size and tree."""
    from bench.report import table

    rows: list[list[object]] = []
    for size, trees in sorted(result["runs"].items(), key=lambda kv: int(kv[0])):
        for name, run_ in trees.items():
            seq, conc, upd = run_["sequential"], run_["concurrent"], run_["host_update"]
            label = f"baseline {result['baseline']}" if name == "baseline" else "this tree"
            failed = sum(conc["errors"].values())
            outcomes = conc.get("commit_outcomes") or {}
            commits = sum(outcomes.values())
            conflicted = (
                f"{outcomes.get('CONFLICT', 0) / commits:.2%}" if commits else "not counted"
            )
            rows.append(
                [
                    f"{int(size):,}",
                    label,
                    f"{run_['first_place_ms']:,.0f}",
                    f"{run_['state_rss_mib']:,.0f}",
                    seq.get("p50", "n/a"),
                    seq.get("p99", "n/a"),
                    upd.get("p50", "n/a"),
                    _filling_cell(run_.get("filling")),
                    f"{conc['per_s']:,.0f}",
                    f"{conc.get('released_per_s', 0):,.0f}",
                    conflicted,
                    failed,
                ]
            )
    headers = [
        "hosts",
        "tree",
        "first Place ms (builds the state)",
        "state MiB",
        "Place p50 ms",
        "Place p99 ms",
        "one host's update p50 ms",
        f"placements/s filling, {CLIENTS} tasks: median (least) of rounds",
        f"placements/s, {CLIENTS} tasks placing and releasing",
        "releases/s",
        "commits conflicted",
        "failed calls",
    ]
    return "\n\n".join(
        [
            "Place inside one scheduler process (`PlacementCoordinator.place`: claim, bring the "
            "state up to date, plan, Lua commit, the agent's Prepare answered at once in "
            "process, READY), on an embedded Valkey, the seeded default fleet registered "
            "through the coordinator; mixed shapes, placements kept. Each row is a fresh "
            "process and Valkey; the baseline commit runs from a git worktree in the same run. "
            "`one host's update`: another writer cordons and uncordons one host, then the "
            f"replica brings its state up to date (the baseline reads every host). p50 and "
            f"p99 are taken after {WARMUP} Places of the same shapes (not measured). "
            f"`filling` (bench (b)'s measure, placements kept): {CLIENTS} tasks place "
            f"{FILL_PER_250} requests per 250 hosts (at most {FILL_MAX:,}) between them, "
            f"the messages built before the clock starts; each of {FILL_ROUNDS} rounds "
            "starts from the same state (the round's placements are released, untimed). "
            f"Then {CLIENTS} tasks place at once for the next columns, "
            f"each keeping its {KEPT} newest placements and releasing older ones; "
            "`commits conflicted` is the share of their commits the store refused as "
            "planned on moved state (the baseline does not count them); `failed calls` are "
            "theirs: refused for want of capacity or given up after 16 lost commit races.",
            table(headers, rows),
            *_batch_section(result),
        ]
    )


def _filling_cell(filling: Mapping[str, Any] | None) -> str:
    """Median and least rate of the filling rounds (a baseline run may have none)."""
    if not filling:
        return "not run"
    return f"{filling['median_per_s']:,.0f} ({filling['min_per_s']:,.0f})"


def _batch_section(result: Mapping[str, Any]) -> list[str]:
    """The PlaceBatch table, when the run measured batches."""
    from bench.report import table

    rows: list[list[object]] = []
    for size, trees in sorted(result["runs"].items(), key=lambda kv: int(kv[0])):
        for name, run_ in trees.items():
            label = f"baseline {result['baseline']}" if name == "baseline" else "this tree"
            rows.extend(
                [f"{int(size):,}", label, f"{b['requests']:,}", b["wall_s"], b["placed"],
                 b["unplaced"]]
                for b in run_.get("batches", [])
            )  # fmt: skip
    if not rows:
        return []
    return [
        "PlaceBatch inside the same process after the throughput phase "
        "(`PlacementCoordinator.place_batch`: one CP-SAT solve on the live state, then the "
        "commits and the agent's Prepare of every plan), the batches one after the other, "
        "placements kept:",
        table(["hosts", "tree", "requests", "wall s", "placed", "unplaced"], rows),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the driver, or (``--worker``) one measurement printing JSON."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--baseline",
        default="",
        help=f"a git commit to measure beside this tree (default {BASELINE}; 'none': none)",
    )
    p.add_argument("--sizes", help="comma-separated fleet sizes")
    p.add_argument("--out", type=Path, default=OUT / "place_server.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hosts", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--sequential", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=5.0, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=7, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=WARMUP, help=argparse.SUPPRESS)
    p.add_argument("--batches", default="", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.worker:
        print(
            json.dumps(
                asyncio.run(
                    _worker(
                        opts.hosts,
                        opts.sequential,
                        opts.seconds,
                        opts.seed,
                        warmup=opts.warmup,
                        batches=[int(b) for b in opts.batches.split(",") if b],
                    )
                )
            )
        )
        return 0
    sizes = [int(s) for s in opts.sizes.split(",")] if opts.sizes else None
    baseline = None if opts.baseline == "none" else opts.baseline
    result = run(opts.quick, baseline, sizes)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
