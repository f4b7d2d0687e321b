"""Connect to the state store: check its URL, build the client, make sure it answers.

:func:`connect_store` is the one place the scheduler's Redis client is made.
It refuses, with one line that says what to fix, a store the scheduler could
not use anyway, before anything is served:

* a URL redis-py would misread or ignore: another scheme, a port out of range,
  a database that is not a number (redis-py quietly uses 0), a misspelt query
  parameter (redis-py passes it on and fails later, at the first command);
* TLS that would not verify the server: ``ssl_cert_reqs=none`` or
  ``ssl_check_hostname=false`` unless the operator allows unsafe Redis; TLS
  files that are missing; TLS files given for a plaintext ``redis://`` URL;
* a store that refuses us: wrong password or user (AUTH), a user without the
  commands we need (NOPERM), a database that does not exist (SELECT), a
  certificate that does not verify, a plaintext server behind ``rediss://``;
* a store that does not answer within the start-up wait (refused, timed out),
  retried meanwhile so a store that is just coming up is waited for.

Every message has the password redacted (:func:`redact_url`).

One server (``redis://``, ``rediss://``, ``unix://``), a Redis Cluster
(``redis+cluster://`` or ``rediss+cluster://``, naming any one node: the client
finds the others), or a primary watched by Redis Sentinel
(``redis+sentinel://`` or ``rediss+sentinel://``, naming the Sentinels and the
service: the client asks them for the primary, and again after a failover).
Every write of the scheduler stays in one hash slot
(:mod:`scheduler.store.schema`), so it runs on a cluster unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlsplit

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

from scheduler.store.safety import cluster_info_field
from scheduler.store.wire import pack_with_hiredis

log = logging.getLogger("tessera.store")

_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
_FORM = (
    "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss://... (TLS), "
    "unix:///PATH/TO/SOCKET[?db=DB], redis+cluster://[[USER]:PASSWORD@]HOST[:PORT] "
    "(rediss+cluster:// with TLS) for a Redis Cluster, or "
    "redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB] "
    "(rediss+sentinel:// with TLS) for a primary watched by Sentinel"
)
_CLUSTER_SUFFIX = "+cluster"
_SENTINEL_SUFFIX = "+sentinel"
#: Sentinel's own port, when a Sentinel URL names none.
_SENTINEL_PORT = 26379
#: Sentinels a URL may name (three or five in practice).
_MAX_SENTINELS = 16
#: Query parameters of a Sentinel URL only: the Sentinels' own credentials,
#: where they require some (the URL's user and password are the primary's).
_SENTINEL_QUERY_PARAMS = frozenset({"sentinel_username", "sentinel_password"})
#: Query parameters whose values are secrets, never shown.
_SECRET_PARAMS = ("ssl_password", "sentinel_password")
_CLUSTER_UNSUPPORTED = frozenset({"ssl_ca_path", "ssl_password"})

#: A client of one server or of a Redis Cluster.
StoreClient = aioredis.Redis | RedisCluster
#: Query parameters redis-py understands that make sense for the scheduler.
#: Anything else is refused: redis-py would pass it on as a keyword argument
#: and fail at the first command, or (``protocol=3``) change reply shapes.
_QUERY_PARAMS = frozenset(
    {
        "db",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "max_connections",
        "health_check_interval",
        "client_name",
    }
)
#: TLS parameters: only with ``rediss://`` (a plaintext connection rejects them).
_TLS_QUERY_PARAMS = frozenset(
    {
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "ssl_ciphers",
    }
)
_CERT_REQS = ("none", "optional", "required")
_FALSE = ("0", "f", "false", "n", "no", "off")
_UNSAFE = "pass --allow-unsafe-redis to accept that"
#: Seconds one start-up attempt may take to connect or to get an answer.
_PROBE_TIMEOUT_S = 2.0
_PROBE_PAUSE_S = 0.5


class StoreUnusableError(RuntimeError):
    """The state store cannot be used: its URL, TLS files, credentials or reachability.

    The message is one line naming the problem and, where one is clear, the
    fix; the store's password never appears in it.
    """


@dataclass(frozen=True)
class StoreTls:
    """TLS files given outside the URL (``--redis-ca``, ``--redis-cert``, ``--redis-key``).

    Attributes:
        ca_certs: PEM file of the CA that signed the server's certificate.
        certfile: PEM client certificate, for servers that require one.
        keyfile: the client certificate's private key.
    """

    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None


@dataclass(frozen=True)
class _Target:
    """What the URL points at, for messages and the start-up check."""

    url: str  # as redis-py reads it: a cluster URL's scheme without "+cluster"
    scheme: str
    host: str | None  # None for a Unix socket
    port: int
    db: int
    username: str
    password: str
    cluster: bool = False
    sentinel: _Sentinels | None = None


def _split_userinfo(url: str) -> tuple[str, str, str, str] | None:
    """``(scheme://, userinfo, host:port, path and query)`` split by hand, or None.

    Done without urllib so that even a URL urllib cannot parse is redacted.
    """
    head, sep, tail = url.partition("://")
    if not sep:
        return None
    end = len(tail)
    for stop in "/?#":
        index = tail.find(stop)
        if index != -1:
            end = min(end, index)
    netloc, rest = tail[:end], tail[end:]
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return None
    return head + sep, userinfo, hostport, rest


def redact_url(url: str) -> str:
    """``url`` with its password (and any secret query parameter) replaced by ``***``.

    Args:
        url: a store URL, well-formed or not.

    Returns:
        The URL fit for a log line or an error message.
    """
    split = _split_userinfo(url)
    if split is not None:
        head, userinfo, hostport, rest = split
        user, colon, _password = userinfo.partition(":")
        # No colon: redis-py reads the whole userinfo as a user name; some
        # write a bare password there, so hide it all the same.
        url = f"{head}{user}:***@{hostport}{rest}" if colon else f"{head}***@{hostport}{rest}"
    head, mark, query = url.partition("?")
    if mark:
        # Names as the query parser reads them: sentinel%5Fpassword= is
        # sentinel_password= too.
        fields = [
            f"{name}=***" if unquote_plus(name) in _SECRET_PARAMS else field
            for field in query.split("&")
            for name in [field.partition("=")[0]]
        ]
        url = f"{head}?{'&'.join(fields)}"
    return url


def _refuse(target_url: str, problem: str, *secrets: str) -> StoreUnusableError:
    """One line naming the store (redacted) and the problem, secrets scrubbed.

    The password is scrubbed from the problem too, as given and URL-encoded:
    a server's or a library's message might echo it. (Not one of a few
    characters: that would garble the message and hides nothing worth it.)
    """
    message = f"store {redact_url(target_url)}: {problem}"
    for secret in secrets:
        for form in {secret, quote(secret, safe="")}:
            if len(form) >= 4:
                message = message.replace(form, "***")
    return StoreUnusableError(" ".join(message.split()))


def _query(url: str, query: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in params:
            raise _refuse(url, f"query parameter {name!r} is given twice")
        params[name] = value
    return params


@dataclass(frozen=True)
class _Sentinels:
    """A Sentinel URL's Sentinels, the service they watch, and their own credentials.

    Attributes:
        addresses: (host, port) of each Sentinel, in the URL's order.
        service: the name the Sentinels know the primary by.
        username: the Sentinels' user, where they require one.
        password: the Sentinels' password, where they require one.
        query: the URL's query without the Sentinels' parameters: what the
            primary's connections take.
    """

    addresses: tuple[tuple[str, int], ...]
    service: str
    username: str = ""
    password: str = ""
    query: str = ""

    def named(self) -> str:
        """The Sentinels as ``host:port, ...``, for messages."""
        return ", ".join(f"{_host_text(h)}:{p}" for h, p in self.addresses)


def _host_text(host: str) -> str:
    """A host as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def _server_url(target: _Target, host: str, port: int) -> str:
    """The URL of one server of ``target`` (a Sentinel URL's primary, once found)."""
    auth = ""
    if target.password:
        auth = f"{quote(target.username, safe='')}:{quote(target.password, safe='')}@"
    elif target.username:
        # No colon, as given: some write a bare password there, and
        # redact_url hides a bare userinfo whole.
        auth = f"{quote(target.username, safe='')}@"
    query = target.sentinel.query if target.sentinel is not None else ""
    return f"{target.scheme}://{auth}{_host_text(host)}:{port}/{target.db}" + (
        f"?{query}" if query else ""
    )


def _parse_sentinel(
    url: str, scheme: str, tls: StoreTls, *, allow_unsafe: bool
) -> tuple[_Target, dict[str, Any]]:
    """Check a ``redis+sentinel://`` (or ``rediss+sentinel://``) URL; see :func:`_parse`.

    urllib cannot read several hosts in one URL, so the Sentinels are split
    out by hand; each is then read as a URL of its own.
    """
    rest = url.partition("://")[2]
    end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, _at, hosts = netloc.rpartition("@")
    user, _colon, secret = userinfo.partition(":")
    username, password = unquote(user), unquote(secret)
    if "#" in tail:
        raise _refuse(url, "a fragment (#...) has no meaning in a store URL", password)
    if not hosts:
        raise _refuse(url, f"no Sentinel host; expected {_FORM}", password)
    entries = hosts.split(",")
    if len(entries) > _MAX_SENTINELS:
        raise _refuse(url, f"{len(entries)} Sentinels; at most {_MAX_SENTINELS}", password)
    addresses: list[tuple[str, int]] = []
    for entry in entries:
        try:
            parts = urlsplit(f"//{entry}")
            port = _SENTINEL_PORT if parts.port is None else parts.port
        except ValueError:
            raise _refuse(
                url, f"Sentinel {entry!r}: the port must be a number in 1..65535", password
            ) from None
        if not parts.hostname:
            raise _refuse(url, f"Sentinel {entry!r} has no host; expected {_FORM}", password)
        if not 1 <= port <= 65535:
            raise _refuse(
                url, f"Sentinel {entry!r}: the port must be a number in 1..65535", password
            )
        host = unquote(parts.hostname)
        if not host.isprintable() or len(host) > 253:
            raise _refuse(url, f"Sentinel {entry[:64]!r}: not a host name or address", password)
        addresses.append((host, port))
    path, _, query = tail.partition("?")
    segments = path.strip("/").split("/") if path.strip("/") else []
    if not segments:
        raise _refuse(
            url, f"no service name: the Sentinels' name for the primary; expected {_FORM}", password
        )
    if len(segments) > 2:
        raise _refuse(url, f"the path is /SERVICE[/DB], not {path!r}", password)
    service = unquote(segments[0])
    if not service.isprintable() or any(c.isspace() for c in service) or len(service) > 128:
        raise _refuse(
            url, "the service name must be printable, without spaces, at most 128 characters"
        )
    params = _query(url, query)
    known = _QUERY_PARAMS | _TLS_QUERY_PARAMS | _SENTINEL_QUERY_PARAMS
    for name in params:
        if name in _TLS_QUERY_PARAMS and scheme != "rediss":
            raise _refuse(url, f"{name} needs TLS: use rediss+sentinel://", password)
        if name not in known:
            listed = ", ".join(sorted(known))
            raise _refuse(url, f"unknown query parameter {name!r} (known: {listed})", password)
    db = _database(url, params, segments[1] if len(segments) == 2 else "", password)
    extra = _tls_extra(
        url, scheme, params, tls, password, allow_unsafe=allow_unsafe, tls_form="rediss+sentinel://"
    )
    sentinels = _Sentinels(
        tuple(addresses),
        service,
        params.get("sentinel_username", ""),  # parse_qsl decoded it already
        params.get("sentinel_password", ""),
        "&".join(
            f"{quote(k, safe='')}={quote(v, safe='')}"
            for k, v in params.items()
            if k not in _SENTINEL_QUERY_PARAMS and k != "db"
        ),
    )
    host, port = addresses[0]
    target = _Target(url, scheme, host, port, db, username, password, sentinel=sentinels)
    # redis-py's own parsing, for the value types it checks (socket_timeout=abc).
    try:
        parse_url(_server_url(target, host, port))
    except ValueError as err:
        raise _refuse(url, str(err), password, sentinels.password) from None
    return target, extra


async def _why_not(target: _Target, sentinel: Sentinel) -> str:
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
        one = _Target(target.url, target.scheme, host, port, 0, watch.username, watch.password)
        why = _explain(err, one)[1].replace("use rediss://", "use rediss+sentinel://")
        return f": {_host_text(host)}:{port}: {why}"
    return ""


async def _find_primary(target: _Target, sentinel: Sentinel, deadline: float) -> tuple[str, int]:
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
                raise _refuse(
                    target.url,
                    f"{watch.named()} does not answer as a Sentinel ({text}): name the "
                    f"Sentinels' ports ({_SENTINEL_PORT} by default), not the primary's",
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
                raise _refuse(
                    target.url,
                    f"{problem}; still failing after {attempts} attempts",
                    target.password,
                    watch.password,
                ) from None
            log.debug("store %s: %s", redact_url(target.url), problem)
        await asyncio.sleep(max(0.0, min(_PROBE_PAUSE_S, deadline - time.monotonic())))


async def _connect_sentinel(target: _Target, extra: dict[str, Any], wait_s: float) -> StoreClient:
    """A client of the primary the Sentinels name, checked usable; see :func:`connect_store`."""
    watch = target.sentinel
    assert watch is not None
    tls: dict[str, Any] = {"ssl": True, **extra} if target.scheme == "rediss" else {}
    # The URL's TLS settings (ssl_cert_reqs, ssl_password, ...) hold for the
    # Sentinels as for the primary.
    url_tls = {
        k: v
        for k, v in parse_url(_server_url(target, *watch.addresses[0])).items()
        if k.startswith("ssl_")
    }
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
        primary = _Target(
            _server_url(target, host, port),
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
    options = dict(parse_url(primary.url))
    for name in ("host", "port", "connection_class"):
        options.pop(name, None)
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
            "health_check_interval": 5,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=6),
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


def _parse(url: str, tls: StoreTls, *, allow_unsafe: bool) -> tuple[_Target, dict[str, Any]]:
    """Check the URL and the TLS options; the target and extra client arguments.

    Raises:
        StoreUnusableError: the URL or the TLS options would not work, or
            would not verify the server.
    """
    try:
        parts = urlsplit(url)
    except ValueError as err:
        raise _refuse(url, f"not a URL ({err}); expected {_FORM}") from None
    scheme = parts.scheme.lower()
    if "://" not in url or not scheme:
        raise _refuse(url, f"not a URL; expected {_FORM}")
    if scheme not in _SCHEMES:
        raise _refuse(url, f"unsupported scheme {scheme}://; expected {_FORM}")
    if scheme.endswith(_SENTINEL_SUFFIX):
        return _parse_sentinel(
            url, scheme.removesuffix(_SENTINEL_SUFFIX), tls, allow_unsafe=allow_unsafe
        )
    cluster = scheme.endswith(_CLUSTER_SUFFIX)
    if cluster:
        # redis-py reads a cluster's seed node from a plain URL.
        scheme = scheme.removesuffix(_CLUSTER_SUFFIX)
        url = scheme + url[url.index("://") :]
        parts = urlsplit(url)
    password = unquote(parts.password or "")
    username = unquote(parts.username or "")
    params = _query(url, parts.query)
    for name in params:
        if name in _TLS_QUERY_PARAMS and scheme != "rediss":
            raise _refuse(url, f"{name} needs TLS: use rediss://", password)
        if name not in _QUERY_PARAMS | _TLS_QUERY_PARAMS:
            known = ", ".join(sorted(_QUERY_PARAMS | _TLS_QUERY_PARAMS))
            raise _refuse(url, f"unknown query parameter {name!r} (known: {known})", password)

    if scheme == "unix":
        if not parts.path:
            raise _refuse(url, f"no socket path; expected {_FORM}", password)
        host, port = None, 0
        path_db = ""
    else:
        if not parts.hostname:
            raise _refuse(url, f"no host; expected {_FORM}", password)
        try:
            port = 6379 if parts.port is None else parts.port
        except ValueError:
            raise _refuse(url, "the port must be a number in 1..65535", password) from None
        # urllib accepts port 0; no server listens there.
        if not 1 <= port <= 65535:
            raise _refuse(url, "the port must be a number in 1..65535", password)
        host = unquote(parts.hostname)
        path_db = parts.path.strip("/")
    db = _database(url, params, path_db, password)
    if cluster and db != 0:
        raise _refuse(url, f"a Redis Cluster has database 0 only, not {db}", password)
    if cluster:
        # redis-py's cluster client takes neither (it fails with a TypeError
        # only once the seed node answered).
        for name in sorted(_CLUSTER_UNSUPPORTED & set(params)):
            raise _refuse(url, f"{name} is not supported with a Redis Cluster URL", password)

    extra = _tls_extra(url, scheme, params, tls, password, allow_unsafe=allow_unsafe)
    # redis-py's own parsing, for the value types it checks (socket_timeout=abc).
    try:
        parse_url(url)
    except ValueError as err:
        raise _refuse(url, str(err), password) from None
    target = _Target(url, scheme, host, port, db, username, password, cluster)
    return target, extra


def _database(url: str, params: Mapping[str, str], path_db: str, password: str) -> int:
    """The database a URL names in its path or its ``db`` parameter (0 when neither).

    Raises:
        StoreUnusableError: two different ones, or one that is not a number
            (redis-py reads a path that is not a number as database 0, silently).
    """
    if "db" in params and path_db and path_db != params["db"]:
        raise _refuse(url, f"two databases: /{path_db} in the path and db={params['db']}", password)
    db_text = params.get("db", path_db or "0")
    if not db_text.isdigit() or not db_text.isascii():
        raise _refuse(url, f"the database must be a number (0, 1, ...), not {db_text!r}", password)
    return int(db_text)


def _tls_extra(
    url: str,
    scheme: str,
    params: dict[str, str],
    tls: StoreTls,
    password: str,
    *,
    allow_unsafe: bool,
    tls_form: str = "rediss://",
) -> dict[str, Any]:
    """The client's TLS arguments for a ``rediss`` URL; none for a plaintext one.

    Raises:
        StoreUnusableError: TLS options that would not verify the server, or
            TLS files given for a plaintext URL (``tls_form``: the scheme to use).
    """
    if scheme == "rediss":
        return _tls_arguments(url, params, tls, password, allow_unsafe=allow_unsafe)
    if tls != StoreTls():
        raise _refuse(
            url,
            "TLS files were given (--redis-ca, --redis-cert, --redis-key) but the URL is "
            f"plaintext: use {tls_form}",
            password,
        )
    return {}


def _tls_arguments(
    url: str, params: dict[str, str], tls: StoreTls, password: str, *, allow_unsafe: bool
) -> dict[str, Any]:
    """Client TLS arguments merged from the URL and the flags, each checked."""
    # Exactly as redis-py spells them: it refuses "NONE" only at connect time.
    cert_reqs = params.get("ssl_cert_reqs", "required")
    if cert_reqs not in _CERT_REQS:
        raise _refuse(url, f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}", password)
    if cert_reqs == "none" and not allow_unsafe:
        raise _refuse(
            url,
            "ssl_cert_reqs=none does not verify the server's certificate: anyone on the path "
            "can pose as the store; give its CA (ssl_ca_certs= or --redis-ca) or "
            f"{_UNSAFE}",
            password,
        )
    if params.get("ssl_check_hostname", "true").lower() in _FALSE and not allow_unsafe:
        raise _refuse(
            url,
            "ssl_check_hostname=false accepts any certificate the CA signed, for any host; "
            f"remove it or {_UNSAFE}",
            password,
        )
    extra: dict[str, Any] = {}
    for param, flag, given in (
        ("ssl_ca_certs", "--redis-ca", tls.ca_certs),
        ("ssl_certfile", "--redis-cert", tls.certfile),
        ("ssl_keyfile", "--redis-key", tls.keyfile),
    ):
        in_url = params.get(param)
        if given is not None and in_url is not None and Path(in_url) != given:
            raise _refuse(url, f"{param}={in_url} and {flag} {given} disagree; give one", password)
        path = Path(in_url) if in_url is not None else given
        if path is None:
            continue
        if not os.access(path, os.R_OK) or not path.is_file():
            raise _refuse(url, f"{param} ({flag}): cannot read {path}", password)
        extra[param] = str(path)
    if ("ssl_keyfile" in extra) and ("ssl_certfile" not in extra):
        raise _refuse(
            url, "a client key (--redis-key) without its certificate (--redis-cert)", password
        )
    return extra


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or during."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _explain(err: BaseException, target: _Target) -> tuple[bool, str]:
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


async def _answers_plaintext(target: _Target) -> bool:
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


async def _check_once(target: _Target, extra: dict[str, Any]) -> None:
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


async def _wait_until_usable(target: _Target, extra: dict[str, Any], wait_s: float) -> None:
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
            raise _refuse(
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
                raise _refuse(
                    target.url,
                    "the server answers in plaintext, not TLS: use redis://, or the "
                    "server's TLS port",
                    target.password,
                ) from None
            # A user without a password may be a bare password (see redact_url).
            secrets = (target.password,) if target.password else (target.username,)
            if not retry:
                raise _refuse(target.url, problem, *secrets) from None
            if time.monotonic() >= deadline:
                raise _refuse(
                    target.url,
                    f"{problem}; still failing after {wait_s:g} s ({attempts} attempts)",
                    *secrets,
                ) from None
            log.debug("store %s not usable yet: %s", redact_url(target.url), problem)
        await asyncio.sleep(max(0.0, min(_PROBE_PAUSE_S, deadline - time.monotonic())))


async def _cluster_nodes(target: _Target, extra: dict[str, Any]) -> int:
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
    target, extra = _parse(url.strip(), tls or StoreTls(), allow_unsafe=allow_unsafe)
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
            raise _refuse(
                target.url,
                f"not usable as a Redis Cluster ({err}); for one server use redis://",
                target.password,
            ) from None
        return cluster
    if await _cluster_nodes(target, extra) > 1:
        # Keys of other slots would answer MOVED on their first command.
        raise _refuse(
            target.url,
            "this server is one node of a Redis Cluster: use redis+cluster:// (or rediss+cluster://)",
            target.password,
        )
    client = aioredis.Redis.from_url(
        target.url,
        decode_responses=False,
        # After a Redis restart or failover every pooled connection is dead:
        # ping one idle for a while before use, and retry a command on a
        # fresh connection a few times before a caller sees UNAVAILABLE.
        health_check_interval=5,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=6),
        **extra,
    )
    return pack_with_hiredis(client)
