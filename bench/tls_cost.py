"""The cost of mutual TLS: Place latency, placements/s and connection set-up, beside plaintext.

Two end-to-end clusters (bench/latency.py's ``E2eCluster``) run on this
machine at once, alike but for ``tls``: each an embedded Valkey, two
scheduler replicas and one stub agent (no actuation), the same seeded fleet
registered through the real Register RPC. With TLS every connection is mutual
TLS from the cluster's own CA, as in production: each host registers as its
own ``agent/<host>`` identity, the clients call as ``admin/bench``, the
scheduler checks the stub agent's certificate names ``<host>.agent.tessera``.

Measured in rounds. Each step runs on both clusters back to back, plaintext
first on even rounds and TLS first on odd ones, so what the machine does
meanwhile (other processes, frequency scaling, a warming cache) hits both
modes alike:

1. latency: one client on replica 0, sequential, ``per_shape`` times every
   shape of bench/engine.py, each placement released at once (timed apart),
   so every round starts from the same state;
2. connection set-up: a fresh channel with a subchannel pool of its own (so
   a new TCP connection, and with TLS a full handshake: gRPC clients do not
   resume TLS sessions), time to the first successful ``Health/Check``; then
   one more call on the same channel, the warm cost of that call;
3. throughput: bench/throughput.py's end-to-end driver, 16 then 64 client
   threads alternating replicas, place -> release cycles for ``duration_s``.

Before the rounds, per mode: issuing the hosts' certificates (TLS only;
timed apart from registration, since an operator issues them beforehand),
registering the fleet (a channel per host, as each agent has its own), a
first Place (parses every inventory) and a short warm-up load on both
replicas. Ratios are TLS over plaintext: above 1 for latency and set-up is
what TLS costs; below 1 for placements/s. Nothing asserts on time.

One difference comes from the stub agent standing for every host: the
scheduler keeps a channel per host, and with TLS each verifies its own host
name, so each host gets its own connection (and handshake, opened by the
scheduler's warming as the host registers) as it would in production;
plaintext channels to the one stub address are alike, and gRPC lets them
share a connection.

    PYTHONPATH=. .venv/bin/python bench/tls_cost.py [--quick] [--out FILE]

writes ``bench/out/tls_cost.json`` (``bench/out/quick/tls_cost.json`` with
``--quick``) and prints a short report.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

if __package__ in (None, ""):
    # Run as a script: make ``bench`` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.engine import SHAPES
from bench.fleet import build_fleet
from bench.latency import E2eCluster, first_place, sequential
from bench.throughput import CLIENTS, e2e_load
from tessera.security.identity import SCHEDULER_DNS_NAME
from tessera.security.tls import channel_options
from tessera.v1 import scheduler_pb2_grpc

OUT = Path(__file__).parent / "out"
SEED = 20261124

#: The two modes, in the order of even rounds.
MODES = ("plain", "tls")

#: Scheduler replicas per cluster: the throughput driver alternates between them.
REPLICAS = 2

#: A channel with a subchannel pool of its own: without it gRPC hands a new
#: channel the connection another channel to the same target already holds,
#: and there would be no set-up to measure.
_FRESH_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


def _ratio(tls: float, plain: float) -> float:
    """TLS over plaintext; NaN when either is missing or plaintext is zero."""
    if math.isnan(tls) or math.isnan(plain) or plain == 0:
        return math.nan
    return round(tls / plain, 3)


def _paired(tls: Sequence[float], plain: Sequence[float]) -> float:
    """The median of the rounds' own TLS / plaintext ratios.

    Each round ran both modes back to back, so a ratio within a round is
    spared the drift between rounds that a ratio of pooled figures carries.
    """
    ratios = [r for t, p in zip(tls, plain, strict=True) if not math.isnan(r := _ratio(t, p))]
    return round(statistics.median(ratios), 3) if ratios else math.nan


def _order(round_index: int) -> tuple[str, ...]:
    """The modes in the order round ``round_index`` runs them (flipped every round)."""
    return MODES if round_index % 2 == 0 else MODES[::-1]


# ---------------------------------------------------------------- steps


def connect_samples(cluster: E2eCluster, samples: int) -> tuple[list[float], list[float]]:
    """Fresh connections to replica 0: seconds to the first ``Health/Check``, and a second one.

    The client's credentials are built once, outside the timing, as a
    long-lived client holds them; what is timed is the channel, its TCP
    connection, the TLS handshake (client certificate included), HTTP/2's
    set-up and the call. ``LocalCluster.channel`` cannot be used here: it
    shares connections (see :data:`_FRESH_CONNECTION`).

    Returns:
        (first call on a fresh channel, second call on the same channel), seconds.
    """
    tls = cluster.client_tls()
    address = cluster.addresses[0]
    request = health_pb2.HealthCheckRequest()
    first: list[float] = []
    warm: list[float] = []
    credentials = tls.channel_credentials() if tls is not None else None
    for _ in range(samples):
        t0 = time.perf_counter()
        if credentials is None:
            channel = grpc.insecure_channel(address, options=[_FRESH_CONNECTION])
        else:
            options = [*channel_options(SCHEDULER_DNS_NAME), _FRESH_CONNECTION]
            channel = grpc.secure_channel(address, credentials, options=options)
        with channel:
            health = health_pb2_grpc.HealthStub(channel)
            health.Check(request, timeout=10)
            t1 = time.perf_counter()
            health.Check(request, timeout=10)
            t2 = time.perf_counter()
        first.append(t1 - t0)
        warm.append(t2 - t1)
    return first, warm


def _start(workdir: Path) -> dict[str, E2eCluster]:
    """Both clusters, started side by side (each takes seconds, mostly imports).

    Raises:
        BaseException: whatever a start raised, once every cluster that did
            start is stopped again.
    """
    clusters = {
        mode: E2eCluster(workdir / mode, replicas=REPLICAS, tls=mode == "tls") for mode in MODES
    }
    with futures.ThreadPoolExecutor(len(clusters)) as pool:
        starts = {mode: pool.submit(c.__enter__) for mode, c in clusters.items()}
    failed = [err for f in starts.values() if (err := f.exception()) is not None]
    if failed:
        # A cluster that failed stopped itself (E2eCluster.__enter__); stop the other.
        for mode, f in starts.items():
            if f.exception() is None:
                clusters[mode].__exit__()
        raise failed[0]
    return clusters


# ---------------------------------------------------------------- measurement


def measure(
    hosts: int,
    *,
    rounds: int,
    per_shape: int,
    duration_s: float,
    clients: Sequence[int],
    connections: int,
    seed: int,
) -> dict[str, Any]:
    """Plaintext and TLS side by side (see the module doc); a JSON-able result.

    Args:
        hosts: fleet size (bench/fleet.py's default mix).
        rounds: of every step, modes alternating.
        per_shape: latency: placements of every shape per round and mode.
        duration_s: throughput: seconds per client count, round and mode.
        clients: throughput: client counts.
        connections: connection set-up samples per mode, spread over the rounds.
        seed: of the fleet and the request streams.
    """
    fleet = build_fleet(hosts, seed)
    per_round_connections = max(1, math.ceil(connections / rounds))
    setup: dict[str, dict[str, Any]] = {}
    place: dict[str, list[float]] = {m: [] for m in MODES}
    release: dict[str, list[float]] = {m: [] for m in MODES}
    place_errors: dict[str, dict[str, int]] = {m: {} for m in MODES}
    round_p50: dict[str, list[float]] = {m: [] for m in MODES}
    first_call: dict[str, list[float]] = {m: [] for m in MODES}
    warm_call: dict[str, list[float]] = {m: [] for m in MODES}
    loads: dict[str, dict[str, list[dict[str, Any]]]] = {
        str(c): {m: [] for m in MODES} for c in clients
    }
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-tls-cost-")))
        clusters = _start(tmp)
        for cluster in clusters.values():
            stack.callback(cluster.__exit__)
        stubs: dict[str, scheduler_pb2_grpc.SchedulerStub] = {}
        for mode in MODES:
            cluster = clusters[mode]
            register_s = cluster.register(fleet)
            stubs[mode] = stack.enter_context(cluster.stubs())[0]
            first_s = first_place(stubs[mode], "tls-cost-first")
            # Warm both replicas (inventories parsed, indexes built) and, with
            # TLS, the scheduler's connection to the stub agent for the hosts
            # the shapes land on, so the rounds measure the steady state.
            sequential(stubs[mode], 1, "warm", release=True)
            e2e_load(cluster, 2, 0.5, seed)
            setup[mode] = {
                "certs_s": round(cluster.certs_s, 3),
                "cert_ms": round(cluster.certs_s / len(fleet) * 1000, 3) if cluster.tls else 0.0,
                "register_s": round(register_s, 3),
                "first_place_ms": round(first_s * 1000, 3),
            }
            print(f"    {mode}: {setup[mode]}", flush=True)
        for r in range(rounds):
            order = _order(r)
            for mode in order:
                run = sequential(stubs[mode], per_shape, f"r{r:03d}", release=True)
                place[mode] += run.every_place_s
                release[mode] += run.release_s
                for code, n in run.errors.items():
                    place_errors[mode][code] = place_errors[mode].get(code, 0) + n
                round_p50[mode].append(report.summary_ms(run.every_place_s)["p50_ms"])
            for mode in order:
                first, warm = connect_samples(clusters[mode], per_round_connections)
                first_call[mode] += first
                warm_call[mode] += warm
            for c in clients:
                for mode in order:
                    # The same request stream for both modes in a round.
                    loads[str(c)][mode].append(
                        e2e_load(clusters[mode], c, duration_s, seed + c + 1000 * r)
                    )
            print(
                f"    round {r + 1}/{rounds} ({' then '.join(order)}): Place p50 "
                + ", ".join(f"{m} {round_p50[m][-1]:.2f} ms" for m in MODES)
                + "; placements/s "
                + ", ".join(
                    f"{c} clients {m} {loads[str(c)][m][-1]['placements_per_s']}"
                    for c in clients
                    for m in MODES
                ),
                flush=True,
            )
    latency: dict[str, Any] = {
        m: {
            "asked": rounds * per_shape * len(SHAPES),
            "place": report.summary_ms(place[m]),
            "release": report.summary_ms(release[m]),
            "round_p50_ms": round_p50[m],
            "errors": place_errors[m],
        }
        for m in MODES
    }
    latency["ratio"] = {
        key: _ratio(latency["tls"]["place"][key], latency["plain"]["place"][key])
        for key in ("p50_ms", "p99_ms", "mean_ms")
    }
    latency["ratio"]["release_p50_ms"] = _ratio(
        latency["tls"]["release"]["p50_ms"], latency["plain"]["release"]["p50_ms"]
    )
    latency["ratio"]["round_p50_median"] = _paired(round_p50["tls"], round_p50["plain"])
    throughput: dict[str, Any] = {}
    for c in clients:
        entry: dict[str, Any] = {}
        for m in MODES:
            runs = loads[str(c)][m]
            placements = sum(int(x["placements"]) for x in runs)
            wall = sum(float(x["duration_s"]) for x in runs)
            errors: dict[str, int] = {}
            for x in runs:
                for code, n in x["errors"].items():
                    errors[code] = errors.get(code, 0) + n
            entry[m] = {
                "placements": placements,
                "wall_s": round(wall, 3),
                "placements_per_s": round(placements / wall, 2) if wall else math.nan,
                "round_placements_per_s": [x["placements_per_s"] for x in runs],
                # e2e_load keeps no samples: the median of the rounds' p50s.
                "place_p50_ms": round(statistics.median(x["place"]["p50_ms"] for x in runs), 3),
                "errors": errors,
            }
        entry["ratio"] = _ratio(
            entry["tls"]["placements_per_s"], entry["plain"]["placements_per_s"]
        )
        entry["round_ratio_median"] = _paired(
            entry["tls"]["round_placements_per_s"], entry["plain"]["round_placements_per_s"]
        )
        throughput[str(c)] = entry
    connect: dict[str, Any] = {}
    for m in MODES:
        first_summary = report.summary_ms(first_call[m])
        warm_summary = report.summary_ms(warm_call[m])
        connect[m] = {
            "first_call": first_summary,
            "warm_call": warm_summary,
            # What the connection itself costs: the first call less a warm one.
            "setup_p50_ms": round(first_summary["p50_ms"] - warm_summary["p50_ms"], 3),
        }
    connect["ratio"] = {
        "first_call_p50_ms": _ratio(
            connect["tls"]["first_call"]["p50_ms"], connect["plain"]["first_call"]["p50_ms"]
        ),
        "setup_p50_ms": _ratio(connect["tls"]["setup_p50_ms"], connect["plain"]["setup_p50_ms"]),
    }
    return {
        "hosts": len(fleet),
        "replicas": REPLICAS,
        "rounds": rounds,
        "per_shape": per_shape,
        "duration_s": duration_s,
        "clients": list(clients),
        "connections_per_round": per_round_connections,
        "setup": setup,
        "latency": latency,
        "throughput": throughput,
        "connect": connect,
    }


# ---------------------------------------------------------------- part API


def run(quick: bool) -> dict[str, Any]:
    """Measure at the part's sizes; a JSON-able result (see the module doc)."""
    if quick:
        hosts, rounds, per_shape, duration_s, connections = 100, 2, 3, 1.0, 10
    else:
        # Many short rounds rather than a few long ones: the more often the
        # modes alternate, the more evenly a burst of machine noise is shared.
        # 200 hosts, part (b)'s end-to-end fleet: at 1,000 every Place reads
        # a snapshot of 100+ ms, in which TLS's share is lost in the noise.
        hosts, rounds, per_shape, duration_s, connections = 200, 10, 10, 5.0, 50
    started = time.perf_counter()
    result: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "seed": SEED,
        **measure(
            hosts,
            rounds=rounds,
            per_shape=per_shape,
            duration_s=duration_s,
            clients=CLIENTS,
            connections=connections,
            seed=SEED,
        ),
    }
    result["wall_s"] = round(time.perf_counter() - started, 3)
    return result


