"""What every benchmark part writes its section of BENCHMARKS.md with: tables, plots, figures.

A part module (``bench/latency.py`` ...) exposes ``run(quick: bool) -> dict``
(a JSON-able result) and ``section(result, plots: Path) -> str`` (its Markdown
section; plots go to ``plots`` as PNG and are linked relative to the
repository root). ``bench/run.py`` runs the parts and assembles the file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a benchmark machine

import matplotlib.pyplot as plt  # after use(): the backend must be chosen first
from matplotlib.figure import Figure

from bench import figures

#: Where plots are linked from, relative to the repository root (BENCHMARKS.md's folder).
PLOTS_LINK = "bench/plots"

#: One colour per policy, the same in every plot.
COLOURS: Mapping[str, str] = {
    "tessera": "#1b7837",
    "tessera-batch": "#5aae61",
    "first-fit": "#2166ac",
    "best-fit": "#b2182b",
    "random": "#878787",
}


ROOT = Path(__file__).resolve().parent.parent


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the working tree differs from it."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return ""
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "scheduler_core_dirty": bool(git("status", "--porcelain", "scheduler/core")),
        "dirty": bool(git("status", "--porcelain", "scheduler", "agent", "bench")),
    }


def write_result(result: Mapping[str, Any], path: Path) -> None:
    """Write a part's result as JSON, making its folder if need be, and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {path} ({result.get('wall_s', '?')} s)")


def part_main(
    argv: list[str] | None,
    doc: str | None,
    run: Callable[[bool], Mapping[str, Any]],
    default_out: Path,
    quick_help: str,
) -> int:
    """The command line of a part with no options of its own: ``--quick``, ``--out``."""
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=default_out)
    opts = p.parse_args(argv)
    write_result(run(opts.quick), opts.out)
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError):
        pass
    return math.nan


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` percentile (0-100) by nearest rank; NaN for no values."""
    return figures.percentile(values, q / 100) if values else math.nan


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """n, p50, p99, mean and max of durations in seconds, as milliseconds."""
    if not seconds:
        return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "mean_ms": math.nan}
    return figures.latency_summary(seconds)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats get at most 3 significant decimals."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "n/a"
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def line_plot(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    logx: bool = False,
    logy: bool = False,
) -> str:
    """Write a line plot (one line per series) and return its Markdown image link."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, points in series.items():
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        ax.plot(xs, ys, marker="o", label=name, color=COLOURS.get(name.split(" ")[0]))
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path, title)


def bar_plot(
    path: Path,
    title: str,
    ylabel: str,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
) -> str:
    """Write a grouped bar chart (``series`` name -> one value per group); return its link."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, values, width=width, label=name, color=COLOURS.get(name.split(" ")[0]))
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path, title)


def _save(fig: Figure, path: Path, title: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return f"![{title}]({PLOTS_LINK}/{path.name})"
