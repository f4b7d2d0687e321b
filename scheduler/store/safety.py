"""Refuse a Redis that may lose or evict the scheduler's state.

A placement acknowledged to a tenant must survive a Redis restart, and a slot
owner must never disappear on its own: if either happens, a device in use is
handed out a second time. So the scheduler checks the server's persistence and
eviction settings at startup and refuses to run on an unsafe one unless the
operator explicitly accepts the risk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisError, ResponseError

_OVERRIDE = "pass --allow-unsafe-redis"
#: How a finding the operator accepted with --allow-unsafe-redis is reported.
_UNSAFE = "running on an unsafe Redis (--allow-unsafe-redis): "


class UnsafeStoreConfig(RuntimeError):  # noqa: N818 - the name the scheduler imports
    """The Redis server may lose acknowledged state.

    Args:
        problems: one sentence per unsafe setting, each saying why and how to fix it.

    Attributes:
        problems: the same sentences.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


async def _config(client: aioredis.Redis) -> tuple[dict[str, str] | None, str]:
    """Durability settings via CONFIG GET, or None and why it is unavailable."""
    settings: dict[str, str] = {}
    try:
        for name in ("appendonly", "maxmemory-policy", "appendfsync", "min-replicas-to-write"):
            reply = await client.config_get(name)
            settings.update({_text(k): _text(v) for k, v in reply.items()})
    except ResponseError as err:
        # Managed services rename or forbid CONFIG ("unknown command", NOPERM).
        return None, str(err)
    return settings, ""


async def _info(client: aioredis.Redis) -> dict[str, str] | None:
    """The same settings as INFO reports them, for servers that hide CONFIG."""
    settings: dict[str, str] = {}
    try:
        persistence: Mapping[str, object] = await client.info("persistence")
        memory: Mapping[str, object] = await client.info("memory")
    except ResponseError:
        return None
    if "aof_enabled" in persistence:
        settings["appendonly"] = "yes" if str(persistence["aof_enabled"]) == "1" else "no"
    if "maxmemory_policy" in memory:
        settings["maxmemory-policy"] = _text(memory["maxmemory_policy"])
    return settings


def _problems(
    settings: Mapping[str, str], *, failover: bool = False
) -> tuple[list[str], list[str]]:
    """Split the settings into refusals and mere warnings.

    Args:
        settings: the server's durability settings.
        failover: the server is a primary Sentinel may replace with a replica.
    """
    problems: list[str] = []
    warnings: list[str] = []
    appendonly = settings.get("appendonly")
    if appendonly is None:
        warnings.append("could not read appendonly: cannot verify that Redis persists writes")
    elif appendonly.lower() != "yes":
        problems.append(
            f"appendonly is {appendonly!r}: an acknowledged placement can be lost on restart; "
            f"set appendonly yes or {_OVERRIDE}"
        )
    policy = settings.get("maxmemory-policy")
    if policy is None:
        warnings.append(
            "could not read maxmemory-policy: cannot verify that Redis never evicts keys"
        )
    elif policy.lower() != "noeviction":
        problems.append(
            f"maxmemory-policy is {policy!r}: under memory pressure Redis may evict slot "
            "owners and placements, handing devices in use out twice; set maxmemory-policy "
            f"noeviction or {_OVERRIDE}"
        )
    fsync = settings.get("appendfsync")
    aof_on = appendonly is not None and appendonly.lower() == "yes"
    if aof_on and fsync is not None and fsync.lower() == "no":
        # A process crash keeps what the kernel has; only an OS crash or
        # power loss loses the last ~30 s, so this warns but does not refuse.
        warnings.append(
            "appendfsync is 'no': the kernel decides when the AOF reaches disk, so an "
            "OS crash or power loss can lose recent placements; prefer everysec or always"
        )
    replicas = settings.get("min-replicas-to-write")
    if failover and replicas in (None, "", "0"):
        # Replication is asynchronous: the promoted replica may not have the
        # last writes the old primary acknowledged.
        told = "could not be read" if replicas is None else "is 0"
        warnings.append(
            f"min-replicas-to-write {told} on a primary Sentinel fails over: replication is "
            "asynchronous, so a failover can lose placements the old primary acknowledged "
            "(those a replica did not have yet, and, in a failover with the old primary "
            "still up, those it took until Sentinel demoted it) and hand their devices out "
            "again; set min-replicas-to-write 1 with a short min-replicas-max-lag on the "
            "primary and every replica, with at least two replicas (a primary with fewer "
            "good replicas than that refuses every write)"
        )
    return problems, warnings


def cluster_info_field(info: Any, name: str) -> str:
    """One field of a CLUSTER INFO reply, a mapping or raw text as redis-py gives it ("": none)."""
    if isinstance(info, Mapping):
        return _text(info.get(name, ""))
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""


def node_client(node: ClusterNode, **overrides: Any) -> aioredis.Redis:
    """A plain client of one node of a cluster, with the cluster's connection settings."""
    kwargs = {
        k: v
        for k, v in node.connection_kwargs.items()
        if k not in ("host", "port", "event_dispatcher")
    }
    return aioredis.Redis(
        connection_pool=aioredis.ConnectionPool(
            connection_class=node.connection_class,
            host=node.host,
            port=node.port,
            **{**kwargs, **overrides},
        )
    )


