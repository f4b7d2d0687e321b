"""Run every benchmark part and regenerate BENCHMARKS.md from their results.

``make bench`` runs the full parts and rewrites ``BENCHMARKS.md`` and
``bench/plots/``; ``make bench-quick`` runs the small versions (for CI: it
checks that every part runs and reports, and asserts nothing about time) and
writes its report under ``bench/out/quick/`` so the committed figures stay
those of a full run.

Parts, in the order of the issue that asked for them:

========  ======================  ===============================================
letter    module                  what it measures
========  ======================  ===============================================
a         ``bench/latency.py``    single-request latency against fleet size
b         ``bench/throughput.py`` sustained placements per second, 16 and 64 clients
c         ``bench/batches.py``    batches of 1,000 and 10,000: wall time, gap to bound
d         ``bench/trace_replay``  Alibaba 2023 GPU trace replay: acceptance, fragmentation
e         ``bench/state_cost.py`` cluster state at 12,500 hosts: build, memory, updates
f         ``bench/tls_cost.py``   mutual TLS beside plaintext: latency, placements/s, set-up
g         ``bench/place_server``  Place inside the scheduler, before and after the live model
h         ``bench/fill_replay``   the trace filled as ATC'23 measures it: unallocated GPUs
i         ``bench/dashboard.py``  the dashboard at 10,000 hosts: first render, payload
========  ======================  ===============================================

Each part's ``run(quick)`` result is written to ``OUT/<part>.json`` with the
machine and commit; ``--report-only`` rebuilds the Markdown from those files.

Usage::

    PYTHONPATH=.:protos .venv/bin/python bench/run.py [--quick] [--parts a,d] [--report-only]
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the bench package importable
    sys.path.insert(0, str(ROOT))

from bench.report import git_state, machine, table  # noqa: E402

#: letter -> (module, title of its section).
PARTS: Mapping[str, tuple[str, str]] = {
    "a": ("latency", "(a) Single-request latency against fleet size"),
    "b": ("throughput", "(b) Sustained placements per second"),
    "c": ("batches", "(c) Batches of 1,000 and 10,000 requests"),
    "d": ("trace_replay", "(d) Replay of the Alibaba 2023 GPU trace"),
    "e": ("state_cost", "(e) Cluster state at 12,500 hosts"),
    "f": ("tls_cost", "(f) Cost of mutual TLS"),
    "g": ("place_server", "(g) Place inside the scheduler: the live cluster model"),
    "h": ("fill_replay", "(h) The trace filled as ATC'23 measures it: unallocated GPUs"),
    "i": ("dashboard", "(i) The dashboard at fleet scale: first render and payload"),
}

_COMMANDS = """\
```sh
make bench        # every part, full sizes; rewrites BENCHMARKS.md and bench/plots/
make bench-quick  # every part, small sizes (CI); report in bench/out/quick/
# one part, or the report alone from the JSON already written:
PYTHONPATH=.:protos .venv/bin/python bench/run.py --parts d
PYTHONPATH=.:protos .venv/bin/python bench/run.py --report-only
```"""


def run_parts(letters: Sequence[str], quick: bool, out: Path) -> dict[str, dict[str, Any]]:
    """Run the parts, writing each result as soon as it is done."""
    results: dict[str, dict[str, Any]] = {}
    out.mkdir(parents=True, exist_ok=True)
    for letter in letters:
        module_name, title = PARTS[letter]
        module = importlib.import_module(f"bench.{module_name}")
        print(f"== {title}", flush=True)
        started = time.perf_counter()
        result: dict[str, Any] = module.run(quick)
        result.setdefault("meta", {}).update(
            {
                "part": letter,
                "quick": quick,
                "wall_s": round(time.perf_counter() - started, 1),
                "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": machine(),
                "git": git_state(),
            }
        )
        (out / f"{module_name}.json").write_text(json.dumps(result, indent=2, default=str))
        print(f"   done in {result['meta']['wall_s']} s -> {out / module_name}.json", flush=True)
        results[letter] = result
    return results


def load_results(out: Path) -> dict[str, dict[str, Any]]:
    """The results already written to ``out``, by part letter."""
    found: dict[str, dict[str, Any]] = {}
    for letter, (module_name, _) in PARTS.items():
        path = out / f"{module_name}.json"
        if path.exists():
            found[letter] = json.loads(path.read_text())
    return found


def _policy_row(label: str, values: Mapping[str, Any], fmt: str = "{:,.3g}") -> list[object]:
    return [label, *(fmt.format(values[p]) if p in values else "n/a" for p in _POLICY_ORDER)]


#: Column order of the headline tables.
_POLICY_ORDER = ("tessera", "first-fit", "best-fit", "random")


def headlines(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One table of the figures that matter most, every policy side by side.

    Read from each part's JSON; a part not run (or shaped otherwise) leaves
    its rows out rather than failing the report.
    """
    rows: list[list[object]] = []
    a, b, c, d = (results.get(k, {}) for k in "abcd")
    try:
        size = max(a["in_process"], key=int)
        pols = a["in_process"][size]["policies"]
        rows.append(
            _policy_row(
                f"(a) p50 ms, one request, {int(size):,} hosts, in process",
                {p: v["all"]["p50_ms"] for p, v in pols.items()},
            )
        )
        size = max(a["end_to_end"], key=int)
        rows.append(
            _policy_row(
                f"(a) p50 ms, Place over gRPC, {int(size):,} hosts",
                {p: v["all"]["p50_ms"] for p, v in a["end_to_end"][size].items()},
            )
        )
    except (KeyError, ValueError):
        pass
    try:
        for clients in b["clients"]:
            rows.append(
                _policy_row(
                    f"(b) placements/s end to end, {clients} clients",
                    {
                        p: v["runs"][str(clients)]["placements_per_s"]
                        for p, v in b["end_to_end"]["policies"].items()
                    },
                )
            )
    except KeyError:
        pass
    try:
        for case in c["cases"]:
            placed = {p: v["placed"] for p, v in case["policies"].items()}
            batch = case["tessera-batch"]
            rows.append(
                _policy_row(
                    f"(c) placed of {case['requests']:,} on {case['hosts']:,} hosts "
                    f"(CP-SAT batch: {batch['placed']:,}, {batch['gap']:.2%} from its bound)",
                    placed,
                    "{:,}",
                )
            )
    except KeyError:
        pass
    try:
        pols = d["policies"]
        for key, label in (
            ("acceptance", "(d) Alibaba trace: tasks accepted"),
            ("fragmented_of_free_busy_mean", "(d) free GPU capacity fragmented"),
            ("numa_aligned", "(d) multi-GPU placements on one NUMA node"),
        ):
            rows.append(_policy_row(label, {p: v[key] for p, v in pols.items()}, "{:.3f}"))
    except KeyError:
        pass
    if not rows:
        return "No part has been run yet."
    return table(["figure", *_POLICY_ORDER], rows)


