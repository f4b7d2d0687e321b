"""Sustained placements per second with 16 and 64 concurrent clients.

End to end (Tessera only; the baselines are not wired into the scheduler
service): two scheduler replicas on one embedded Valkey, a registered fleet
and one stub agent (bench/latency.py's ``E2eCluster``: real gRPC over mutual
TLS, real Lua commits, no actuation). Each client thread alternates between the replicas
and runs place -> release cycles of the mixed shapes for a fixed time;
ABORTED / RESOURCE_EXHAUSTED / UNAVAILABLE answers are counted and retried.

In process, per policy: one asyncio task per client against a real
:class:`RedisStateStore` on an embedded Valkey, as a scheduler replica runs
them: read the snapshot the scheduler's way (``PlacementCoordinator.snapshot``,
host views cached), ``policy.place``, then the store's commit protocol
(``claim_request`` + ``commit_reservation``); a CONFLICT (the host changed
since the snapshot) replans on a fresh snapshot. Every policy pays the same
read and commit path, so contention shows in its conflict rate: policies
that send every client to the same host (first fit) conflict most.
Placements are kept (no release), on a fleet large enough not to fill.

    PYTHONPATH=. .venv/bin/python bench/throughput.py [--quick] [--out bench/out/throughput.json]
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import redis.asyncio as aioredis

if __package__ in (None, ""):
    # Run as a script: make ``bench`` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.engine import MIXED, TENANTS
from bench.fleet import build_fleet
from bench.latency import E2eCluster, to_wire
from bench.policies import POLICIES, Policy
from tessera.scheduler.core import guards
from tessera.scheduler.core.identity import PlacementId
from tessera.scheduler.core.plan import Plan
from tessera.scheduler.core.request import ExclusivityDomain, PlacementRequest
from tessera.scheduler.service.agent_gateway import AgentGateway
from tessera.scheduler.service.convert import placement_from_plan
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.store import schema
from tessera.scheduler.store.embedded import EmbeddedValkey
from tessera.scheduler.store.redis_store import ClaimOutcome, CommitOutcome, RedisStateStore
from tessera.v1 import scheduler_pb2

OUT = Path(__file__).parent / "out"
SEED = 20261124
CLIENTS = (16, 64)
#: Commit attempts per request before it counts as given up (the scheduler's own limit is 5).
MAX_ATTEMPTS = 8
RETRIED = {
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}

#: The shapes of the load: bench/engine.py's mix without whole hosts (8 GPUs).
LOAD_SHAPES = {name: entry for name, entry in MIXED.items() if name != "8-gpu"}


def request_stream(rng: random.Random, prefix: str) -> PlacementRequest:
    """One request of :data:`LOAD_SHAPES`, by their shares, random tenant."""
    names = list(LOAD_SHAPES)
    name = rng.choices(names, [LOAD_SHAPES[k][1] for k in names])[0]
    return LOAD_SHAPES[name][0](
        f"{prefix}-{uuid.uuid4().hex[:12]}-{name}", f"tenant-{rng.randrange(TENANTS):02d}"
    )


# ---------------------------------------------------------------- end to end


def e2e_load(cluster: E2eCluster, clients: int, duration_s: float, seed: int) -> dict[str, Any]:
    """``clients`` threads of place -> release cycles for ``duration_s`` (bench/tls_cost.py too).

    Args:
        cluster: up, its fleet registered.
        clients: threads; each alternates between the replicas.
        duration_s: how long new cycles start.
        seed: of the request stream (each client its own).
    """
    lock = threading.Lock()
    place_s: list[float] = []
    errors: dict[str, int] = {}
    placed = [0]
    stop_at = time.perf_counter() + duration_s

    def count(code: str) -> None:
        with lock:
            errors[code] = errors.get(code, 0) + 1

    with cluster.stubs() as stubs:

        def client(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            turn = k
            while time.perf_counter() < stop_at:
                msg = to_wire(request_stream(rng, f"c{k}"))
                turn += 1
                stub = stubs[turn % len(stubs)]  # alternate replicas, as the e2e driver does
                t0 = time.perf_counter()
                try:
                    placement = stub.Place(
                        scheduler_pb2.PlaceRequest(request=msg), timeout=120
                    ).placement
                except grpc.RpcError as err:
                    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
                    count(code.name)
                    if code not in RETRIED:
                        return
                    continue
                took = time.perf_counter() - t0
                with lock:
                    place_s.append(took)
                    placed[0] += 1
                try:
                    stub.Release(
                        scheduler_pb2.ReleaseRequest(placement_id=placement.placement_id),
                        timeout=120,
                    )
                except grpc.RpcError as err:
                    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
                    count(f"release-{code.name}")

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
    return {
        "clients": clients,
        "duration_s": round(wall, 3),
        "placements": placed[0],
        "placements_per_s": round(placed[0] / wall, 2),
        "place": report.summary_ms(place_s),
        "errors": errors,
    }


def end_to_end(hosts: int, duration_s: float, clients: Sequence[int], seed: int) -> dict[str, Any]:
    """Two replicas running each policy, a registered fleet of ``hosts``, each client count."""
    fleet = build_fleet(hosts, seed)
    policies: dict[str, Any] = {}
    for policy in POLICIES:
        with (
            tempfile.TemporaryDirectory(prefix="tessera-throughput-") as tmp,
            E2eCluster(Path(tmp), replicas=2, policy=policy, log_level="INFO") as cluster,
        ):
            register_s = cluster.register(fleet)
            # Warm both replicas: parse every inventory, build the engine's indexes.
            e2e_load(cluster, 2, 0.5, seed)
            runs = {str(c): e2e_load(cluster, c, duration_s, seed + c) for c in clients}
            cluster.__exit__()  # stopped: the replicas log their commit outcomes
            outcomes = cluster.commit_outcomes()
        commits = sum(outcomes.values())
        for c, r in runs.items():
            print(
                f"    e2e {policy} {c} clients: {r['placements_per_s']}/s {r['place']} "
                f"{r['errors']}",
                flush=True,
            )
        policies[policy] = {
            "tls": cluster.tls,
            "certs_s": round(cluster.certs_s, 3),
            "register_s": round(register_s, 3),
            "runs": runs,
            # Over the whole run (warm-up and every client count): both
            # replicas' commits, and the share the store refused as planned
            # on moved state.
            "commit_outcomes": outcomes,
            "conflict_rate": round(outcomes.get("CONFLICT", 0) / commits, 4) if commits else None,
        }
    return {"hosts": hosts, "replicas": 2, "policies": policies}


# ---------------------------------------------------------------- in process


class _NoAgents:
    """The coordinator's agent gateway, never called here (only its snapshot is used)."""

    async def prepare(self, address: str, placement: Any) -> Any:
        raise AssertionError("not used")

    async def unprepare(self, address: str, placement: Any) -> None:
        raise AssertionError("not used")


