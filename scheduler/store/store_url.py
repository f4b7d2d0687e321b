"""What a store URL says, checked before anything connects: its form, its TLS options, its secrets.

One server (``redis://``, ``rediss://``, ``unix://``), a Redis Cluster
(``redis+cluster://``, ``rediss+cluster://``) or a primary watched by Redis
Sentinel (``redis+sentinel://``, ``rediss+sentinel://``). A URL redis-py
would misread or ignore (another scheme, a port out of range, a database
that is not a number, a misspelt query parameter), TLS that would not verify
the server, and TLS files given for a plaintext URL are refused with one line
(:class:`StoreUnusableError`) that never shows a secret (:func:`redact_url`).
:mod:`scheduler.store.connection` connects to what a checked URL names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlsplit

from redis.asyncio.connection import parse_url

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
SENTINEL_PORT = 26379
#: Sentinels a URL may name (three or five in practice).
_MAX_SENTINELS = 16
#: Query parameters of a Sentinel URL only: the Sentinels' own credentials,
#: where they require some (the URL's user and password are the primary's).
_SENTINEL_QUERY_PARAMS = frozenset({"sentinel_username", "sentinel_password"})
#: Query parameters whose values are secrets, never shown.
_SECRET_PARAMS = ("ssl_password", "sentinel_password")
_CLUSTER_UNSUPPORTED = frozenset({"ssl_ca_path", "ssl_password"})

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
class StoreTarget:
    """What the URL points at, for messages and the start-up check."""

    url: str  # as redis-py reads it: a cluster URL's scheme without "+cluster"
    scheme: str
    host: str | None  # None for a Unix socket
    port: int
    db: int
    username: str
    password: str
    cluster: bool = False
    sentinel: Sentinels | None = None


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


def refuse(target_url: str, problem: str, *secrets: str) -> StoreUnusableError:
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
            raise refuse(url, f"query parameter {name!r} is given twice")
        params[name] = value
    return params


@dataclass(frozen=True)
class Sentinels:
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
        return ", ".join(f"{host_text(h)}:{p}" for h, p in self.addresses)


def host_text(host: str) -> str:
    """A host as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def server_url(target: StoreTarget, host: str, port: int) -> str:
    """The URL of one server of ``target`` (a Sentinel URL's primary, once found)."""
    auth = ""
    if target.password:
        auth = f"{quote(target.username, safe='')}:{quote(target.password, safe='')}@"
    elif target.username:
        # No colon, as given: some write a bare password there, and
        # redact_url hides a bare userinfo whole.
        auth = f"{quote(target.username, safe='')}@"
    query = target.sentinel.query if target.sentinel is not None else ""
    return f"{target.scheme}://{auth}{host_text(host)}:{port}/{target.db}" + (
        f"?{query}" if query else ""
    )


