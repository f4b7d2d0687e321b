"""The scheduler's state in Redis: hosts, slot owners, placements, request index.

Every write that must be atomic is one Lua script, so it either happens whole
or not at all and no other client observes it half done. The reservation
commit (``commit.lua``) is the optimistic-concurrency applier: the scheduling
core plans against a snapshot and names the host's ``alloc_generation`` it saw;
the commit succeeds only if that generation is still current and every slot is
still free. Losers get CONFLICT and replan.

Payloads (inventories, placements) are opaque bytes here: this module does not
import protobuf or gRPC and never parses them. Key names come from
:mod:`scheduler.store.schema`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from scheduler.store import schema


@dataclass(frozen=True)
class HostRecord:
    """A registered host as stored.

    Attributes:
        host_id: the host.
        inventory: serialized ``tessera.v1.HostInventory``.
        agent_address: where the host's agent listens.
        boot_id: the kernel boot the inventory was taken in.
        inventory_generation: the agent's inventory counter within that boot.
        last_heartbeat_ms: scheduler clock at the last registration or heartbeat.
        alloc_generation: bumped by every commit and release on this host, and
            by an inventory change (so a plan made against an older inventory
            cannot commit).
        allocations: slot key (``iommu-group:12``) -> owning placement id.
        tenants: placement id -> its tenant, for the placements holding slots.
    """

    host_id: str
    inventory: bytes
    agent_address: str
    boot_id: str
    inventory_generation: int
    last_heartbeat_ms: int
    alloc_generation: int
    allocations: Mapping[str, str] = field(default_factory=dict)
    tenants: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreSnapshot:
    """Every host with its allocations, each host read atomically.

    Attributes:
        hosts: host id -> record.
    """

    hosts: Mapping[str, HostRecord]


class CommitOutcome(enum.Enum):
    """What a reservation commit did."""

    COMMITTED = "COMMITTED"
    """Written: the slots are the placement's now."""
    CONFLICT = "CONFLICT"
    """Nothing written: the host changed since the snapshot (replan)."""
    DUPLICATE = "DUPLICATE"
    """Nothing written: the request id already made a placement."""


@dataclass(frozen=True)
class CommitResult:
    """The answer of :meth:`RedisStateStore.commit_reservation`.

    Attributes:
        outcome: what happened.
        placement_id: the new placement id, or the existing one for DUPLICATE.
        detail: human-readable reason (which slot was taken, how the
            generation moved).
    """

    outcome: CommitOutcome
    placement_id: str
    detail: str


class StoreError(RuntimeError):
    """The store found data it cannot interpret (corrupted or foreign keys)."""


class FencedOutError(StoreError):
    """A background job's write carried a stale fencing token: another replica leads."""


@dataclass(frozen=True)
class Fence:
    """A background job's leadership term, carried by each of its writes.

    Attributes:
        job: the job ("reaper").
        token: the term's fencing token (from :meth:`RedisStateStore.acquire_lease`).
    """

    job: str
    token: int


# KEYS: lease, fence. ARGV: owner, ttl ms. Returns the owner's fencing token
# (renewing the lease), a new token (taking a free lease), or 0 (held by
# another replica).
_LEASE_LUA = """#!lua
local holder = redis.call('GET', KEYS[1])
if not holder then
  local token = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. token, 'PX', ARGV[2])
  return token
end
local owner, token = string.match(holder, '^(%S+) (%d+)$')
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(token)
end
return 0
"""

# KEYS: lease. ARGV: owner. Gives the lease up if this owner holds it.
_YIELD_LEASE_LUA = """#!lua
local holder = redis.call('GET', KEYS[1])
if holder and string.match(holder, '^(%S+) ') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


_COMMIT_LUA = resources.files("scheduler.store").joinpath("commit.lua").read_text("utf-8")

# Registration. A report for the same boot with a lower inventory generation is
# stale (an old RPC delivered late) and must not overwrite a newer one; a new
# boot always wins because generations restart at boot. Allocations are kept:
# the agent reconciles them against its checkpoint after a reboot.
_UPSERT_HOST_LUA = """#!lua
local key = KEYS[1]
local inventory, generation, boot_id = ARGV[1], ARGV[2], ARGV[3]
local address, now_ms = ARGV[4], ARGV[5]
local exists = redis.call('EXISTS', key) == 1
local bump = false
if exists then
  local old = redis.call('HMGET', key, 'boot_id', 'inventory_generation', 'inventory')
  if old[1] == boot_id and tonumber(old[2] or '0') > tonumber(generation) then
    return 0
  end
  -- A plan computed against the old inventory must not commit on the new one.
  bump = old[1] ~= boot_id or old[3] ~= inventory