async def _policy_load(
    url: str, policy: Policy, clients: int, per_client: int, seed: int
) -> dict[str, Any]:
    """``clients`` tasks, ``per_client`` placements each, through the store's commit path."""
    client = aioredis.Redis.from_url(url, decode_responses=False)
    store = RedisStateStore(client)
    coordinator = PlacementCoordinator(store, cast(AgentGateway, _NoAgents()))
    commit_s: list[float] = []
    place_s: list[float] = []
    outcomes: dict[str, int] = {}
    gave_up = [0]
    unschedulable = [0]
    await coordinator.snapshot()  # parse every inventory once, as a warm replica has

    async def one(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        for _ in range(per_client):
            request = request_stream(rng, f"{policy.name}-{clients}-{k}")
            wire = to_wire(request)
            claimant = uuid.uuid4().hex
            t0 = time.perf_counter()
            claim = await store.claim_request(request.request_id, "bench", claimant)
            assert claim.outcome is ClaimOutcome.CLAIMED
            for _attempt in range(MAX_ATTEMPTS):
                snap, _ = await coordinator.snapshot()
                result = policy.place(snap, request)
                if not isinstance(result, Plan):
                    unschedulable[0] += 1
                    await store.abandon_claim(request.request_id, claimant)
                    break
                placement = placement_from_plan(
                    result,
                    placement_id=PlacementId(
                        schema.placement_id(uuid.uuid4().hex[:16], result.host_id)
                    ),
                    request=wire,
                    now_ms=int(time.time() * 1000),
                )
                c0 = time.perf_counter()
                planned_on = snap.hosts[result.host_id]
                done = await store.commit_reservation(
                    host_id=result.host_id,
                    guards=guards.expected(
                        planned_on.view,
                        planned_on.versions,
                        result.slots,
                        exclusive=request.exclusivity is not ExclusivityDomain.NONE,
                    ),
                    bumps=guards.changed_by(planned_on.view, result.slots),
                    slots=list(result.slots),
                    placement_id=placement.placement_id,
                    placement=placement.SerializeToString(),
                    request_id=request.request_id,
                    claimant=claimant,
                    tenant=request.tenant,
                )
                commit_s.append(time.perf_counter() - c0)
                outcomes[done.outcome.name] = outcomes.get(done.outcome.name, 0) + 1
                if done.outcome is CommitOutcome.COMMITTED:
                    place_s.append(time.perf_counter() - t0)
                    break
            else:
                gave_up[0] += 1
                await store.abandon_claim(request.request_id, claimant)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(one(k) for k in range(clients)))
    finally:
        await client.aclose()
    wall = time.perf_counter() - started
    committed = outcomes.get("COMMITTED", 0)
    attempts = sum(outcomes.values())
    return {
        "clients": clients,
        "requests": clients * per_client,
        "placements": committed,
        "placements_per_s": round(committed / wall, 2),
        "wall_s": round(wall, 3),
        "commit_outcomes": outcomes,
        "conflicts": outcomes.get("CONFLICT", 0),
        "conflict_rate": round(outcomes.get("CONFLICT", 0) / attempts, 4) if attempts else 0.0,
        "gave_up": gave_up[0],
        "unschedulable": unschedulable[0],
        "commit": report.summary_ms(commit_s),
        "placement": report.summary_ms(place_s),
    }