def render(results: Mapping[str, Mapping[str, Any]], plots: Path, quick: bool) -> str:
    """BENCHMARKS.md: machine, how to reproduce, then each part's section."""
    metas = [r.get("meta", {}) for r in results.values()]
    host = next((m["machine"] for m in metas if "machine" in m), machine())
    commits = sorted({m.get("git", {}).get("commit", "")[:12] for m in metas} - {""})
    lines = [
        "# Tessera benchmarks",
        "",
        "Tessera's placement against the baselines an operator would otherwise pick, measured in "
        "one harness on the same fleets and the same requests: **first fit** (as Kubernetes DRA "
        "allocates: the first feasible node, its first feasible devices), **best fit** "
        "(kube-scheduler with `NodeResourcesFit` set to `MostAllocated`), **random**, and "
        "Tessera's **fast path** and **CP-SAT batch**. Every baseline applies the same safety "
        "filters as Tessera (whole IOMMU groups, capacity, host use, exclusivity, required NUMA "
        "and PCIe constraints) and sees only what a DRA claim can state (required constraints, "
        "no preferences); `bench/policies.py` says exactly what each does.",
        "",
        "This file is generated by `bench/run.py` from `bench/out/*.json`; do not edit it by hand."
        + (" **Quick run: small sizes, not the published figures.**" if quick else ""),
        "",
        "## How to reproduce",
        "",
        _COMMANDS,
        "",
        "## Machine",
        "",
        table(
            ["CPU", "cores", "memory GiB", "Python", "platform", "commit"],
            [
                [
                    host.get("cpu_model", "?"),
                    host.get("cpu_count", "?"),
                    host.get("memory_gib", "?"),
                    host.get("python", "?"),
                    host.get("platform", "?"),
                    ", ".join(commits) or "?",
                ]
            ],
        ),
        "",
        table(
            ["part", "finished (UTC)", "wall s", "sizes"],
            [
                [
                    PARTS[letter][1],
                    r.get("meta", {}).get("finished", "?"),
                    r.get("meta", {}).get("wall_s", "?"),
                    "quick" if r.get("meta", {}).get("quick") else "full",
                ]
                for letter, r in sorted(results.items())
            ],
        ),
        "",
    ]
    lines += ["## Headlines", "", headlines(results), ""]
    for letter, (module_name, title) in PARTS.items():
        lines += [f"## {title}", ""]
        result = results.get(letter)
        if result is None:
            lines += ["Not run yet: `bench/run.py --parts " + letter + "`.", ""]
            continue
        module = importlib.import_module(f"bench.{module_name}")
        # A part may head its section itself: this file's heading stands instead.
        body = re.sub(r"\A\s*## [^\n]*\n+", "", module.section(result, plots))
        lines += [body.rstrip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the parts asked for and write the report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (CI)")
    p.add_argument("--parts", default="".join(PARTS), help="letters of the parts (default all)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from JSON")
    p.add_argument("--out", type=Path, help="JSON folder (default bench/out[/quick])")
    p.add_argument("--markdown", type=Path, help="report path (default BENCHMARKS.md)")
    opts = p.parse_args(argv)
    letters = [c for c in opts.parts.replace(",", "") if c in PARTS]
    if not letters:
        p.error(f"--parts: choose among {', '.join(PARTS)}")
    out: Path = opts.out or (ROOT / "bench" / "out" / ("quick" if opts.quick else ""))
    markdown: Path = opts.markdown or (
        out / "BENCHMARKS.md" if opts.quick else ROOT / "BENCHMARKS.md"
    )
    plots = markdown.parent / "bench" / "plots" if opts.quick else ROOT / "bench" / "plots"
    if not opts.report_only:
        run_parts(letters, opts.quick, out)
    results = load_results(out)
    markdown.write_text(render(results, plots, opts.quick) + "\n")
    print(f"report: {markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