end
redis.call('HSET', key, 'inventory', inventory, 'inventory_generation', generation,
           'boot_id', boot_id, 'agent_address', address, 'last_heartbeat_ms', now_ms)
if not exists then
  redis.call('HSET', key, 'alloc_generation', 0)
elseif bump then
  redis.call('HINCRBY', key, 'alloc_generation', 1)
end
return 1
"""

_TOUCH_HOST_LUA = """#!lua
if redis.call('HGET', KEYS[1], 'boot_id') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'last_heartbeat_ms', ARGV[2])
return 1
"""

# KEYS: placements, placement-states, fence. ARGV: placement id, payload, new
# state, fencing token ('' for none), then the states it may move from (none:
# any). Returns -3 when the token is stale: a newer leader runs the job.
_UPDATE_PLACEMENT_LUA = """#!lua
if ARGV[4] ~= '' and (redis.call('GET', KEYS[3]) or '') ~= ARGV[4] then
  return -3
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
if #ARGV > 4 then
  local current = redis.call('HGET', KEYS[2], ARGV[1]) or ''
  local allowed = false
  for i = 5, #ARGV do
    if ARGV[i] == current then allowed = true end
  end
  if not allowed then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""

# KEYS: host, alloc, placements, placement-slots, placement-requests,
#       request index, placement index, placement-states, placement-tenants,
#       fence. ARGV: placement id, its request id (read beforehand; -1 asks the
# caller to re-read if it changed meanwhile), the fencing token ('' for none;
# -3 when stale), then the states it may be released from (none: any; -2 if
# not).
_RELEASE_LUA = """#!lua
local host_key, alloc_key, placements_key = KEYS[1], KEYS[2], KEYS[3]
local slots_key, requests_key, request_key, index_key = KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local placement_id, request_id, token = ARGV[1], ARGV[2], ARGV[3]
if token ~= '' and (redis.call('GET', KEYS[10]) or '') ~= token then
  return -3
end
if redis.call('HEXISTS', placements_key, placement_id) == 0 then
  return 0
end
if (redis.call('HGET', requests_key, placement_id) or '') ~= request_id then
  return -1
end
if #ARGV > 3 then
  local current = redis.call('HGET', KEYS[8], placement_id) or ''
  local allowed = false
  for i = 4, #ARGV do
    if ARGV[i] == current then allowed = true end
  end
  if not allowed then
    return -2
  end
end
local encoded = redis.call('HGET', slots_key, placement_id)
if encoded then
  for _, slot in ipairs(cjson.decode(encoded)) do
    -- Free only what this placement owns.
    if redis.call('HGET', alloc_key, slot) == placement_id then
      redis.call('HDEL', alloc_key, slot)
    end
  end
end
redis.call('HDEL', placements_key, placement_id)
redis.call('HDEL', slots_key, placement_id)
redis.call('HDEL', requests_key, placement_id)
redis.call('HDEL', KEYS[8], placement_id)
redis.call('HDEL', KEYS[9], placement_id)
if request_id ~= '' and redis.call('HGET', request_key, 'placement_id') == placement_id then
  redis.call('DEL', request_key)
end
redis.call('DEL', index_key)
if redis.call('EXISTS', host_key) == 1 then
  redis.call('HINCRBY', host_key, 'alloc_generation', 1)
end
return 1
"""


# A placement id re-used for another request between our read and the script
# is the only reason to retry; it cannot keep happening.
_RELEASE_ATTEMPTS = 8


def _check_id(what: str, value: str) -> None:
    """Refuse an empty id: all empty ids would share one key."""
    if not value:
        raise ValueError(f"{what} must not be empty")


def _check_host_id(host_id: str) -> None:
    """Refuse host ids that would alias keys: empty, or moving the hash tag.

    A brace in a host id would change which part of the key Redis Cluster
    hashes, splitting one host's keys over several slots.
    """
    _check_id("host_id", host_id)
    if "{" in host_id or "}" in host_id:
        raise ValueError(f"host_id {host_id!r} must not contain '{{' or '}}'")


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    # Clients are meant to be decode_responses=False; tolerate one that is not.
    return value if isinstance(value, bytes) else value.encode("utf-8")


