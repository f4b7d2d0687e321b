"""Connect to the state store: build the client, make sure it answers.

:func:`connect_store` is the one place the scheduler's Redis client is made.
Its URL is checked first (:mod:`scheduler.store.store_url`: the form, TLS
that would verify the server, secrets hidden); then it refuses, with one line
that says what to fix, a store the scheduler could not use anyway, before
anything is served:

* a store that refuses us: wrong password or user (AUTH), a user without the
  commands we need (NOPERM), a database that does not exist (SELECT), a
  certificate that does not verify, a plaintext server behind ``rediss://``;
* a store that does not answer within the start-up wait (refused, timed out),
  retried meanwhile so a store that is just coming up is waited for;
* behind Sentinel, Sentinels that do not answer or name no live primary for
  the service, then the primary itself, checked as one server.

Every message has the password redacted (:func:`redact_url`).

One server, a Redis Cluster (naming any one node: the client finds the
others), or a primary watched by Redis Sentinel (the client asks the
Sentinels for the primary, and again after a failover). Every write of the
scheduler stays in one hash slot (:mod:`scheduler.store.schema`), so it runs
on a cluster unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoPermissionError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tessera.scheduler.store.safety import cluster_info_field
from tessera.scheduler.store.store_url import (
    SENTINEL_PORT,
    StoreTarget,
    StoreTls,
    StoreUnusableError,
    host_text,
    parse_store_url,
    redact_url,
    refuse,
    server_url,
)
from tessera.scheduler.store.wire import pack_with_hiredis

log = logging.getLogger("tessera.store")

# What callers import from here: the URL's checks live in store_url.
__all__ = ["StoreClient", "StoreTls", "StoreUnusableError", "connect_store", "redact_url"]

#: A client of one server or of a Redis Cluster.
StoreClient = aioredis.Redis | RedisCluster
#: Seconds one start-up attempt may take to connect or to get an answer.
_PROBE_TIMEOUT_S = 2.0
_PROBE_PAUSE_S = 0.5


def _riding_out_restarts() -> dict[str, Any]:
    """Client options for a store that restarts or fails over under it.

    After a Redis restart or failover every pooled connection is dead: ping
    one idle for a while before use, and retry a command on a fresh
    connection a few times before a caller sees UNAVAILABLE.
    """
    return {
        "health_check_interval": 5,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=6),
    }


async def _why_not(target: StoreTarget, sentinel: Sentinel) -> str:
    """Why the first Sentinel does not answer, as for one server (TLS, refused, ...).

    discover_master keeps only the text of each Sentinel's error; a PING of
    one of them gives the error itself, which :func:`_explain` reads.
    """
    watch = target.sentinel
    assert watch is not None
    first = sentinel.sentinels[0]
    try:
        await first.ping()
    except (RedisError, OSError, TimeoutError) as err:
        kwargs = first.connection_pool.connection_kwargs
        host, port = str(kwargs.get("host", "")), int(kwargs.get("port", 0))
        one = StoreTarget(target.url, target.scheme, host, port, 0, watch.username, watch.password)
        why = _explain(err, one)[1].replace("use rediss://", "use rediss+sentinel://")
        return f": {host_text(host)}:{port}: {why}"
    return ""


async def _find_primary(
    target: StoreTarget, sentinel: Sentinel, deadline: float
) -> tuple[str, int]:
    """The primary's address as the Sentinels give it, asked until ``deadline``.

    Raises:
        StoreUnusableError: no Sentinel answered with a primary in time.
    """
    watch = target.sentinel
    assert watch is not None
    attempts = 0
    while True:
        attempts += 1
        try:
            host, port = await sentinel.discover_master(watch.service)
            return str(host), int(port)
        except (MasterNotFoundError, RedisError, OSError) as err:
            text = str(err)
            if isinstance(err, ResponseError) and "unknown command" in text.lower():
                # A data node (or anything else) answered SENTINEL MASTERS.
                raise refuse(
                    target.url,
                    f"{watch.named()} does not answer as a Sentinel ({text}): name the "
                    f"Sentinels' ports ({SENTINEL_PORT} by default), not the primary's",
                    target.password,
                    watch.password,
                ) from None
            if "Error" in text.partition(" : ")[2] or not isinstance(err, MasterNotFoundError):
                # discover_master lists the Sentinels it could not ask.
                problem = f"cannot reach any Sentinel ({watch.named()})"
                if "Authentication" in text or "NOAUTH" in text or "WRONGPASS" in text:
                    problem = (
                        f"the Sentinels ({watch.named()}) refused us: check sentinel_username "
                        "and sentinel_password"
                    )
            else:
                problem = (
                    f"no Sentinel ({watch.named()}) names a live primary for service "
                    f"{watch.service!r}"
                )
            if time.monotonic() >= deadline:
                if problem.startswith("cannot reach"):
                    problem += await _why_not(target, sentinel)
                raise refuse(
                    target.url,
                    f"{problem}; still failing after {attempts} attempts",
                    target.password,
                    watch.password,
                ) from None
            log.debug("store %s: %s", redact_url(target.url), problem)
        await asyncio.sleep(max(0.0, min(_PROBE_PAUSE_S, deadline - time.monotonic())))


async def _connect_sentinel(
    target: StoreTarget, extra: dict[str, Any], wait_s: float
) -> StoreClient:
    """A client of the primary the Sentinels name, checked usable; see :func:`connect_store`."""
    watch = target.sentinel
    assert watch is not None
    tls: dict[str, Any] = {"ssl": True, **extra} if target.scheme == "rediss" else {}
    # The URL's options as redis-py reads them, for any server it names (the
    # address aside, which the Sentinels give): its TLS settings
    # (ssl_cert_reqs, ssl_password, ...) hold for the Sentinels as for the primary.
    options = dict(parse_url(server_url(target, *watch.addresses[0])))
    for name in ("host", "port", "connection_class"):
        options.pop(name, None)
    url_tls = {k: v for k, v in options.items() if k.startswith("ssl_")}
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": _PROBE_TIMEOUT_S,
        "socket_connect_timeout": _PROBE_TIMEOUT_S,
        # One try per Sentinel and question: discover_master goes on to the
        # next Sentinel, and _find_primary asks again until the deadline.
        # (redis-py's default, 10 retries, made a Sentinel that does not
        # answer cost 25 s, at start and on every reconnect after a failover.)
        "retry": Retry(NoBackoff(), 0),
        **url_tls,
        **tls,
    }
    if watch.username:
        sentinel_kwargs["username"] = watch.username
    if watch.password:
        sentinel_kwargs["password"] = watch.password
    # redis-py's Sentinel has no type hints.
    sentinel = Sentinel(list(watch.addresses), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    deadline = time.monotonic() + wait_s
    try:
        host, port = await _find_primary(target, sentinel, deadline)
        # The primary itself: the same checks as one server's (credentials, TLS,
        # database), naming it.
        primary = StoreTarget(
            server_url(target, host, port),
            target.scheme,
            host,
            port,
            target.db,
            target.username,
            target.password,
        )
        await _wait_until_usable(primary, extra, max(_PROBE_TIMEOUT_S, deadline - time.monotonic()))
    except BaseException:
        await sentinel.aclose()
        raise
    # As one server's client (see connect_store); its connections ask the
    # Sentinels for the primary whenever they connect, and drop a connection
    # to a primary since demoted (READONLY), so a failover costs the commands
    # in flight during it, retried, not a restart.
    # The URL's options win over the defaults, as Redis.from_url's do (a
    # health_check_interval in the URL was a TypeError here).
    client: _SentinelClient = sentinel.master_for(
        watch.service,
        redis_class=_SentinelClient,
        **{
            **_riding_out_restarts(),
            **options,
            **tls,
            "decode_responses": False,
        },
    )
    client.sentinels_client = sentinel
    return pack_with_hiredis(client)


class _SentinelClient(aioredis.Redis):
    """The primary's client, which closes the Sentinels' connections with its own."""

    sentinels_client: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels_client is not None:
            await self.sentinels_client.aclose()


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or during."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _explain(err: BaseException, target: StoreTarget) -> tuple[bool, str]:
    """Whether ``err`` is worth retrying at start, and what it means in a sentence."""
    text = " ".join(str(err).split())
    user = f"user {target.username!r}" if target.username else "the default user"
    if isinstance(err, AuthenticationError):
        lowered = text.lower()
        if "without any password configured" in lowered or "no password is set" in lowered:
            return False, "the URL has a password but the server has none set"
        if "noauth" in lowered or "required" in lowered or "must be called" in lowered:
            return False, "the server requires a password and the URL has none"
        return False, f"authentication as {user} failed ({text})"
    if isinstance(err, NoPermissionError):
        return False, f"{user} may not run a command the scheduler needs ({text})"
    if isinstance(err, BusyLoadingError):
        return True, "the server is still loading its data"
    if isinstance(err, ResponseError):
        return False, f"the server refused a start-up command ({text})"
    for cause in _causes(err):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return False, (
                f"TLS: the server's certificate did not verify ({cause.verify_message}); "
                "is ssl_ca_certs / --redis-ca the CA that signed it?"
            )
        if isinstance(cause, ssl.SSLError):
            reason = str(cause.reason or cause)
            hint = (
                ": the server wants a client certificate (--redis-cert, --redis-key)"
                if "CERTIFICATE_REQUIRED" in reason
                else ""
            )
            return False, f"TLS handshake failed ({reason}){hint}"
        if isinstance(cause, ConnectionRefusedError):
            return True, "connection refused (is the server running, on this port?)"
        if isinstance(cause, socket.gaierror):
            return True, f"cannot resolve the host ({cause.strerror})"
        if isinstance(cause, FileNotFoundError) and target.scheme == "unix":
            return True, "no socket at that path"
        if isinstance(cause, ConnectionResetError):
            hint = " (a TLS port? use rediss://)" if target.scheme != "rediss" else ""
            return True, f"the server closed the connection{hint}"
        if isinstance(cause, TimeoutError | RedisTimeoutError):
            return True, f"no answer within {_PROBE_TIMEOUT_S:g} s"
    if isinstance(err, RedisConnectionError | OSError):
        return True, f"cannot connect ({text})"
    return False, text


async def _answers_plaintext(target: StoreTarget) -> bool:
    """True if ``host:port`` answers a plaintext PING: not a TLS port."""
    if target.host is None:
        return False
    try:
        async with asyncio.timeout(1.0):
            reader, writer = await asyncio.open_connection(target.host, target.port)
            try:
                writer.write(b"PING\r\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    # +PONG, or -NOAUTH / -ERR from a server that wants a password first.
    return line[:1] in (b"+", b"-")


async def _check_once(target: StoreTarget, extra: dict[str, Any]) -> None:
    """PING, then SELECT the database; raises what redis-py raises."""
    pool = aioredis.ConnectionPool.from_url(
        target.url,
        decode_responses=False,
        # Each attempt fails fast and on its own; the caller decides to retry.
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=_PROBE_TIMEOUT_S,
        socket_timeout=_PROBE_TIMEOUT_S,
        **extra,
    )
    # Connect to database 0 and SELECT the asked one explicitly: its error
    # (and the server's number of databases) can then be told apart from a
    # failed connection.
    pool.connection_kwargs["db"] = 0
    probe = aioredis.Redis.from_pool(pool)
    try:
        async with asyncio.timeout(2 * _PROBE_TIMEOUT_S + 1):
            await probe.ping()
            # redis-py has no select(): a pooled connection must not change
            # database under its pool.
            command: Callable[..., Awaitable[Any]] = probe.execute_command
            try:
                await command("SELECT", target.db)
            except ResponseError as err:
                raise _DatabaseRefused(str(err), await _database_count(probe)) from None
    finally:
        await probe.aclose()


class _DatabaseRefused(Exception):  # noqa: N818 - internal, never escapes
    def __init__(self, reply: str, count: int | None) -> None:
        super().__init__(reply)
        self.reply = reply
        self.count = count


async def _database_count(client: aioredis.Redis) -> int | None:
    """``CONFIG GET databases``, or None where CONFIG is forbidden (managed Redis)."""
    try:
        reply: Mapping[Any, Any] = await client.config_get("databases")
    except RedisError:
        return None
    value = reply.get(b"databases", reply.get("databases"))
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


async def _wait_until_usable(target: StoreTarget, extra: dict[str, Any], wait_s: float) -> None:
    """Check the store, retrying what may pass (a store coming up) for ``wait_s``.

    Raises:
        StoreUnusableError: a refusal that will not pass, or still failing at
            the end of the wait.
    """
    deadline = time.monotonic() + wait_s
    attempts = 0
    while True:
        attempts += 1
        try:
            await _check_once(target, extra)
            return
        except _DatabaseRefused as err:
            have = f" (the server has {err.count}: 0..{err.count - 1})" if err.count else ""
            raise refuse(
                target.url, f"database {target.db} cannot be selected: {err.reply}{have}"
            ) from None
        except (RedisError, OSError, TimeoutError) as err:
            retry, problem = _explain(err, target)
            # A plaintext server waits for the rest of our TLS hello and never
            # answers: say so instead of "no answer".
            if (
                target.scheme == "rediss"
                and "TLS" not in problem
                and await _answers_plaintext(target)
            ):
                raise refuse(
                    target.url,
                    "the server answers in plaintext, not TLS: use redis://, or the "
                    "server's TLS port",
                    target.password,
                ) from None
            # A user without a password may be a bare password (see redact_url).
            secrets = (target.password,) if target.password else (target.username,)
            if not retry:
                raise refuse(target.url, problem, *secrets) from None
            if time.monotonic() >= deadline:
                raise refuse(
                    target.url,
                    f"{problem}; still failing after {wait_s:g} s ({attempts} attempts)",
                    *secrets,
                ) from None
            log.debug("store %s not usable yet: %s", redact_url(target.url), problem)
        await asyncio.sleep(max(0.0, min(_PROBE_PAUSE_S, deadline - time.monotonic())))


async def _cluster_nodes(target: StoreTarget, extra: dict[str, Any]) -> int:
    """How many nodes the server's cluster knows (0: not in cluster mode, or not telling)."""
    probe = aioredis.Redis.from_url(target.url, decode_responses=False, **extra)
    try:
        if not int((await probe.info("cluster")).get("cluster_enabled", 0) or 0):
            return 0
        info: Any = await probe.cluster("INFO")
        return int(cluster_info_field(info, "cluster_known_nodes") or 0)
    except (RedisError, ValueError):
        return 0
    finally:
        await probe.aclose()


