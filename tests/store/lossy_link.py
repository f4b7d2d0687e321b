"""A TCP link to a store server that can lose a reply, as a network can.

Between a client and one Valkey node: what the client sends is passed on,
and so is what the server answers, except that once told to, the link lets a
chosen command reach the server and then drops the connection instead of
passing the server's reply back. The command has run; the client saw its
connection fail and does not know it did. A client that retries on a fresh
connection (redis-py does) sends it again: what a replayed write must
survive. Nothing of Tessera's is imitated: the server and the client are the
real ones, only the wire between them misbehaves.
"""

from __future__ import annotations

import asyncio
import contextlib


class LossyLink:
    """A proxy on ``127.0.0.1:port`` in front of ``127.0.0.1:target``.

    Args:
        port: where clients connect.
        target: the server's port.
    """

    def __init__(self, port: int, target: int) -> None:
        self.port = port
        self.target = target
        #: Replies dropped so far.
        self.lost = 0
        self._patterns: tuple[bytes, ...] = ()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> LossyLink:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def lose_reply_to(self, *patterns: bytes) -> None:
        """Drop the connection, not the command, when one sent holds every pattern (once).

        Called with none, loses nothing.
        """
        self._patterns = patterns

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
        doomed = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self._patterns and all(p in data for p in self._patterns):
                    self._patterns = ()
                    doomed.set()
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if doomed.is_set():
                    # The server has answered the doomed command: it ran.
                    self.lost += 1
                    return
                client_w.write(data)
                await client_w.drain()

        with contextlib.suppress(ConnectionError):
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())],
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in pending:
                task.cancel()
        for writer in (client_w, server_w):
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