async def _register(url: str, hosts: int, seed: int) -> None:
    client = aioredis.Redis.from_url(url, decode_responses=False)
    store = RedisStateStore(client)
    try:
        await client.flushdb()
        now = int(time.time() * 1000)
        for inv in build_fleet(hosts, seed):
            await store.upsert_host(
                inv.host_id,
                inv.SerializeToString(),
                inventory_generation=1,
                boot_id=inv.boot_id,
                agent_address="127.0.0.1:1",
                now_ms=now,
            )
    finally:
        await client.aclose()


def in_process(
    hosts: int, per_client_total: int, clients: Sequence[int], seed: int
) -> dict[str, Any]:
    """Every policy, every client count, each on a freshly registered fleet."""
    out: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="tessera-throughput-store-") as tmp,
        EmbeddedValkey(Path(tmp)) as server,
    ):
        for name, factory in POLICIES.items():
            runs: dict[str, Any] = {}
            for c in clients:
                asyncio.run(_register(server.url, hosts, seed))
                per_client = max(1, per_client_total // c)
                runs[str(c)] = asyncio.run(
                    _policy_load(server.url, factory(), c, per_client, seed + c)
                )
                r = runs[str(c)]
                print(
                    f"    {name} {c} clients: {r['placements_per_s']}/s conflicts "
                    f"{r['conflicts']} commit {r['commit']['p50_ms']} ms",
                    flush=True,
                )
            out[name] = runs
    return {"hosts": hosts, "total_requests": per_client_total, "policies": out}


# ---------------------------------------------------------------- part API


def run(quick: bool) -> dict[str, Any]:
    """Measure; a JSON-able result (see the module doc)."""
    if quick:
        e2e_hosts, duration, inproc_hosts, total = 50, 3.0, 60, 64
    else:
        e2e_hosts, duration, inproc_hosts, total = 200, 30.0, 250, 640
    started = time.perf_counter()
    result: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "seed": SEED,
        "clients": list(CLIENTS),
        "in_process": in_process(inproc_hosts, total, CLIENTS, SEED),
        "end_to_end": end_to_end(e2e_hosts, duration, CLIENTS, SEED),
    }
    result["wall_s"] = round(time.perf_counter() - started, 3)
    return result


