"""Commands packed for the wire by hiredis's C packer, not redis-py's Python one.

redis-py's asyncio connections encode every argument and build each command
in Python (its synchronous client uses hiredis when installed, its asyncio
client does not). A replica under load sends a few scripts per placement,
each with a dozen or more arguments (slot keys, versions, the placement), and
that packing took about a tenth of the scheduler's time. hiredis (already
the reply parser) packs the same bytes in C.

Arguments redis-py would refuse (None, a bool, a nested list) are refused
here too, with redis-py's own :class:`~redis.exceptions.DataError`. The
cluster client keeps redis-py's packing: its nodes' connection class is
fixed inside redis-py.
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection
from redis.exceptions import DataError


class _PackedByHiredis(AbstractConnection):
    """A connection whose commands hiredis packs (mixed in before redis-py's class)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        """One command in the Redis protocol, as redis-py's ``pack_command`` returns it."""
        # As redis-py does: a command name with spaces ("CONFIG GET") is
        # sent as separate words.
        head = args[0]
        if isinstance(head, str):
            args = (*head.encode().split(), *args[1:])
        elif b" " in head:
            args = (*head.split(), *args[1:])
        if any(isinstance(arg, bool | bytearray) for arg in args):
            args = tuple(map(_as_hiredis_takes, args))
        try:
            return [hiredis.pack_command(args)]
        except TypeError as err:
            raise DataError(str(err)) from None


def _as_hiredis_takes(arg: Any) -> Any:
    """An argument as redis-py would send it, in a type hiredis packs."""
    if isinstance(arg, bool):
        # hiredis would send True as 1; redis-py refuses it (so do we).
        raise DataError("a bool is not a valid Redis argument; convert it first")
    if isinstance(arg, bytearray):
        return bytes(arg)
    return arg


class _TcpConnection(_PackedByHiredis, Connection):
    """TCP, packed by hiredis."""


class _TlsConnection(_PackedByHiredis, SSLConnection):
    """TLS, packed by hiredis."""


class _UnixConnection(_PackedByHiredis, UnixDomainSocketConnection):
    """Unix socket, packed by hiredis."""


class _FollowsSentinel(SentinelManagedConnection):
    """A connection to the primary that asks the Sentinels again whenever it reconnects.

    redis-py's ``send_packed_command`` reconnects a dropped connection to the
    address it had (``connect_check_health``), not through ``connect()``: a
    command retried after a timeout or READONLY dialled the old primary on
    every retry (7 times the socket timeout against a frozen primary), and a
    connection in use while the pool learnt of a new primary went back to
    the pool still talking to the old one, which acknowledged writes the
    failover then discarded. Here a connection whose address is no longer
    the pool's primary is dropped before its next command, and every
    reconnect asks the Sentinels.
    """

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        pool = self.connection_pool
        known = pool.master_address if pool.is_master else None
        if self.is_connected and known is not None and (self.host, self.port) != tuple(known):
            await self.disconnect()
        if not self.is_connected:
            await self.connect()  # type: ignore[no-untyped-call]
        await super().send_packed_command(command, check_health)


class _SentinelConnection(_PackedByHiredis, _FollowsSentinel):
    """To the primary Sentinel names, packed by hiredis."""


class _SentinelTlsConnection(_PackedByHiredis, _FollowsSentinel, SentinelManagedSSLConnection):
    """TLS to the primary Sentinel names, packed by hiredis."""


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _TcpConnection,
    SSLConnection: _TlsConnection,
    UnixDomainSocketConnection: _UnixConnection,
    SentinelManagedConnection: _SentinelConnection,
    SentinelManagedSSLConnection: _SentinelTlsConnection,
}


def pack_with_hiredis(client: aioredis.Redis) -> aioredis.Redis:
    """Have a one-server client's new connections pack commands with hiredis.

    Connections already open keep packing in Python (they are equivalent on
    the wire). A connection class other than redis-py's five (TCP, TLS, Unix
    socket, and Sentinel's to its primary, plain or TLS) is left alone.

    Returns:
        ``client``, for chaining.
    """
    pool = client.connection_pool
    packed = _PACKED.get(pool.connection_class)
    if packed is not None:
        pool.connection_class = packed
    return client