async def check_durability(
    client: aioredis.Redis | RedisCluster, *, allow_unsafe: bool
) -> list[str]:
    """Check that the server keeps acknowledged writes and never evicts keys.

    Reads ``appendonly``, ``maxmemory-policy`` and ``appendfsync`` with CONFIG
    GET. Where CONFIG is disabled (common on managed Redis) it says so and
    falls back to INFO, which reports AOF and the eviction policy too. On a
    Redis Cluster every primary is checked, each message naming its node.

    Args:
        client: a client of the server (or initialized cluster) to check.
        allow_unsafe: report unsafe settings as warnings instead of refusing.

    Returns:
        Warnings to log: settings that weaken durability without being fatal,
        checks that could not be made, and (with ``allow_unsafe``) the unsafe
        settings themselves.

    Raises:
        UnsafeStoreConfig: an unsafe setting and ``allow_unsafe`` is False. Its
            message says why each setting is unsafe and how to fix it.
    """
    if isinstance(client, RedisCluster):
        warnings: list[str] = []
        problems: list[str] = []
        for node in client.get_primaries():
            one = node_client(node)
            try:
                _name_findings(
                    f"node {node.name}",
                    await check_durability(one, allow_unsafe=True),
                    problems,
                    warnings,
                )
            finally:
                await one.aclose()
        if problems and not allow_unsafe:
            raise UnsafeStoreConfig(problems)
        return warnings + [f"{_UNSAFE}{p}" for p in problems]
    warnings = []
    settings, config_error = await _config(client)
    if settings is None:
        warnings.append(
            f"CONFIG is unavailable on this Redis ({config_error}); "
            "durability settings were read from INFO instead"
        )
        settings = await _info(client) or {}
    pool = sentinel_pool(client)
    failover = pool is not None
    problems, soft = _problems(settings, failover=failover)
    warnings.extend(soft)
    needed = settings.get("min-replicas-to-write", "")
    if failover and needed.isdigit() and int(needed) > 0:
        try:
            replication: Mapping[str, object] = await client.info("replication")
            have = int(str(replication.get("connected_slaves", 0)))
        except (ResponseError, ValueError):
            have = None
        if have is not None and have <= int(needed):
            # The replica promoted in a failover leaves one fewer behind it.
            warnings.append(
                f"min-replicas-to-write is {needed} and the primary has {have} replica(s): "
                "after a failover the new primary has fewer, and refuses every write "
                "(NOREPLICAS) until another replica is in sync; run at least "
                f"{int(needed) + 1} replicas"
            )
    if pool is not None:
        # Any replica may become the primary: held to the same settings.
        found_problems, found_warnings = await check_replicas(pool)
        problems += found_problems
        warnings += found_warnings
    if problems and not allow_unsafe:
        raise UnsafeStoreConfig(problems)
    warnings.extend(f"{_UNSAFE}{p}" for p in problems)
    return warnings


def sentinel_pool(client: object) -> SentinelConnectionPool | None:
    """The pool of a client of the primary Sentinel names (None: another client)."""
    pool = getattr(client, "connection_pool", None)
    return pool if isinstance(pool, SentinelConnectionPool) else None


def _name_findings(
    name: str, found: Sequence[str], problems: list[str], warnings: list[str]
) -> None:
    """File one server's findings (checked with allow_unsafe) under its name."""
    problems += [f"{name}: {w.removeprefix(_UNSAFE)}" for w in found if w.startswith(_UNSAFE)]
    warnings += [f"{name}: {w}" for w in found if not w.startswith(_UNSAFE)]


#: Connection options a replica's client takes from the primary's pool.
_REPLICA_OPTIONS = ("username", "password", "db", "socket_timeout", "socket_connect_timeout")


async def check_replicas(pool: SentinelConnectionPool) -> tuple[list[str], list[str]]:
    """The durability problems and warnings of each replica the Sentinels name, by name."""
    try:
        replicas = await pool.sentinel_manager.discover_slaves(pool.service_name)
    except (RedisError, OSError) as err:
        return [], [f"could not ask the Sentinels for the replicas ({err}): they were not checked"]
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        # redis-py reads the reply into fields as it parses it: a Sentinel
        # answering with fields missing or of the wrong kind raises here.
        return [], [
            f"the Sentinels' list of replicas could not be read ({type(err).__name__}: {err}): "
            "they were not checked"
        ]
    options = {
        k: v
        for k, v in pool.connection_kwargs.items()
        if k in _REPLICA_OPTIONS or (k.startswith("ssl_") and v is not None)
    }
    if issubclass(pool.connection_class, SSLConnection):
        options["ssl"] = True
    problems: list[str] = []
    warnings: list[str] = []
    for host, port in replicas:
        name = f"replica {host}:{port}"
        if not isinstance(port, int) or not 0 < port < 65_536:
            # redis-py leaves a port it cannot read as the Sentinel's text.
            warnings.append(f"{name}: the Sentinels named no valid port for it: not checked")
            continue
        one = aioredis.Redis(host=str(host), port=port, **options)
        try:
            found = await check_durability(one, allow_unsafe=True)
        except (RedisError, OSError) as err:
            warnings.append(f"{name}: could not be checked ({err})")
            continue
        finally:
            await one.aclose()
        _name_findings(name, found, problems, warnings)
    return problems, warnings