def section(result: Mapping[str, Any], plots: Path) -> str:
    """The Markdown section: placements/s and conflicts per policy and client count."""
    inproc: Mapping[str, Any] = result["in_process"]
    clients = [str(c) for c in result["clients"]]
    rows: list[list[object]] = []
    for name, runs in inproc["policies"].items():
        for c in clients:
            r = runs[c]
            rows.append(
                [
                    name,
                    int(c),
                    r["placements"],
                    r["placements_per_s"],
                    r["conflicts"],
                    r["conflict_rate"],
                    r["gave_up"],
                    r["commit"]["p50_ms"],
                    r["commit"]["p99_ms"],
                    r["placement"]["p99_ms"],
                ]
            )
    rate_plot = report.bar_plot(
        plots / "throughput_inprocess.png",
        "Placements/s, in process, real store commits",
        "placements/s",
        [f"{c} clients" for c in clients],
        {
            name: [float(runs[c]["placements_per_s"]) for c in clients]
            for name, runs in inproc["policies"].items()
        },
    )
    conflict_plot = report.bar_plot(
        plots / "throughput_conflicts.png",
        "Commit conflict rate (CONFLICT / commit attempts)",
        "rate",
        [f"{c} clients" for c in clients],
        {
            name: [float(runs[c]["conflict_rate"]) for c in clients]
            for name, runs in inproc["policies"].items()
        },
    )
    e2e: Mapping[str, Any] = result["end_to_end"]
    e2e_rows = [
        [
            policy,
            int(c),
            r["placements"],
            r["placements_per_s"],
            r["place"]["p50_ms"],
            r["place"]["p99_ms"],
            ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "none",
        ]
        for policy, entry in e2e["policies"].items()
        for c, r in entry["runs"].items()
    ]
    return "\n\n".join(
        [
            "## Throughput under concurrency",
            f"In process: per policy, N asyncio clients on {inproc['hosts']:,} hosts, "
            f"{inproc['total_requests']} requests in all (mixed shapes, kept), each read the "
            "snapshot the scheduler's way, place, and commit through the real store "
            "(`claim_request` + `commit_reservation` on an embedded Valkey); a CONFLICT "
            f"replans on a fresh snapshot (at most {MAX_ATTEMPTS} attempts). Commit latency is "
            "one `commit_reservation` call; placement p99 includes reads and replans.",
            report.table(
                [
                    "policy",
                    "clients",
                    "placed",
                    "placements/s",
                    "conflicts",
                    "conflict rate",
                    "gave up",
                    "commit p50 ms",
                    "commit p99 ms",
                    "placement p99 ms",
                ],
                rows,
            ),
            rate_plot,
            conflict_plot,
            "### End to end",
            f"Two scheduler replicas running the policy (`tessera-scheduler --policy NAME`), "
            f"{e2e['hosts']:,} registered hosts, one stub agent (no actuation), real gRPC and "
            "Valkey; client threads alternate replicas and run place -> release cycles of the "
            "mixed shapes for a fixed time.",
            report.table(
                [
                    "policy",
                    "clients",
                    "placements",
                    "placements/s",
                    "Place p50 ms",
                    "Place p99 ms",
                    "errors",
                ],
                e2e_rows,
            ),
            "Commits the store refused as planned on moved state, over each policy's whole "
            "run (both replicas, warm-up and every client count, as they logged them when "
            "stopped): "
            + "; ".join(
                f"{policy} {entry['conflict_rate']:.1%} of "
                f"{sum(entry['commit_outcomes'].values()):,}"
                if entry.get("conflict_rate") is not None
                else f"{policy} not counted"
                for policy, entry in e2e["policies"].items()
            )
            + ".",
            report.bar_plot(
                plots / "throughput_e2e.png",
                "Placements/s end to end (2 replicas, gRPC, Valkey)",
                "placements/s",
                [f"{c} clients" for c in clients],
                {
                    policy: [float(entry["runs"][str(c)]["placements_per_s"]) for c in clients]
                    for policy, entry in e2e["policies"].items()
                },
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run, write JSON, print a summary."""
    return report.part_main(argv, __doc__, run, OUT / "throughput.json", "small sizes, for CI")


if __name__ == "__main__":
    raise SystemExit(main())
