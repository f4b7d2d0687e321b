r"""The dashboard at fleet scale: time to first render and payload, per page, in a real browser.

A registered fleet (bench/fleet.py's default mix, registered over gRPC to a
scheduler serving ``--http-listen``, one stub agent answering every Prepare)
with about one host in four holding a placement of bench/engine.py's mixed
shapes. Then, per page:

* **server**: p50 and p90 of the time to answer over HTTP, measured from a
  client on the same machine (the scheduler renders it: model read, tiles,
  template), and the size of the HTML answered;
* **browser**: headless Chromium (Debian's, driven by Playwright) opens the
  page in a fresh tab: time to first contentful paint and to the load event
  (navigation timing), repeated, p50;
* **live**: with the placements page open, the time from a Place over gRPC
  returning to its row on the page (median and worst of :data:`LIVE_ROUNDS`).

The fleet view is cut into pages of 200 hosts, so its payload stays the same
from 1,000 to 10,000 hosts; what grows is the server's work per page (every
host's tile filtered and the totals summed) and ``/metrics`` (per-host series).

Plaintext on loopback: the figures are the dashboard's own, not a TLS
handshake's (bench (f) measures those).

    PYTHONPATH=.:protos .venv/bin/python bench/dashboard.py [--quick] \\
        [--out bench/out/dashboard.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from bench.engine import mixed_requests  # noqa: E402
from bench.fleet import build_fleet  # noqa: E402
from bench.latency import E2eCluster, to_wire  # noqa: E402
from bench.report import git_state, machine, table  # noqa: E402
from tessera.v1 import scheduler_pb2  # noqa: E402

SEED = 20261207
SIZES = (1_000, 10_000)
QUICK_SIZES = (200,)
#: Share of hosts given a placement before measuring.
FILL = 0.25
#: Requests timed per page on the server, and page opens in the browser.
SERVER_ROUNDS = 15
BROWSER_ROUNDS = 5
#: Placements timed from Place to their row in an open page.
LIVE_ROUNDS = 20
CHROMIUM = os.environ.get("TESSERA_CHROMIUM", "/usr/bin/chromium")
_CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _pages(fleet_size: int, host: str) -> dict[str, str]:
    last = max(1, -(-fleet_size // 200))
    return {
        "fleet": "/fleet",
        "fleet, last page": f"/fleet?page={last}",
        "fleet, filtered by tenant": "/fleet?tenant=tenant-03",
        "host": f"/hosts/{host}",
        "placements": "/placements",
        "tenants": "/tenants",
        "metrics": "/metrics",
    }


def _server(url: str, rounds: int) -> dict[str, float]:
    times: list[float] = []
    size = 0
    for _ in range(rounds):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=120) as response:
            body = response.read()
        times.append(time.perf_counter() - started)
        size = len(body)
    times.sort()
    return {
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "p90_ms": round(times[int(0.9 * (len(times) - 1))] * 1000, 2),
        "bytes": size,
    }


def _browser(urls: Mapping[str, str], rounds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=_CHROMIUM_ARGS)
        try:
            for name, url in urls.items():
                paints: list[float] = []
                loads: list[float] = []
                for _ in range(rounds):
                    context = browser.new_context(viewport={"width": 1400, "height": 1000})
                    page = context.new_page()
                    page.goto(url, wait_until="load")
                    # The paint entry may come after the load event: wait for it.
                    timing = page.evaluate(
                        """() => new Promise(resolve => {
                            const nav = performance.getEntriesByType('navigation')[0];
                            const done = fcp => resolve({load: nav.loadEventEnd, fcp});
                            new PerformanceObserver(list => {
                                const e = list.getEntriesByName('first-contentful-paint')[0];
                                if (e) done(e.startTime);
                            }).observe({type: 'paint', buffered: true});
                            setTimeout(() => done(-1), 5000);
                        })"""
                    )
                    paints.append(float(timing["fcp"]))
                    loads.append(float(timing["load"]))
                    context.close()
                out[name] = {
                    "first_paint_ms": round(statistics.median(paints), 1),
                    "load_ms": round(statistics.median(loads), 1),
                }
        finally:
            browser.close()
    return out


def _fill(cluster: E2eCluster, hosts: int) -> int:
    """Place about ``FILL`` times the hosts of the mixed shapes; returns how many were placed."""
    placed = 0
    rng = random.Random(SEED)
    with cluster.stubs() as stubs:
        for request in mixed_requests(int(hosts * FILL), rng, "dash"):
            try:
                stubs[0].Place(scheduler_pb2.PlaceRequest(request=to_wire(request)), timeout=120)
            except grpc.RpcError:
                continue
            placed += 1
    return placed


#: Resolves to when (performance.now()) the row of a placement is in the page (-1: never).
_ROW_SHOWN = """id => new Promise(resolve => {
    const shown = () => document.querySelector(`tr[data-placement="${id}"]`);
    if (shown()) { resolve(performance.now()); return; }
    const watch = new MutationObserver(() => {
        if (shown()) { watch.disconnect(); resolve(performance.now()); }
    });
    watch.observe(document.body, {childList: true, subtree: true});
    setTimeout(() => { watch.disconnect(); resolve(-1); }, 30000);
})"""


def _live(cluster: E2eCluster, base: str, rounds: int) -> dict[str, float]:
    """Seconds from a Place over gRPC returning to its row in an open placements page.

    The page is opened once and never reloaded: each row comes over the
    event stream (the change feed read every half second) and the htmx
    fetch it triggers. p50 and the worst of ``rounds`` placements.
    """
    seen: list[float] = []
    rng = random.Random(SEED + 1)
    with sync_playwright() as p, cluster.stubs() as stubs:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=_CHROMIUM_ARGS)
        try:
            page = browser.new_context().new_page()
            page.goto(base + "/placements", wait_until="load")
            page.wait_for_selector("#live:has-text('revision')")
            for request in mixed_requests(rounds, rng, "live"):
                try:
                    placed = (
                        stubs[0]
                        .Place(scheduler_pb2.PlaceRequest(request=to_wire(request)), timeout=120)
                        .placement
                    )
                except grpc.RpcError:
                    continue
                # Timed in the page (Playwright's own waiting polls every
                # half second once a wait is long): from Place returning to
                # the row in the document.
                returned = float(page.evaluate("performance.now()"))
                shown = float(page.evaluate(_ROW_SHOWN, placed.placement_id))
                if shown >= 0:
                    seen.append((shown - returned) / 1000)
        finally:
            browser.close()
    seen.sort()
    return {
        "rounds": len(seen),
        "p50_s": round(statistics.median(seen), 3) if seen else -1.0,
        "max_s": round(seen[-1], 3) if seen else -1.0,
    }


def one_size(hosts: int, quick: bool) -> dict[str, Any]:
    """Every page's figures on a registered fleet of ``hosts``."""
    fleet = build_fleet(hosts, SEED)
    with (
        tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp,
        E2eCluster(
            Path(tmp),
            tls=False,
            agent_warm_interval=0,
            scheduler_args=("--http-listen", "127.0.0.1:0"),
        ) as cluster,
    ):
        register_s = cluster.register(fleet)
        placed = _fill(cluster, hosts)
        base = cluster.local.dashboards["scheduler-0"].rstrip("/")
        pages = _pages(hosts, fleet[len(fleet) // 2].host_id)
        rounds = 3 if quick else SERVER_ROUNDS
        # The first fleet page after start derives every host's tile (then
        # only the hosts that change): what an operator opening it first waits.
        cold = _server(base + "/fleet", 1)["p50_ms"]
        server = {name: _server(base + path, rounds) for name, path in pages.items()}
        browser = _browser(
            {name: base + path for name, path in pages.items() if name != "metrics"},
            2 if quick else BROWSER_ROUNDS,
        )
        live = _live(cluster, base, 3 if quick else LIVE_ROUNDS)
    return {
        "hosts": hosts,
        "placements": placed,
        "register_s": round(register_s, 1),
        "cold_fleet_ms": cold,
        "server": server,
        "browser": browser,
        "live": live,
    }


def run(quick: bool) -> dict[str, Any]:
    """Every fleet size (the quick sizes for CI)."""
    sizes = QUICK_SIZES if quick else SIZES
    out: dict[str, Any] = {"sizes": {}}
    for n in sizes:
        out["sizes"][str(n)] = one_size(n, quick)
        print(f"    dashboard at {n} hosts: {json.dumps(out['sizes'][str(n)])}", flush=True)
    return out


def section(result: Mapping[str, Any], plots: Path | None = None) -> str:
    """The Markdown section of BENCHMARKS.md."""
    lines = [
        "The admin dashboard on a registered fleet (bench/fleet.py's default mix) with about one "
        "host in four holding a placement of the mixed shapes, plaintext on loopback. **Server**: "
        "time to answer the page over HTTP (p50 / p90 of repeated requests from a client on the "
        "same machine) and the HTML's size. **Browser**: headless Chromium opening the page in a "
        "fresh tab, median time to first contentful paint and to the load event. The fleet view "
        "shows 200 hosts a page, so its payload does not grow with the fleet.",
        "",
    ]
    for size, figures in sorted(result["sizes"].items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"**{int(size):,} hosts** ({figures['placements']:,} placements; registered in "
            f"{figures['register_s']} s):"
        )
        lines.append("")
        rows: list[Sequence[str]] = []
        for page, server in figures["server"].items():
            browser = figures["browser"].get(page)
            rows.append(
                [
                    page,
                    f"{server['p50_ms']:.1f} / {server['p90_ms']:.1f} ms",
                    f"{server['bytes'] / 1024:,.1f} KiB",
                    f"{browser['first_paint_ms']:.0f} ms" if browser else "-",
                    f"{browser['load_ms']:.0f} ms" if browser else "-",
                ]
            )
        lines.append(table(["page", "server p50 / p90", "payload", "first paint", "loaded"], rows))
        if "cold_fleet_ms" in figures:
            lines.append("")
            lines.append(
                f"The first fleet page after start, which derives every host's tile: "
                f"{figures['cold_fleet_ms']:,.0f} ms."
            )
        live = figures.get("live")
        if live:
            lines.append("")
            lines.append(
                f"Live: a placement made over gRPC was in an open placements page (no reload) "
                f"{live['p50_s']:.2f} s after Place returned at the median, "
                f"{live['max_s']:.2f} s at worst, of {live['rounds']} placements."
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a small fleet (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "dashboard.json")
    opts = parser.parse_args(argv)
    result = {"machine": machine(), "git": git_state(), **run(opts.quick)}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    print(section(result, ROOT / "bench" / "plots"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