def _int(value: bytes | str | None) -> int:
    text = _text(value)
    return int(text) if text else 0


def _record(
    host_id: str,
    fields: Mapping[Any, Any],
    allocs: Mapping[Any, Any],
    tenants: Mapping[Any, Any],
) -> HostRecord:
    by_name = {_text(k): v for k, v in fields.items()}
    inventory = by_name.get(schema.F_INVENTORY)
    if inventory is None:
        raise StoreError(f"host record {schema.host(host_id)} has no inventory field")
    return HostRecord(
        host_id=host_id,
        inventory=_bytes(inventory),
        agent_address=_text(by_name.get(schema.F_AGENT_ADDRESS)),
        boot_id=_text(by_name.get(schema.F_BOOT_ID)),
        inventory_generation=_int(by_name.get(schema.F_INVENTORY_GENERATION)),
        last_heartbeat_ms=_int(by_name.get(schema.F_LAST_HEARTBEAT_MS)),
        alloc_generation=_int(by_name.get(schema.F_ALLOC_GENERATION)),
        allocations={_text(k): _text(v) for k, v in allocs.items()},
        tenants={_text(k): _text(v) for k, v in tenants.items()},
    )


class RedisStateStore:
    """Tessera's state in a Redis-protocol server.

    Every method raises ``ValueError`` for an empty host, placement or
    request id, and for a host id containing ``{`` or ``}`` (it would move
    the key's hash tag). Redis errors (connection lost, OOM) propagate as
    ``redis.exceptions.RedisError``; a script either ran whole or not at all.

    Args:
        client: an asyncio client created with ``decode_responses=False``
            (payloads are bytes).
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        # register_script runs EVALSHA and loads the script on NOSCRIPT (a
        # restarted server, or a fresh one, has an empty script cache).
        self._commit = client.register_script(_COMMIT_LUA)
        self._upsert = client.register_script(_UPSERT_HOST_LUA)
        self._touch = client.register_script(_TOUCH_HOST_LUA)
        self._update = client.register_script(_UPDATE_PLACEMENT_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._lease = client.register_script(_LEASE_LUA)
        self._yield_lease = client.register_script(_YIELD_LEASE_LUA)

    # -- hosts ---------------------------------------------------------------

    async def upsert_host(
        self,
        host_id: str,
        inventory: bytes,
        *,
        inventory_generation: int,
        boot_id: str,
        agent_address: str,
        now_ms: int,
    ) -> bool:
        """Record a host's inventory report (registration or a changed inventory).

        Args:
            host_id: the host.
            inventory: serialized ``HostInventory``.
            inventory_generation: the agent's counter of this report.
            boot_id: the boot it was taken in.
            agent_address: where the agent listens.
            now_ms: scheduler clock, recorded as the last heartbeat.

        Returns:
            False, changing nothing, if the stored report is of the same boot
            with a higher generation (this one is stale). A new boot always wins.
        """
        _check_host_id(host_id)
        # The index first: it may then name a host without a record (readers
        # skip those), never miss a recorded one.
        await self._client.sadd(schema.HOSTS, host_id)
        result = await self._upsert(
            keys=[schema.host(host_id)],
            args=[inventory, inventory_generation, boot_id, agent_address, now_ms],
        )
        return bool(result)

    async def touch_host(self, host_id: str, boot_id: str, now_ms: int) -> bool:
        """Heartbeat: renew a host's lease.

        Args:
            host_id: the host.
            boot_id: the boot the agent is running in.
            now_ms: scheduler clock.

        Returns:
            False if the host is unknown or registered with another boot: the
            agent must register again.
        """
        _check_host_id(host_id)
        return bool(await self._touch(keys=[schema.host(host_id)], args=[boot_id, now_ms]))

    async def get_host(self, host_id: str) -> HostRecord | None:
        """One host with its allocations, read atomically.

        Args:
            host_id: the host.

        Returns:
            The record, or None if the host is not registered.
        """
        _check_host_id(host_id)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hgetall(schema.host(host_id))
            pipe.hgetall(schema.alloc(host_id))
            pipe.hgetall(schema.placement_tenants(host_id))
            fields, allocs, tenants = await pipe.execute()
        if not fields:
            return None
        return _record(host_id, fields, allocs, tenants)

    async def snapshot(self) -> StoreSnapshot:
        """Every registered host with its allocations.

        All hosts are read in one MULTI, so the snapshot is consistent across
        hosts (the scheduler needs it per host only).

        Returns:
            The snapshot.
        """
        host_ids = sorted(_text(h) for h in await self._client.smembers(schema.HOSTS))
        if not host_ids:
            return StoreSnapshot(hosts={})
        async with self._client.pipeline(transaction=True) as pipe:
            for host_id in host_ids:
                pipe.hgetall(schema.host(host_id))
                pipe.hgetall(schema.alloc(host_id))
                pipe.hgetall(schema.placement_tenants(host_id))
            replies = await pipe.execute()
        hosts: dict[str, HostRecord] = {}
        for i, host_id in enumerate(host_ids):
            fields, allocs, tenants = replies[3 * i : 3 * i + 3]
            if fields:
                hosts[host_id] = _record(host_id, fields, allocs, tenants)
        return StoreSnapshot(hosts=hosts)

    # -- reservations ----------------------------------------------------------

    async def commit_reservation(
        self,
        *,
        host_id: str,
        expected_alloc_generation: int,
        slots: Sequence[str],
        placement_id: str,
        placement: bytes,
        request_id: str,
        request_digest: str,
        tenant: str = "",
    ) -> CommitResult:
        """Atomically reserve slots on a host for a new placement.

        One Lua script checks, in order: the request id is new (else
        DUPLICATE with the existing placement id, even if the generation
        moved); the host is registered, its alloc generation is the expected
        one, the placement id is unused and every slot is free (else
        CONFLICT). Only then does it write the slot owners, the placement, the
        request and placement indexes, and bump the alloc generation.

        Args:
            host_id: the host the plan chose.
            expected_alloc_generation: the host's generation in the snapshot
                the plan was made from.
            slots: slot keys the placement takes.
            placement_id: the new placement's id (chosen by the caller).
            placement: serialized ``Placement``.
            request_id: the client's idempotency key.
            request_digest: digest of the request, to detect a reused id.
            tenant: the placement's tenant, recorded beside it for snapshots.

        Returns:
            What happened, and why.
        """
        _check_host_id(host_id)
        _check_id("placement_id", placement_id)
        _check_id("request_id", request_id)
        for slot in slots:
            if not slot:
                raise ValueError("slot keys must not be empty")
        reply = await self._commit(
            keys=[
                *schema.host_keys(host_id),
                schema.request(request_id),
                schema.placement_index(placement_id),
                schema.placement_states(host_id),
                schema.placement_tenants(host_id),
            ],
            args=[
                str(expected_alloc_generation),
                placement_id,
                placement,
                request_id,
                request_digest,
                host_id,
                tenant,
                *slots,
            ],
        )
        outcome, pid, detail = (_text(x) for x in reply)
        return CommitResult(CommitOutcome(outcome), pid, detail)

    async def update_placement(
        self,
        host_id: str,
        placement_id: str,
        placement: bytes,
        *,
        state: str,
        from_states: Sequence[str] = (),
        fence: Fence | None = None,
    ) -> bool:
        """Replace a placement's payload and state, compare-and-set on the state.

        Slot ownership and the alloc generation do not change.

        Args:
            host_id: the placement's host.
            placement_id: the placement.
            placement: its new serialized ``Placement``.
            state: its new lifecycle state (``ready``, ``releasing``, ...).
            from_states: the states it may move from; empty allows any.
            fence: a background job's term; the write is refused once a newer
                term began.

        Returns:
            False if the placement no longer exists or is in another state
            (nothing is written).

        Raises:
            FencedOutError: ``fence`` is stale.
        """
        _check_host_id(host_id)
        _check_id("placement_id", placement_id)
        job = fence.job if fence else "none"
        result = int(
            await self._update(
                keys=[
                    schema.placements(host_id),
                    schema.placement_states(host_id),
                    schema.fence(job),
                ],
                args=[
                    placement_id,
                    placement,
                    state,
                    str(fence.token) if fence else "",
                    *from_states,
                ],
            )
        )
        if result == -3:
            raise FencedOutError(f"{job} fencing token {fence.token if fence else 0} is stale")
        return result == 1

    async def placement_state(self, host_id: str, placement_id: str) -> str | None:
        """A placement's lifecycle state, or None if it does not exist."""
        _check_host_id(host_id)
        raw = await self._client.hget(schema.placement_states(host_id), placement_id)
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def release(
        self,
        host_id: str,
        placement_id: str,
        *,
        from_states: Sequence[str] = (),
        fence: Fence | None = None,
    ) -> bool:
        """Atomically free a placement's slots and forget it.

        Frees only the slots the placement still owns, deletes the placement,
        its request index and placement index entries, and bumps the host's
        alloc generation.

        Args:
            host_id: the placement's host.
            placement_id: the placement.
            from_states: release only from these states; empty allows any.
            fence: a background job's term; the release is refused once a
                newer term began.

        Returns:
            False if there was no such placement on that host, or it was in
            another state (nothing is written).

        Raises:
            FencedOutError: ``fence`` is stale.
        """
        _check_host_id(host_id)
        _check_id("placement_id", placement_id)
        # The script must be handed the request index key, so read the request
        # id first; the script re-checks it and asks for a re-read (-1) if the
        # placement was replaced in between.
        for _ in range(_RELEASE_ATTEMPTS):
            raw = await self._client.hget(schema.placement_requests(host_id), placement_id)
            request_id = _text(raw)
            result = int(
                await self._release(
                    keys=[
                        *schema.host_keys(host_id),
                        schema.request(request_id),
                        schema.placement_index(placement_id),
                        schema.placement_states(host_id),
                        schema.placement_tenants(host_id),
                        schema.fence(fence.job if fence else "none"),
                    ],
                    args=[
                        placement_id,
                        request_id,
                        str(fence.token) if fence else "",
                        *from_states,
                    ],
                )
            )
            if result == -3:
                raise FencedOutError(f"{fence.job if fence else ''} fencing token is stale")
            if result == -2:
                return False
            if result >= 0:
                return result == 1
        raise StoreError(
            f"placement {placement_id} on host {host_id} kept changing under release; retry"
        )

    # -- lookups ---------------------------------------------------------------

    async def get_placement(self, placement_id: str) -> tuple[str, bytes] | None:
        """A placement by id.

        Args:
            placement_id: the placement.

        Returns:
            ``(host_id, payload)``, or None if there is none.
        """
        if not placement_id:
            return None
        host_id = _text(await self._client.get(schema.placement_index(placement_id)))
        if not host_id:
            return None
        payload = await self._client.hget(schema.placements(host_id), placement_id)
        if payload is None:  # released between the two reads
            return None
        return host_id, _bytes(payload)

    async def placement_for_request(self, request_id: str) -> tuple[str, str] | None:
        """The placement a request id made.

        Args:
            request_id: the client's idempotency key.

        Returns:
            ``(placement_id, request_digest)``, or None if the id is unused.
        """
        if not request_id:
            return None
        placement_id, digest = await self._client.hmget(
            schema.request(request_id), [schema.F_PLACEMENT_ID, schema.F_DIGEST]
        )
        if placement_id is None:
            return None
        return _text(placement_id), _text(digest)

    async def acquire_lease(self, job: str, owner: str, ttl_ms: int) -> int:
        """Take or renew the lease of a background job.

        Args:
            job: the job ("reaper").
            owner: this replica's unique name.
            ttl_ms: how long the lease lasts without renewal.

        Returns:
            The fencing token of this owner's term (a new, larger one when the
            lease was free), or 0 when another replica holds it.
        """
        _check_id("job", job)
        _check_id("owner", owner)
        if " " in owner:
            raise ValueError("owner must not contain spaces")
        return int(
            await self._lease(keys=[schema.lease(job), schema.fence(job)], args=[owner, ttl_ms])
        )

    async def yield_lease(self, job: str, owner: str) -> bool:
        """Give a job's lease up (on shutdown), if this owner holds it."""
        return bool(await self._yield_lease(keys=[schema.lease(job)], args=[owner]))

    async def list_placements(self, host_id: str | None = None) -> list[tuple[str, bytes]]:
        """Placements of one host or of all hosts, ordered by placement id.

        Args:
            host_id: one host, or None for every host.

        Returns:
            ``(host_id, payload)`` pairs.
        """
        if host_id is not None:
            _check_host_id(host_id)
            host_ids = [host_id]
        else:
            host_ids = sorted(_text(h) for h in await self._client.smembers(schema.HOSTS))
        if not host_ids:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for h in host_ids:
                pipe.hgetall(schema.placements(h))
            replies = await pipe.execute()
        rows: list[tuple[str, str, bytes]] = []
        for h, found in zip(host_ids, replies, strict=True):
            rows.extend((_text(pid), h, _bytes(payload)) for pid, payload in found.items())
        rows.sort()
        return [(h, payload) for _, h, payload in rows]