def _parse_sentinel(
    url: str, scheme: str, tls: StoreTls, *, allow_unsafe: bool
) -> tuple[StoreTarget, dict[str, Any]]:
    """Check a ``redis+sentinel://`` (or ``rediss+sentinel://``) URL; see :func:`parse_store_url`.

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
        raise refuse(url, "a fragment (#...) has no meaning in a store URL", password)
    if not hosts:
        raise refuse(url, f"no Sentinel host; expected {_FORM}", password)
    entries = hosts.split(",")
    if len(entries) > _MAX_SENTINELS:
        raise refuse(url, f"{len(entries)} Sentinels; at most {_MAX_SENTINELS}", password)
    addresses: list[tuple[str, int]] = []
    for entry in entries:
        try:
            parts = urlsplit(f"//{entry}")
            port = SENTINEL_PORT if parts.port is None else parts.port
        except ValueError:
            raise refuse(
                url, f"Sentinel {entry!r}: the port must be a number in 1..65535", password
            ) from None
        if not parts.hostname:
            raise refuse(url, f"Sentinel {entry!r} has no host; expected {_FORM}", password)
        if not 1 <= port <= 65535:
            raise refuse(
                url, f"Sentinel {entry!r}: the port must be a number in 1..65535", password
            )
        host = unquote(parts.hostname)
        if not host.isprintable() or len(host) > 253:
            raise refuse(url, f"Sentinel {entry[:64]!r}: not a host name or address", password)
        addresses.append((host, port))
    path, _, query = tail.partition("?")
    segments = path.strip("/").split("/") if path.strip("/") else []
    if not segments:
        raise refuse(
            url, f"no service name: the Sentinels' name for the primary; expected {_FORM}", password
        )
    if len(segments) > 2:
        raise refuse(url, f"the path is /SERVICE[/DB], not {path!r}", password)
    service = unquote(segments[0])
    if not service.isprintable() or any(c.isspace() for c in service) or len(service) > 128:
        raise refuse(
            url, "the service name must be printable, without spaces, at most 128 characters"
        )
    params = _query(url, query)
    known = _QUERY_PARAMS | _TLS_QUERY_PARAMS | _SENTINEL_QUERY_PARAMS
    for name in params:
        if name in _TLS_QUERY_PARAMS and scheme != "rediss":
            raise refuse(url, f"{name} needs TLS: use rediss+sentinel://", password)
        if name not in known:
            listed = ", ".join(sorted(known))
            raise refuse(url, f"unknown query parameter {name!r} (known: {listed})", password)
    db = _database(url, params, segments[1] if len(segments) == 2 else "", password)
    extra = _tls_extra(
        url, scheme, params, tls, password, allow_unsafe=allow_unsafe, tls_form="rediss+sentinel://"
    )
    sentinels = Sentinels(
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
    target = StoreTarget(url, scheme, host, port, db, username, password, sentinel=sentinels)
    # redis-py's own parsing, for the value types it checks (socket_timeout=abc).
    try:
        parse_url(server_url(target, host, port))
    except ValueError as err:
        raise refuse(url, str(err), password, sentinels.password) from None
    return target, extra


def parse_store_url(
    url: str, tls: StoreTls, *, allow_unsafe: bool
) -> tuple[StoreTarget, dict[str, Any]]:
    """Check the URL and the TLS options; the target and extra client arguments.

    Raises:
        StoreUnusableError: the URL or the TLS options would not work, or
            would not verify the server.
    """
    try:
        parts = urlsplit(url)
    except ValueError as err:
        raise refuse(url, f"not a URL ({err}); expected {_FORM}") from None
    scheme = parts.scheme.lower()
    if "://" not in url or not scheme:
        raise refuse(url, f"not a URL; expected {_FORM}")
    if scheme not in _SCHEMES:
        raise refuse(url, f"unsupported scheme {scheme}://; expected {_FORM}")
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
            raise refuse(url, f"{name} needs TLS: use rediss://", password)
        if name not in _QUERY_PARAMS | _TLS_QUERY_PARAMS:
            known = ", ".join(sorted(_QUERY_PARAMS | _TLS_QUERY_PARAMS))
            raise refuse(url, f"unknown query parameter {name!r} (known: {known})", password)

    if scheme == "unix":
        if not parts.path:
            raise refuse(url, f"no socket path; expected {_FORM}", password)
        host, port = None, 0
        path_db = ""
    else:
        if not parts.hostname:
            raise refuse(url, f"no host; expected {_FORM}", password)
        try:
            port = 6379 if parts.port is None else parts.port
        except ValueError:
            raise refuse(url, "the port must be a number in 1..65535", password) from None
        # urllib accepts port 0; no server listens there.
        if not 1 <= port <= 65535:
            raise refuse(url, "the port must be a number in 1..65535", password)
        host = unquote(parts.hostname)
        path_db = parts.path.strip("/")
    db = _database(url, params, path_db, password)
    if cluster and db != 0:
        raise refuse(url, f"a Redis Cluster has database 0 only, not {db}", password)
    if cluster:
        # redis-py's cluster client takes neither (it fails with a TypeError
        # only once the seed node answered).
        for name in sorted(_CLUSTER_UNSUPPORTED & set(params)):
            raise refuse(url, f"{name} is not supported with a Redis Cluster URL", password)

    extra = _tls_extra(url, scheme, params, tls, password, allow_unsafe=allow_unsafe)
    # redis-py's own parsing, for the value types it checks (socket_timeout=abc).
    try:
        parse_url(url)
    except ValueError as err:
        raise refuse(url, str(err), password) from None
    target = StoreTarget(url, scheme, host, port, db, username, password, cluster)
    return target, extra


def _database(url: str, params: Mapping[str, str], path_db: str, password: str) -> int:
    """The database a URL names in its path or its ``db`` parameter (0 when neither).

    Raises:
        StoreUnusableError: two different ones, or one that is not a number
            (redis-py reads a path that is not a number as database 0, silently).
    """
    if "db" in params and path_db and path_db != params["db"]:
        raise refuse(url, f"two databases: /{path_db} in the path and db={params['db']}", password)
    db_text = params.get("db", path_db or "0")
    if not db_text.isdigit() or not db_text.isascii():
        raise refuse(url, f"the database must be a number (0, 1, ...), not {db_text!r}", password)
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
        raise refuse(
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
        raise refuse(url, f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}", password)
    if cert_reqs == "none" and not allow_unsafe:
        raise refuse(
            url,
            "ssl_cert_reqs=none does not verify the server's certificate: anyone on the path "
            "can pose as the store; give its CA (ssl_ca_certs= or --redis-ca) or "
            f"{_UNSAFE}",
            password,
        )
    if params.get("ssl_check_hostname", "true").lower() in _FALSE and not allow_unsafe:
        raise refuse(
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
            raise refuse(url, f"{param}={in_url} and {flag} {given} disagree; give one", password)
        path = Path(in_url) if in_url is not None else given
        if path is None:
            continue
        if not os.access(path, os.R_OK) or not path.is_file():
            raise refuse(url, f"{param} ({flag}): cannot read {path}", password)
        extra[param] = str(path)
    if ("ssl_keyfile" in extra) and ("ssl_certfile" not in extra):
        raise refuse(
            url, "a client key (--redis-key) without its certificate (--redis-cert)", password
        )
    return extra
