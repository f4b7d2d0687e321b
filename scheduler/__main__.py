"""tessera-scheduler: the scheduler process. Concrete parts are wired here only."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import signal
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from tessera.logs import add_log_flags, configure
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.engine.policies import (
    PACKING_POLICY,
    POLICIES,
    Policy,
    TesseraPolicy,
    packing_policy,
)
from tessera.scheduler.dashboard.app import Dashboard
from tessera.scheduler.dashboard.cluster_view import ClusterView
from tessera.scheduler.dashboard.live import ChangeFeed
from tessera.scheduler.dashboard.metrics import SchedulerMetrics
from tessera.scheduler.dashboard.server import split_listen, start_http
from tessera.scheduler.flags import seconds, seconds_or_off
from tessera.scheduler.service import collector
from tessera.scheduler.service.agent_connections import AgentConnections, WarmSettings
from tessera.scheduler.service.agent_gateway import GrpcAgentGateway
from tessera.scheduler.service.coordinator import Leases, PlacementCoordinator
from tessera.scheduler.service.housekeeping import Housekeeper, HousekeepingSettings
from tessera.scheduler.service.operator_config import (
    OperatorConfig,
    OperatorConfigError,
    load_operator_config,
)
from tessera.scheduler.service.replica_durability import ReplicaDurabilityWatcher
from tessera.scheduler.service.replica_roster import ReplicaRoster
from tessera.scheduler.service.server import SERVICE_NAMES, build_server
from tessera.scheduler.service.store_health import StoreHealthWatcher
from tessera.scheduler.store.connection import StoreTls, StoreUnusableError, connect_store
from tessera.scheduler.store.embedded import EmbeddedValkey
from tessera.scheduler.store.redis_store import HostRecord, LayoutMismatchError, RedisStateStore
from tessera.scheduler.store.roster import RosterStore
from tessera.scheduler.store.safety import UnsafeStoreConfig, check_durability, sentinel_pool
from tessera.security.audit import AuditLog
from tessera.security.identity import Role
from tessera.security.tls import (
    ChannelCache,
    TlsConfigError,
    TlsDir,
    channel_limit,
    check_listen,
)

log = logging.getLogger("tessera.scheduler")


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tessera" / "valkey"


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; the limit now.

    A scheduler keeps a connection to each agent it talks to, and 1,024 (a
    common soft limit) is far below a fleet. The hard limit is the
    operator's ceiling (systemd's LimitNOFILE, the container runtime's):
    the soft one is only a default, raised here as Go's runtime does.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    # An infinite hard limit (macOS) is capped by the kernel's per-process
    # maximum, which setrlimit refuses to pass: try less, as Go does.
    wanted = [hard] if hard != resource.RLIM_INFINITY else [1 << 20, 1 << 16, 10_240]
    for limit in wanted:
        if limit <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        except (ValueError, OSError) as err:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, limit, err)
            continue
        return limit
    return soft


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
        "--http-listen",
        default=os.environ.get("TESSERA_HTTP_LISTEN", ""),
        help="the dashboard, /metrics, /healthz and /readyz on HOST:PORT (port 0 picks one), "
        "over HTTPS with --tls-dir's identity; empty: off [TESSERA_HTTP_LISTEN]",
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
        help="start even if Redis may lose acknowledged writes or evict keys, or its "
        "rediss:// URL turns certificate checks off (ssl_cert_reqs=none)",
    )
    p.add_argument(
        "--redis-ca",
        type=Path,
        default=_env_path("TESSERA_REDIS_CA"),
        help="rediss://: CA (PEM) that signed the Redis server's certificate; same as "
        "ssl_ca_certs= in the URL; default the system's CAs [TESSERA_REDIS_CA]",
    )
    p.add_argument(
        "--redis-cert",
        type=Path,
        default=_env_path("TESSERA_REDIS_CERT"),
        help="rediss://: client certificate (PEM), for a Redis that requires one "
        "[TESSERA_REDIS_CERT]",
    )
    p.add_argument(
        "--redis-key",
        type=Path,
        default=_env_path("TESSERA_REDIS_KEY"),
        help="rediss://: the client certificate's key (PEM) [TESSERA_REDIS_KEY]",
    )
    p.add_argument(
        "--redis-wait",
        type=float,
        default=10.0,
        help="seconds to wait at start for a Redis that does not answer yet (default 10)",
    )
    p.add_argument("--heartbeat-interval", type=int, default=5, help="seconds between heartbeats")
    p.add_argument("--lease", type=int, default=20, help="seconds a silent host stays schedulable")
    p.add_argument(
        "--reap-pending-after",
        type=seconds,
        default=90.0,
        help="seconds after which a placement stuck PENDING/RELEASING is torn down (reaper)",
    )
    p.add_argument(
        "--housekeeping-interval",
        type=seconds,
        default=5.0,
        help="seconds between reaper rounds",
    )
    p.add_argument(
        "--full-sweep-interval",
        type=seconds,
        default=300.0,
        help="seconds between full sweeps: every host reconciled with its agent, request "
        "records left behind by a crash settled (default 300)",
    )
    p.add_argument(
        "--forget-dead-after",
        type=seconds_or_off,
        default=86_400.0,
        help="seconds past its lease after which a silent host holding no placement is "
        "forgotten (removed from the store, audited, as Nomad collects down nodes); a host "
        "holding one stays listed as expired; 0: never (default 86400: a day)",
    )
    p.add_argument(
        "--agent-warm-interval",
        type=seconds_or_off,
        default=60.0,
        help="seconds between rounds that open connections to the live hosts' agents ahead "
        "of Places, so a Place does not wait for a TLS handshake; 0: off (default 60)",
    )
    p.add_argument(
        "--policy",
        choices=sorted({*POLICIES, PACKING_POLICY}),
        default="tessera",
        help="how Place chooses: tessera; tessera-packing (packs by the task mix it learns, "
        "every feasible host scored: fewer GPUs stranded, a dearer Place at fleet scale); "
        "or a baseline (first-fit as Kubernetes DRA allocates, best-fit as kube-scheduler "
        "MostAllocated, random) to compare with",
    )
    p.add_argument(
        "--tls-dir",
        type=Path,
        default=_env_path("TESSERA_TLS_DIR"),
        help="mutual TLS: ca.pem, cert.pem (a scheduler identity), key.pem; reloaded when "
        "they change [TESSERA_TLS_DIR]; without it, plaintext on loopback only",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext on a non-loopback --listen (anyone who reaches it is trusted)",
    )
    p.add_argument(
        "--operator-config",
        type=Path,
        default=_env_path("TESSERA_OPERATOR_CONFIG"),
        help="YAML: tenants each frontend acts for, labels per host [TESSERA_OPERATOR_CONFIG]",
    )
    p.add_argument(
        "--audit-log",
        default=os.environ.get("TESSERA_AUDIT_LOG", ""),
        help="audit records (JSON lines) to this file, or - for stdout [TESSERA_AUDIT_LOG]",
    )
    add_log_flags(p, os.environ)
    return p.parse_args(argv)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "")
    return Path(value) if value else None


def _security(opts: argparse.Namespace) -> tuple[TlsDir | None, OperatorConfig]:
    """The TLS directory and operator config, checked; SystemExit(2) with one line if unusable."""
    try:
        tls = TlsDir(opts.tls_dir) if opts.tls_dir is not None else None
        if tls is not None and tls.identity.role is not Role.SCHEDULER:
            raise TlsConfigError(
                f"--tls-dir {opts.tls_dir}: the certificate is {tls.identity}, "
                "not a scheduler identity"
            )
        warning = check_listen(opts.listen, tls, opts.insecure, "tessera-scheduler")
        if opts.http_listen:
            split_listen(opts.http_listen)
            http_warning = check_listen(opts.http_listen, tls, opts.insecure, "tessera-scheduler")
            if http_warning and http_warning != warning:
                log.warning("%s", http_warning)
        operator = load_operator_config(opts.operator_config)
    except (TlsConfigError, OperatorConfigError, ValueError) as err:
        print(f"tessera-scheduler: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if warning:
        log.warning("%s", warning)
    if tls is not None:
        log.info("mutual TLS as %s (%s)", tls.identity.uri, opts.tls_dir)
    return tls, operator


async def serve(opts: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT."""
    tls, operator = _security(opts)
    audit = AuditLog(opts.audit_log or None, "scheduler")
    embedded: EmbeddedValkey | None = None
    url = opts.redis_url
    if not url:
        embedded = EmbeddedValkey(opts.data_dir)
        embedded.start()
        url = embedded.url
        # The URL holds the embedded server's password: never log it whole.
        log.info("started embedded Valkey at %s (data in %s)", embedded.redacted_url, opts.data_dir)
    try:
        client = await connect_store(
            url,
            tls=StoreTls(opts.redis_ca, opts.redis_cert, opts.redis_key),
            allow_unsafe=opts.allow_unsafe_redis,
            wait_s=opts.redis_wait,
        )
    except StoreUnusableError as err:
        print(f"tessera-scheduler: refusing to start: {err}", file=sys.stderr)
        audit.close()
        if embedded is not None:
            embedded.stop()
        return 2
    # One channel per agent: the fleet must fit in the descriptors.
    open_files = raise_open_files_limit()
    log.info(
        "open files limit %d: connections to up to %d agents kept",
        open_files, channel_limit(open_files),
    )  # fmt: skip
    gateway = GrpcAgentGateway(ChannelCache(tls, limit=channel_limit(open_files)))
    try:
        try:
            for warning in await check_durability(client, allow_unsafe=opts.allow_unsafe_redis):
                log.warning("%s", warning)
        except UnsafeStoreConfig as err:
            print(f"tessera-scheduler: refusing to start: {err}", file=sys.stderr)
            return 2
        try:
            await RedisStateStore(client).claim_layout()
        except LayoutMismatchError as err:
            print(f"tessera-scheduler: refusing to start: {err}", file=sys.stderr)
            return 2
        # One name for this process: its engine's affinity, its roster
        # membership and its background-job lease.
        replica = f"replica-{uuid.uuid4().hex[:12]}"
        # Place, Explain and PlaceBatch share one engine (one index of the
        # cluster); a baseline policy places with its own.
        policy: Policy
        if opts.policy == PACKING_POLICY:
            packing = packing_policy(affinity=replica)
            engine, policy = packing.engine, packing
        else:
            engine = Engine(affinity=replica)
            policy = (
                TesseraPolicy(engine=engine)
                if opts.policy == "tessera"
                else POLICIES[opts.policy]()
            )
        coordinator = PlacementCoordinator(
            RedisStateStore(client),
            gateway,
            Leases(heartbeat_interval_s=opts.heartbeat_interval, lease_s=opts.lease),
            engine=engine,
            policy=policy,
        )
        if opts.policy not in ("tessera", PACKING_POLICY):
            log.warning("placing with the %s baseline policy, not Tessera's", opts.policy)
        # The dashboard's reading of this replica's model, and the metrics.
        view = ClusterView(coordinator, engine)
        metrics = SchedulerMetrics(
            view,
            commits=lambda: coordinator.commit_outcomes,
            agent_errors=lambda: gateway.errors,
            model=lambda: coordinator.model.stats,
        )
        try:
            server, port, health_servicer = await build_server(
                coordinator,
                opts.listen,
                tls=tls,
                audit=audit,
                operator=operator,
                observe_place=metrics.observe_place,
            )
        except (OSError, RuntimeError) as err:
            # A port in use, an address not of this machine: grpc says which.
            print(f"tessera-scheduler: --listen {opts.listen}: {err}", file=sys.stderr)
            return 2
        await server.start()
        exit_code = 0
        # Handlers before the address line: whoever reads that line may stop
        # us at once, and must get a clean shutdown (embedded Valkey too).
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        host = opts.listen.rsplit(":", 1)[0]
        # The first stdout line is the address: the demo and tests wait for it.
        print(f"tessera-scheduler listening on {host}:{port}", flush=True)
        # Every replica runs the housekeeper; only the lease holder acts.
        housekeeper = Housekeeper(
            RedisStateStore(client),
            gateway,
            HousekeepingSettings(
                interval_s=opts.housekeeping_interval,
                pending_after_s=opts.reap_pending_after,
                releasing_after_s=opts.reap_pending_after,
                lease_s=opts.lease,
                full_sweep_s=opts.full_sweep_interval,
                forget_dead_after_s=opts.forget_dead_after,
            ),
            owner=replica,
            audit=audit,
        )
        housekeeping = asyncio.create_task(housekeeper.run(stop))
        # Replicas split the hosts between them to keep their plans apart.
        roster = asyncio.create_task(
            ReplicaRoster(RosterStore(client), replica, engine.set_peers).run(stop)
        )

        # Connections to agents opened before Places need them.
        async def live_records() -> Mapping[str, HostRecord]:
            await coordinator.refreshed()
            return coordinator.model.records()

        warming = asyncio.create_task(
            AgentConnections(
                live_records,
                gateway,
                prefer=engine.in_share,
                settings=WarmSettings(interval_s=opts.agent_warm_interval),
            ).run(stop)
            if opts.agent_warm_interval
            else stop.wait()
        )
        # NOT_SERVING while the store is down, frozen or refuses us.
        health_watcher = StoreHealthWatcher(client, health_servicer, (*SERVICE_NAMES, ""))
        store_health = asyncio.create_task(health_watcher.run(stop))
        # The dashboard, over this replica's model (no second source of truth).
        http: web.AppRunner | None = None
        live: asyncio.Task[object] = asyncio.create_task(stop.wait())
        if opts.http_listen:
            feed = ChangeFeed(view.refreshed, lambda: view.revision, view.changed_since)
            dashboard = Dashboard(
                view,
                coordinator,
                feed,
                audit=audit,
                tls=tls is not None,
                ready=lambda: health_watcher.problem,
                metrics=metrics.render,
            )
            try:
                http, http_port = await start_http(
                    dashboard.application(),
                    opts.http_listen,
                    tls.http_server_context() if tls is not None else None,
                )
            except OSError as err:
                print(
                    f"tessera-scheduler: --http-listen {opts.http_listen}: {err}", file=sys.stderr
                )
                exit_code = 2
                stop.set()
            else:
                live = asyncio.create_task(feed.run(stop))
                scheme = "https" if tls is not None else "http"
                http_host = split_listen(opts.http_listen)[0]
                http_host = f"[{http_host}]" if ":" in http_host else http_host
                # The second stdout line: the dashboard's address.
                print(
                    f"tessera-scheduler dashboard on {scheme}://{http_host}:{http_port}/",
                    flush=True,
                )
        # Behind Sentinel, replicas attached or changed after start are checked too.
        sentinels = sentinel_pool(client)
        replicas = asyncio.create_task(
            ReplicaDurabilityWatcher(sentinels).run(stop) if sentinels else stop.wait()
        )
        await stop.wait()
        await live
        if http is not None:
            await http.cleanup()
        await housekeeping
        await roster
        await warming
        await store_health
        await replicas
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=5)
        # How often this replica's plans met a store that had moved on.
        log.info(
            "commit outcomes this run: %s",
            json.dumps(dict(sorted(coordinator.commit_outcomes.items()))),
        )
        return exit_code
    finally:
        await gateway.close()
        audit.close()
        await client.aclose()
        if embedded is not None:
            embedded.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of tessera-scheduler."""
    opts = parse_args(argv)
    configure(opts.log_level, opts.log_format)
    collector.tune()
    return asyncio.run(serve(opts))


if __name__ == "__main__":
    sys.exit(main())
