"""The roster of scheduler replicas placing now: who renews a membership in the store.

Replicas plan optimistically on one store; two that reach for the same
device lose a commit between them. Knowing who else places lets each one
prefer its own share of the hosts (see :meth:`scheduler.core.engine.fastpath.Engine.set_peers`).
Membership is a score in one sorted set (:data:`scheduler.store.schema.REPLICAS`),
judged on the store's clock, so replicas' clocks need not agree.
"""

from __future__ import annotations

import re

from tessera.scheduler.store.connection import StoreClient
from tessera.scheduler.store.schema import REPLICAS

#: How many replicas a renewal reads back, at most: a roster is a handful of
#: processes; a set grown past this (a writer gone wrong) is not read whole.
MAX_REPLICAS = 64

#: What a replica's name may look like (it goes into logs and a sorted set).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

# KEYS: roster. ARGV: name, ttl ms, how many to read. Drops memberships past
# their time, renews this one, returns the members (soonest to run out first).
_RENEW_LUA = """#!lua
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1)
"""


def check_name(name: str) -> str:
    """A replica name, refused unless it is a short printable id.

    Raises:
        ValueError: an empty, long or odd name.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"replica name {name[:40]!r} must be 1-128 characters of letters, digits, '._:-'"
        )
    return name


class RosterStore:
    """Renews and ends a replica's membership in the roster."""

    def __init__(self, client: StoreClient) -> None:
        self._client = client
        self._renew = client.register_script(_RENEW_LUA)

    async def renew(self, name: str, ttl_ms: int) -> frozenset[str]:
        """Keep ``name`` a member for ``ttl_ms`` more; every member now, itself included.

        Raises:
            ValueError: a bad name or a TTL under one millisecond.
            redis.exceptions.RedisError: the store is unreachable.
        """
        check_name(name)
        if ttl_ms < 1:
            raise ValueError(f"ttl_ms must be at least 1, not {ttl_ms}")
        found = await self._renew(keys=[REPLICAS], args=[name, ttl_ms, MAX_REPLICAS])
        members = {m.decode() if isinstance(m, bytes) else str(m) for m in found}
        # A roster past MAX_REPLICAS may have read back others only.
        return frozenset(m for m in members if _NAME.fullmatch(m)) | {name}

    async def leave(self, name: str) -> None:
        """End ``name``'s membership now (its share of the hosts goes to the others at once)."""
        check_name(name)
        await self._client.zrem(REPLICAS, name)