async def connect_store(
    url: str,
    *,
    tls: StoreTls | None = None,
    allow_unsafe: bool = False,
    wait_s: float = 10.0,
) -> StoreClient:
    """The scheduler's client for the store at ``url``, checked usable.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL, or
            ``redis+cluster://`` / ``rediss+cluster://`` naming one node of a
            Redis Cluster (a cluster client is returned); user and password
            in it are sent with AUTH (an ACL user or ``requirepass``).
            ``rediss://`` verifies the server's certificate against
            ``ssl_ca_certs`` (or ``tls.ca_certs``), else the system's CAs.
        tls: TLS files given outside the URL; only with ``rediss://``.
        allow_unsafe: accept ``ssl_cert_reqs=none`` and
            ``ssl_check_hostname=false`` (the operator's ``--allow-unsafe-redis``).
        wait_s: how long to retry a store that does not answer yet.

    Returns:
        An asyncio client (bytes replies) that pings idle connections and
        retries a command on a fresh connection after a store restart.

    Raises:
        StoreUnusableError: the URL, the TLS options, the credentials or the
            database are wrong, or the store did not answer within ``wait_s``.
    """
    target, extra = parse_store_url(url.strip(), tls or StoreTls(), allow_unsafe=allow_unsafe)
    if target.sentinel is not None:
        return await _connect_sentinel(target, extra, wait_s)
    await _wait_until_usable(target, extra, wait_s)
    if target.cluster:
        # The seed node answered; the client maps slots to nodes itself and
        # follows MOVED/ASK as the cluster reshards or fails over.
        cluster = RedisCluster.from_url(
            target.url, decode_responses=False, health_check_interval=5, **extra
        )
        # Learn the nodes now: their durability is checked one by one next.
        try:
            await cluster.initialize()
        except (RedisClusterException, RedisError) as err:
            await cluster.aclose()
            raise refuse(
                target.url,
                f"not usable as a Redis Cluster ({err}); for one server use redis://",
                target.password,
            ) from None
        return cluster
    if await _cluster_nodes(target, extra) > 1:
        # Keys of other slots would answer MOVED on their first command.
        raise refuse(
            target.url,
            "this server is one node of a Redis Cluster: use redis+cluster:// (or rediss+cluster://)",
            target.password,
        )
    client = aioredis.Redis.from_url(
        target.url, decode_responses=False, **_riding_out_restarts(), **extra
    )
    return pack_with_hiredis(client)
