"""The dashboard's listener: an aiohttp server on the scheduler's event loop."""

from __future__ import annotations

import ssl

from aiohttp import web

#: Seconds a connection may stay without a whole request (idle, or half sent).
KEEPALIVE_S = 8.0


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) as a host and a port.

    Raises:
        ValueError: not ``HOST:PORT`` with a port from 0 to 65535.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--http-listen {listen!r}: use HOST:PORT (port 0 picks one)")
    return host.strip("[]"), int(port)


async def start_http(
    app: web.Application, listen: str, ssl_context: ssl.SSLContext | None
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``listen``; the runner (to clean up) and the port bound.

    Raises:
        ValueError: ``listen`` is not ``HOST:PORT``.
        OSError: the address cannot be bound.
    """
    host, port = split_listen(listen)
    # No access log: the audit log records every action and refusal, and a
    # live page's requests would flood the process log. A connection that
    # sends no whole request within KEEPALIVE_S (a slow or idle peer, maybe
    # without a certificate) is closed: each holds a descriptor that gRPC and
    # the store's connections need too.
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=1.0,
        keepalive_timeout=KEEPALIVE_S,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    sockets = runner.addresses
    bound = int(sockets[0][1]) if sockets else port
    return runner, bound
