"""tessera-scheduler: the scheduler process. Concrete parts are wired here only."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from scheduler.core.engine.policies import POLICIES
from scheduler.service.agent_gateway import GrpcAgentGateway
from scheduler.service.coordinator import Leases, PlacementCoordinator
from scheduler.service.housekeeping import Housekeeper, HousekeepingSettings
from scheduler.service.server import SERVICE_NAMES, build_server
from scheduler.store.embedded import EmbeddedValkey
from scheduler.store.redis_store import RedisStateStore
from scheduler.store.safety import UnsafeStoreConfig, check_durability

log = logging.getLogger("tessera.scheduler")


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tessera" / "valkey"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of tessera-scheduler."""
    p = argparse.ArgumentParser(
        prog="tessera-scheduler",
        description="Tessera scheduler: places tenant requests, state in Redis.",
    )
    p.add_argument(
        "--listen",
        default=os.environ.get("TESSERA_LISTEN", "127.0.0.1:50051"),
        help="gRPC listen address (port 0 picks one) [TESSERA_LISTEN; 127.0.0.1:50051]",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", ""),
        help="external Redis/Valkey; empty starts an embedded Valkey [REDIS_URL]",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("TESSERA_DATA_DIR", str(_default_data_dir()))),
        help="AOF directory of the embedded Valkey [TESSERA_DATA_DIR]",
    )
    p.add_argument(
        "--allow-unsafe-redis",
        action="store_true",
        help="start even if Redis may lose acknowledged writes or evict keys",
    )
    p.add_argument("--heartbeat-interval", type=int, default=5, help="seconds between heartbeats")
    p.add_argument("--lease", type=int, default=20, help="seconds a silent host stays schedulable")
    p.add_argument(
        "--reap-pending-after",
        type=float,
        default=90.0,
        help="seconds after which a placement stuck PENDING/RELEASING is torn down (reaper)",
    )
    p.add_argument(
        "--housekeeping-interval", type=float, default=5.0, help="seconds between reaper rounds"
    )
    p.add_argument(
        "--policy",
        choices=sorted(POLICIES),
        default="tessera",
        help="how Place chooses: tessera, or a baseline (first-fit as Kubernetes DRA "
        "allocates, best-fit as kube-scheduler MostAllocated, random) to compare with",
    )
    p.add_argument("--log-level", default=os.environ.get("TESSERA_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


async def serve(opts: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT."""
    embedded: EmbeddedValkey | None = None
    url = opts.redis_url
    if not url:
        embedded = EmbeddedValkey(opts.data_dir)
        embedded.start()
        url = embedded.url
        log.info("started embedded Valkey at %s (data in %s)", url, opts.data_dir)
    client = aioredis.Redis.from_url(
        url,
        decode_responses=False,
        # After a Redis restart or failover every pooled connection is dead:
        # ping one idle for a while before use, and retry a command on a
        # fresh connection a few times before a caller sees UNAVAILABLE.
        health_check_interval=5,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=6),
    )
    gateway = GrpcAgentGateway()
    try:
        try:
            for warning in await check_durability(client, allow_unsafe=opts.allow_unsafe_redis):
                log.warning("%s", warning)
        except UnsafeStoreConfig as err:
            print(f"tessera-scheduler: refusing to start: {err}", file=sys.stderr)
            return 2
        coordinator = PlacementCoordinator(
            RedisStateStore(client),
            gateway,
            Leases(heartbeat_interval_s=opts.heartbeat_interval, lease_s=opts.lease),
            policy=POLICIES[opts.policy](),
        )
        if opts.policy != "tessera":
            log.warning("placing with the %s baseline policy, not Tessera's", opts.policy)
        server, port, health_servicer = build_server(coordinator, opts.listen)
        await server.start()
        host = opts.listen.rsplit(":", 1)[0]
        # The first stdout line is the address: the demo and tests wait for it.
        print(f"tessera-scheduler listening on {host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Every replica runs the housekeeper; only the lease holder acts.
        housekeeper = Housekeeper(
            RedisStateStore(client),
            gateway,
            HousekeepingSettings(
                interval_s=opts.housekeeping_interval,
                pending_after_s=opts.reap_pending_after,
                releasing_after_s=opts.reap_pending_after,
            ),
        )
        housekeeping = asyncio.create_task(housekeeper.run(stop))
        await stop.wait()
        await housekeeping
        for name in (*SERVICE_NAMES, ""):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace=5)
        return 0
    finally:
        await gateway.close()
        await client.aclose()
        if embedded is not None:
            embedded.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of tessera-scheduler."""
    opts = parse_args(argv)
    logging.basicConfig(
        level=opts.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(serve(opts))


if __name__ == "__main__":
    sys.exit(main())