def _rows(result: Mapping[str, Any]) -> list[list[object]]:
    """Figure, plaintext, TLS, TLS / plaintext: the rows of the report's table."""
    lat = result["latency"]
    con = result["connect"]
    setup = result["setup"]
    rows: list[list[object]] = []

    def row(label: str, plain: float, tls: float, paired: float | str = "") -> None:
        difference = tls - plain if not (math.isnan(tls) or math.isnan(plain)) else math.nan
        rows.append([label, plain, tls, difference, _ratio(tls, plain), paired])

    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        row(
            f"Place {label} ms, one client",
            lat["plain"]["place"][key],
            lat["tls"]["place"][key],
            lat["ratio"]["round_p50_median"] if key == "p50_ms" else "",
        )
    row(
        "Release p50 ms, one client",
        lat["plain"]["release"]["p50_ms"],
        lat["tls"]["release"]["p50_ms"],
    )
    for c, entry in result["throughput"].items():
        row(
            f"placements/s, {c} clients",
            entry["plain"]["placements_per_s"],
            entry["tls"]["placements_per_s"],
            entry["round_ratio_median"],
        )
        row(
            f"Place p50 ms under {c} clients",
            entry["plain"]["place_p50_ms"],
            entry["tls"]["place_p50_ms"],
        )
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        row(
            f"first call on a fresh connection, {label} ms",
            con["plain"]["first_call"][key],
            con["tls"]["first_call"][key],
        )
    row("the same call once connected, p50 ms", *(con[m]["warm_call"]["p50_ms"] for m in MODES))
    row("connection set-up (difference of p50s), ms", *(con[m]["setup_p50_ms"] for m in MODES))
    row(
        f"register {result['hosts']:,} hosts, s",
        setup["plain"]["register_s"],
        setup["tls"]["register_s"],
    )
    row("first Place after registration, ms", *(setup[m]["first_place_ms"] for m in MODES))
    return rows


_HEADERS = ["figure", "plaintext", "TLS", "TLS - plain", "TLS / plain", "per round, median"]


def section(result: Mapping[str, Any], plots: Path) -> str:
    """The Markdown section: one table, plaintext and TLS side by side."""
    lat = result["latency"]
    errors = {m: {**lat[m]["errors"]} for m in MODES}
    for entry in result["throughput"].values():
        for m in MODES:
            for code, n in entry[m]["errors"].items():
                errors[m][code] = errors[m].get(code, 0) + n
    shown = "; ".join(
        f"{m}: " + (", ".join(f"{k} {v}" for k, v in sorted(errors[m].items())) or "none")
        for m in MODES
    )
    tls_setup = result["setup"]["tls"]
    return "\n\n".join(
        [
            "## Cost of mutual TLS",
            f"Two clusters on the same machine at once, alike but for TLS: an embedded Valkey, "
            f"{result['replicas']} scheduler replicas, one stub agent (no actuation), "
            f"{result['hosts']:,} hosts registered through the real Register RPC (with TLS each "
            "as its own `agent/<host>` identity; the clients call as an admin). "
            f"{result['rounds']} rounds; each step runs on both clusters back to back, the order "
            "flipping every round. Latency: one client, "
            f"{result['per_shape']} of each of the {len(SHAPES)} shapes per round, each placement "
            "released at once (steady state). Throughput: bench/throughput.py's end-to-end "
            f"driver, {result['duration_s']:g} s per client count and round. Connection set-up: "
            f"a new connection ({result['connections_per_round']} per round), time to its first "
            "`Health/Check`; gRPC clients do not resume TLS sessions, so each is a full "
            "handshake. TLS / plain divides the figures over every round; `per round, "
            "median` is the median of each round's own ratio (both modes back to back), "
            "which drift between rounds does not reach.",
            report.table(_HEADERS, _rows(result)),
            f"Issuing the {result['hosts']:,} agent certificates took {tls_setup['certs_s']:.2f} s "
            f"({tls_setup['cert_ms']:.1f} ms each: an ECDSA P-256 key, a signature, three files "
            f"fsynced), not counted in registration. Failed or retried calls: {shown}.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run, write JSON, print the table."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, well under a minute")
    p.add_argument("--out", type=Path, help="JSON (default bench/out[/quick]/tls_cost.json)")
    opts = p.parse_args(argv)
    out: Path = opts.out or (OUT / "quick" if opts.quick else OUT) / "tls_cost.json"
    result = run(opts.quick)
    report.write_result(result, out)
    print(report.table(_HEADERS, _rows(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
