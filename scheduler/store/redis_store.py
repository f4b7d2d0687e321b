"""The scheduler's state in Redis: hosts, slot owners, placements, request index.

Every write that must be atomic is one Lua script, so it either happens whole
or not at all and no other client observes it half done. The reservation
commit (``commit.lua``) is the optimistic-concurrency applier: the scheduling
core plans against a snapshot and names the host's ``alloc_generation`` it saw;
the commit succeeds only if that generation is still current and every slot is
still free. Losers get CONFLICT and replan.

Every script touches one hash slot (one host's keys, one request record, or
one job's lease and fence), so the layout is ready for Redis Cluster; the
request protocol that makes this possible is described in
:mod:`scheduler.store.schema`.

Payloads (inventories, placements) are opaque bytes here: this module does not
import protobuf or gRPC and never parses them. Key names come from
:mod:`scheduler.store.schema`.
"""

from __future__ import annotations

import asyncio
import enum
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from tessera.scheduler.store import schema
from tessera.scheduler.store.batching import ScriptBatcher
from tessera.scheduler.store.safety import sentinel_pool


@dataclass(frozen=True)
class HostRecord:
    """A registered host as stored.

    Attributes:
        host_id: the host.
        inventory: serialized ``tessera.v1.HostInventory``; empty when the
            reader said it holds this boot's and generation's inventory
            already (see :meth:`RedisStateStore.snapshot`).
        agent_address: where the host's agent listens.
        boot_id: the kernel boot the inventory was taken in.
        inventory_generation: the agent's inventory counter within that boot.
        last_heartbeat_ms: scheduler clock at the last registration or heartbeat.
        alloc_generation: bumped by every change that goes on the change
            feed (commit, release, a changed report, cordon, uncordon, a lease
            expiring or coming back): two reads of a host at one generation
            hold the same state.
        allocations: slot key (``iommu-group:12``) -> owning placement id.
        tenants: placement id -> its tenant, for the placements holding slots.
        fences: background job -> the highest fencing token that wrote here.
        cordoned: an operator took the host out of scheduling; its
            placements stay.
        cordon_reason: why (empty when not cordoned).
        cordoned_by: who (the caller's identity as the scheduler saw it).
        cordoned_ms: when, scheduler clock (0 when not cordoned).
        lease_expired: the housekeeper found the lease run out and no
            heartbeat or registration came since.
        versions: guard key -> version (:mod:`scheduler.core.guards`).
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
    fences: Mapping[str, int] = field(default_factory=dict)
    cordoned: bool = False
    cordon_reason: str = ""
    cordoned_by: str = ""
    cordoned_ms: int = 0
    lease_expired: bool = False
    versions: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FeedCursor:
    """Where a reader stands in one shard's change feed.

    Attributes:
        shard: the shard.
        entry_id: the stream id of the last entry read (``0-0``: none).
        seq: that entry's sequence number (0: none).
    """

    shard: int
    entry_id: str = "0-0"
    seq: int = 0


@dataclass(frozen=True)
class FeedEntry:
    """One change on a shard's feed: a host whose state moved.

    Attributes:
        shard: the shard.
        entry_id: its stream id.
        seq: its sequence number (one more than the entry before it).
        host_id: the host that changed (added, changed or forgotten).
        generation: the host's alloc generation after the change (-1: the
            host is gone).
        incarnation: the host record's incarnation (0: none, or gone).
    """

    shard: int
    entry_id: str
    seq: int
    host_id: str
    generation: int = -1
    incarnation: int = 0


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
    """Nothing written: what the plan depended on changed since (replan)."""
    EXPIRED = "EXPIRED"
    """Nothing written: the claim's deadline passed before the commit (retry)."""
    LOST = "LOST"
    """Nothing written: the request's claim is no longer this caller's (claim again)."""


@dataclass(frozen=True)
class CommitResult:
    """The answer of :meth:`RedisStateStore.commit_reservation`.

    Attributes:
        outcome: what happened.
        placement_id: the placement id of the attempt.
        detail: human-readable reason (which slot was taken, which guard
            moved).
        alloc_generation: the host's alloc generation after a commit (0
            otherwise): the commit's state is the one before plus its slots
            exactly when the generation moved by one.
    """

    outcome: CommitOutcome
    placement_id: str
    detail: str
    alloc_generation: int = 0


def _commit_result(reply: Sequence[Any]) -> CommitResult:
    """A commit script's reply: (outcome, placement id, detail, generation)."""
    outcome, pid, detail, generation = reply
    return CommitResult(CommitOutcome(_text(outcome)), _text(pid), _text(detail), int(generation))


class ClaimOutcome(enum.Enum):
    """What claiming a request id found."""

    CLAIMED = "CLAIMED"
    """The caller holds the request id now: plan and commit it."""
    DUPLICATE = "DUPLICATE"
    """The request id already made a placement (``placement_id``)."""
    BUSY = "BUSY"
    """Another call holds the claim and is within its deadline."""


@dataclass(frozen=True)
class RequestClaim:
    """The answer of :meth:`RedisStateStore.claim_request`.

    Attributes:
        outcome: what the claim found.
        digest: the digest the record holds: the caller's own for CLAIMED,
            the first call's otherwise (compare it to detect a reused id).
        placement_id: the placement the request made (DUPLICATE), or the one
            the other call is committing (BUSY; may be empty).
    """

    outcome: ClaimOutcome
    digest: str
    placement_id: str = ""


class HeartbeatOutcome(enum.IntEnum):
    """What a heartbeat did; false (0) when the agent must register again."""

    UNKNOWN = 0
    """Nothing written: no such host, or it is registered with another boot."""
    RENEWED = 1
    """The lease was renewed."""
    REVIVED = 2
    """The lease had expired and is renewed: the host is schedulable again."""


class ForgetOutcome(enum.Enum):
    """What forgetting a host did."""

    FORGOTTEN = "FORGOTTEN"
    """Every key of the host is gone (with its placements, if forced)."""
    NOT_FOUND = "NOT_FOUND"
    """Nothing written: the store holds no key of that host."""
    BUSY = "BUSY"
    """Nothing written: the host holds placements and the call did not force."""
    ALIVE = "ALIVE"
    """Nothing written: the call asked for a dead host, and its lease is not
    marked expired or it heartbeat since the call's deadline."""


@dataclass(frozen=True)
class ForgetResult:
    """The answer of :meth:`RedisStateStore.forget_host`.

    Attributes:
        outcome: what happened.
        placements: BUSY: placement id -> lifecycle state of each placement
            the host holds; FORGOTTEN: placement id -> request id of each
            placement dropped with the host (empty unless forced).
    """

    outcome: ForgetOutcome
    placements: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordSweep:
    """What one sweep of the request records settled.

    Attributes:
        claims_resolved: claims past their deadline, finalized or dropped.
        records_forgotten: committed records whose placement was gone.
    """

    claims_resolved: int
    records_forgotten: int


class StoreError(RuntimeError):
    """The store found data it cannot interpret (corrupted or foreign keys)."""


class LayoutMismatchError(StoreError):
    """The store was written in another key layout than this scheduler's."""


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


# Appends one host's change to its shard's feed (the shard's two keys are
# always the script's last two KEYS, in the host's hash slot), with the
# host's incarnation and alloc generation after it (generation -1: the host
# is gone). Every change that goes on the feed bumps that generation, so a
# reader holding the host at that incarnation and generation already (its
# own commit) need not read the host again. The sequence number
# lets a reader tell a complete run of entries from one with a hole.
_FEED_LUA = f"""
local function feed_append(feed_key, seq_key, host_key, host_id, generation)
  local n = redis.call('INCR', seq_key)
  local incarnation = redis.call('HGET', host_key, '{schema.F_INCARNATION}') or '0'
  redis.call('XADD', feed_key, 'MAXLEN', '~', {schema.FEED_MAXLEN}, '*',
             '{schema.F_FEED_HOST}', host_id, '{schema.F_FEED_SEQ}', n,
             '{schema.F_FEED_GENERATION}', generation,
             '{schema.F_FEED_INCARNATION}', incarnation)
end
"""


def _with_feed(script: str) -> str:
    """A script (first line its shebang) with :data:`_FEED_LUA` after the shebang."""
    shebang, _, body = script.partition("\n")
    return f"{shebang}\n{_FEED_LUA}\n{body}"


_COMMIT_LUA = _with_feed(
    resources.files("tessera.scheduler.store").joinpath("commit.lua").read_text("utf-8")
)


def _claimed_commit(commit: str) -> str:
    """The commit script with the claim's intent before it and its finalization after.

    For a server that is not a cluster, where the request record and the
    host's keys may meet in one script: one round trip instead of three, and
    the record cannot change between the steps. commit.lua's body becomes a
    function of its own KEYS and ARGV.

    KEYS: the request record, then commit.lua's keys. ARGV: the claimant,
    the claim's time to live in ms, then commit.lua's arguments (its claim
    deadline is set here). Returns commit.lua's reply, or LOST when the claim
    is no longer the caller's (nothing written).
    """
    shebang, _, body = commit.partition("\n")
    return f"""{shebang}
local function commit_on_host(KEYS, ARGV)
{body}
end
{_NOW_LUA}
local request_key = KEYS[1]
local claim = redis.call('HMGET', request_key, 'state', 'claimant', 'placement_id')
local commit_keys, commit_args = {{}}, {{}}
for i = 2, #KEYS do commit_keys[i - 1] = KEYS[i] end
for i = 3, #ARGV do commit_args[i - 2] = ARGV[i] end
if claim[1] == 'committed' and claim[3] == commit_args[1] then
  -- This very commit ran already (a client that lost the reply sent it
  -- again): answer as it did, with the host's generation now.
  local generation = redis.call('HGET', commit_keys[1], 'alloc_generation') or '0'
  return {{'COMMITTED', commit_args[1], 'committed already (the call was repeated)',
           tonumber(generation)}}
end
if claim[1] ~= 'claimed' or claim[2] ~= ARGV[1] then
  return {{'LOST', commit_args[1], 'the claim on request ' .. commit_args[3] ..
           " is no longer this call's", 0}}
end
-- The intent first (what a takeover of the claim would look for), as the
-- separate steps write it; the deadline is now plus the claim's time to live.
local deadline = now_ms + tonumber(ARGV[2])
redis.call('HSET', request_key, 'placement_id', commit_args[1], 'host_id', commit_args[4],
           'deadline_ms', deadline)
commit_args[6] = tostring(deadline)
local reply = commit_on_host(commit_keys, commit_args)
if reply[1] == 'COMMITTED' then
  redis.call('HSET', request_key, 'state', 'committed')
  redis.call('HDEL', request_key, 'claimant', 'deadline_ms')
end
return reply
"""


# Registration. A report for the same boot with a lower inventory generation is
# stale (an old RPC delivered late) and must not overwrite a newer one; a new
# boot always wins because generations restart at boot. Allocations are kept:
# the agent reconciles them against its checkpoint after a reboot, and so is
# an operator's cordon (only uncordon clears it). A report clears an expired
# lease. Anything that changed (new host, inventory, boot, address, lease)
# goes on the feed. KEYS: host, versions, feed, feed-seq. ARGV: inventory,
# generation, boot id, address, now ms, host id. Returns 0 (stale), 1 (updated) or 2
# (created: the host is new, or was forgotten).
_UPSERT_HOST_LUA = _with_feed("""#!lua
local key = KEYS[1]
local inventory, generation, boot_id = ARGV[1], ARGV[2], ARGV[3]
local address, now_ms, host_id = ARGV[4], ARGV[5], ARGV[6]
local exists = redis.call('EXISTS', key) == 1
local bump, changed = false, not exists
if exists then
  local old = redis.call('HMGET', key, 'boot_id', 'inventory_generation', 'inventory',
                         'agent_address', 'lease_expired')
  if old[1] == boot_id and tonumber(old[2] or '0') > tonumber(generation) then
    return 0
  end
  -- A plan computed against the old inventory must not commit on the new one.
  bump = old[1] ~= boot_id or old[3] ~= inventory
  changed = bump or old[4] ~= address or old[5] == '1'
  if old[5] == '1' then
    redis.call('HDEL', key, 'lease_expired')
  end
end
redis.call('HSET', key, 'inventory', inventory, 'inventory_generation', generation,
           'boot_id', boot_id, 'agent_address', address, 'last_heartbeat_ms', now_ms)
local alloc_generation = 0
if not exists then
  -- A new incarnation of the host id: versions counted anew from here never
  -- match a plan made on an earlier one (forgotten, or lost with the data).
  local clock = redis.call('TIME')
  local incarnation = string.format('%d', tonumber(clock[1]) * 1000000 + tonumber(clock[2]))
  redis.call('HSET', key, 'alloc_generation', 0, 'incarnation', incarnation)
  redis.call('HSET', KEYS[2], 'incarnation', incarnation)
elseif changed then
  alloc_generation = redis.call('HINCRBY', key, 'alloc_generation', 1)
end
if bump then
  redis.call('HINCRBY', KEYS[2], 'epoch', 1)
end
if changed then
  feed_append(KEYS[3], KEYS[4], key, host_id, alloc_generation)
end
if not exists then
  return 2
end
return 1
""")

# Heartbeat. KEYS: host, feed, feed-seq. ARGV: boot id, now ms, host id.
# Renewing a live lease changes nothing a replica plans on: only a lease that
# had expired goes on the feed, as it comes back. Returns 0 (unknown host or
# boot), 1 (renewed) or 2 (renewed a lease that had expired).
_TOUCH_HOST_LUA = _with_feed("""#!lua
if redis.call('HGET', KEYS[1], 'boot_id') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'last_heartbeat_ms', ARGV[2])
if redis.call('HGET', KEYS[1], 'lease_expired') == '1' then
  redis.call('HDEL', KEYS[1], 'lease_expired')
  local generation = redis.call('HINCRBY', KEYS[1], 'alloc_generation', 1)
  feed_append(KEYS[2], KEYS[3], KEYS[1], ARGV[3], generation)
  return 2
end
return 1
""")

# Lease expiry, the housekeeper's sweep. KEYS: host, versions, feed, feed-seq. ARGV:
# host id, heartbeat deadline ms (scheduler clock, as heartbeats record).
# Marks the host expired if its last heartbeat is older than the deadline,
# bumping the alloc generation (a plan made while it was alive must not
# commit on it) and appending to the feed. Returns 1 if it expired now.
_EXPIRE_HOST_LUA = _with_feed("""#!lua
local r = redis.call('HMGET', KEYS[1], 'last_heartbeat_ms', 'lease_expired', 'boot_id')
if not r[3] or r[2] == '1' or tonumber(r[1] or '0') >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_expired', '1')
local generation = redis.call('HINCRBY', KEYS[1], 'alloc_generation', 1)
redis.call('HINCRBY', KEYS[2], 'epoch', 1)
feed_append(KEYS[3], KEYS[4], KEYS[1], ARGV[1], generation)
return 1
""")

# KEYS: feed, feed-seq. The shard's last sequence number and the id of its
# last entry, read together so that a reader starting there misses nothing.
_FEED_HEAD_LUA = """#!lua flags=no-writes
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local id = '0-0'
if #last > 0 then id = last[1][1] end
return {tonumber(redis.call('GET', KEYS[2]) or '0'), id}
"""

# A fenced write is checked against the highest token the host has seen
# (kept in its hash, so the check stays in the host's slot): a lower one is
# refused, a higher one raises the bar. A new leader raises it on every host
# before it acts (see raise_fences), so a deposed one is refused everywhere.
_FENCE_LUA = """
local function fenced(host_key, job, token)
  if token == '' then return true end
  local field = 'fence:' .. job
  local seen = tonumber(redis.call('HGET', host_key, field) or '0')
  local mine = tonumber(token)
  if mine < seen then return false end
  if mine > seen and redis.call('EXISTS', host_key) == 1 then
    redis.call('HSET', host_key, field, token)
  end
  return true
end
"""

# KEYS: host, alloc, placement-tenants, versions. One host's record, read atomically
# inside its slot (a MULTI over many hosts would span slots).
# ARGV: the boot id and inventory generation whose inventory the caller
# already holds ('' none, '*' any): the inventory, kilobytes a host, is then
# left out of the reply, so reading every host for each placement moves only
# allocations over the wire.
_READ_HOST_LUA = """#!lua flags=no-writes
local fields = redis.call('HGETALL', KEYS[1])
if ARGV[1] ~= '' then
  local boot, generation = '', ''
  for i = 1, #fields, 2 do
    if fields[i] == 'boot_id' then boot = fields[i + 1] end
    if fields[i] == 'inventory_generation' then generation = fields[i + 1] end
  end
  if ARGV[1] == '*' or (boot == ARGV[1] and generation == ARGV[2]) then
    local kept = {}
    for i = 1, #fields, 2 do
      if fields[i] ~= 'inventory' then
        kept[#kept + 1] = fields[i]
        kept[#kept + 1] = fields[i + 1]
      end
    end
    fields = kept
  end
end
return {fields, redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3]),
        redis.call('HGETALL', KEYS[4])}
"""

# The server's clock: deadlines of request claims are in server time, so
# replicas' clocks never matter.
_NOW_LUA = """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# KEYS: host. ARGV: job, token. Returns 0 when a newer term already wrote.
_RAISE_FENCE_LUA = (
    "#!lua"
    + _FENCE_LUA
    + """
if fenced(KEYS[1], ARGV[1], ARGV[2]) then return 1 end
return 0
"""
)

# KEYS: placements, placement-states, host. ARGV: placement id, payload, new
# state, job, fencing token ('' for none), then the states it may move from
# (none: any). Returns -3 when the token is stale: a newer leader runs the job.
_UPDATE_PLACEMENT_LUA = (
    "#!lua"
    + _FENCE_LUA
    + """
if not fenced(KEYS[3], ARGV[4], ARGV[5]) then
  return -3
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
if #ARGV > 5 then
  local current = redis.call('HGET', KEYS[2], ARGV[1]) or ''
  local allowed = false
  for i = 6, #ARGV do
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
)

# KEYS: host, alloc, placements, placement-slots, placement-requests,
#       placement-states, placement-tenants, versions, placement-bumps, feed,
#       feed-seq. ARGV: placement
# id, job, fencing token ('' for none), host id, then the states it may be
# released from (none: any). Returns {code, request id}: 1 released, 0 no
# such placement, -2 in another state, -3 stale token.
_RELEASE_LUA = _with_feed(
    "#!lua"
    + _FENCE_LUA
    + """
local host_key, alloc_key, placements_key = KEYS[1], KEYS[2], KEYS[3]
local slots_key, requests_key, states_key, tenants_key = KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local placement_id = ARGV[1]
if not fenced(host_key, ARGV[2], ARGV[3]) then
  return {-3, '', 0}
end
if redis.call('HEXISTS', placements_key, placement_id) == 0 then
  return {0, '', 0}
end
if #ARGV > 4 then
  local current = redis.call('HGET', states_key, placement_id) or ''
  local allowed = false
  for i = 5, #ARGV do
    if ARGV[i] == current then allowed = true end
  end
  if not allowed then
    return {-2, '', 0}
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
local bumps = redis.call('HGET', KEYS[9], placement_id)
if bumps then
  -- What depended on the devices it held sees them change again.
  for _, key in ipairs(cjson.decode(bumps)) do
    redis.call('HINCRBY', KEYS[8], key, 1)
  end
  redis.call('HDEL', KEYS[9], placement_id)
end
local request_id = redis.call('HGET', requests_key, placement_id) or ''
redis.call('HDEL', placements_key, placement_id)
redis.call('HDEL', slots_key, placement_id)
redis.call('HDEL', requests_key, placement_id)
redis.call('HDEL', states_key, placement_id)
redis.call('HDEL', tenants_key, placement_id)
local generation = 0
if redis.call('EXISTS', host_key) == 1 then
  generation = redis.call('HINCRBY', host_key, 'alloc_generation', 1)
  feed_append(KEYS[10], KEYS[11], host_key, ARGV[4], generation)
end
return {1, request_id, generation}
"""
)

# The request protocol (see schema.py): each script is one key, the request
# record. Fields: state, digest, claimant, deadline_ms, placement_id, host_id.

# KEYS: request. ARGV: claimant, digest, ttl ms, skew margin ms.
# Returns {verdict, digest, claimant, placement_id, host_id} with verdict
# CLAIMED (new, or already the caller's: the deadline is renewed), COMMITTED
# (the record names a committed placement), BUSY (another live claim) or
# STALE (another claim past its deadline and the margin: no commit of it can
# land any more; the caller resolves it).
_CLAIM_LUA = (
    "#!lua"
    + _NOW_LUA
    + """
local key, claimant, digest = KEYS[1], ARGV[1], ARGV[2]
local ttl, margin = tonumber(ARGV[3]), tonumber(ARGV[4])
local r = redis.call('HMGET', key, 'state', 'digest', 'claimant', 'deadline_ms',
                     'placement_id', 'host_id')
if not r[1] then
  redis.call('HSET', key, 'state', 'claimed', 'digest', digest, 'claimant', claimant,
             'deadline_ms', now_ms + ttl)
  return {'CLAIMED', digest, claimant, '', ''}
end
local verdict
if r[1] == 'committed' then
  verdict = 'COMMITTED'
elseif r[3] == claimant then
  redis.call('HSET', key, 'deadline_ms', now_ms + ttl)
  verdict = 'CLAIMED'
elseif now_ms <= tonumber(r[4] or '0') + margin then
  verdict = 'BUSY'
else
  verdict = 'STALE'
end
return {verdict, r[2] or '', r[3] or '', r[5] or '', r[6] or ''}
"""
)

# KEYS: request. ARGV: claimant, placement id, host id, ttl ms. Records the
# placement about to be committed and renews the deadline. Returns the new
# deadline (server ms), or -1 if the claim is not the caller's.
_INTENT_LUA = (
    "#!lua"
    + _NOW_LUA
    + """
local r = redis.call('HMGET', KEYS[1], 'state', 'claimant')
if r[1] ~= 'claimed' or r[2] ~= ARGV[1] then
  return -1
end
local deadline = now_ms + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'placement_id', ARGV[2], 'host_id', ARGV[3], 'deadline_ms', deadline)
return deadline
"""
)

# KEYS: request. ARGV: claimant, placement id. The claim becomes committed
# (also used to adopt a stale claim whose commit landed). Returns 1, or 0 if
# the record names another claim or placement.
_FINALIZE_LUA = """#!lua
local r = redis.call('HMGET', KEYS[1], 'state', 'claimant', 'placement_id')
if r[3] ~= ARGV[2] then
  return 0
end
if r[1] == 'committed' then
  return 1
end
if r[1] ~= 'claimed' or r[2] ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'committed')
redis.call('HDEL', KEYS[1], 'claimant', 'deadline_ms')
return 1
"""

# KEYS: request. ARGV: expected state, expected claimant, expected placement
# id ('*': any), then optionally new claimant, digest, ttl ms. Deletes the
# record if it is still as expected, and with a new claimant claims it afresh.
# Returns 1, or 0 if the record changed.
_REPLACE_LUA = (
    "#!lua"
    + _NOW_LUA
    + """
local r = redis.call('HMGET', KEYS[1], 'state', 'claimant', 'placement_id')
if (r[1] or '') ~= ARGV[1] or (r[2] or '') ~= ARGV[2] then
  return 0
end
if ARGV[3] ~= '*' and (r[3] or '') ~= ARGV[3] then
  return 0
end
redis.call('DEL', KEYS[1])
if #ARGV > 3 then
  redis.call('HSET', KEYS[1], 'state', 'claimed', 'digest', ARGV[5], 'claimant', ARGV[4],
             'deadline_ms', now_ms + tonumber(ARGV[6]))
end
return 1
"""
)

#: Request records read per pipeline by the housekeeper's sweep.
_SWEEP_PAGE = 500

# KEYS: request. ARGV: placement id. Forgets a released placement's request
# record if it still names that placement. Returns 1 if deleted.
_FORGET_LUA = """#!lua
if redis.call('HGET', KEYS[1], 'placement_id') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS: host, versions, feed, feed-seq. ARGV: reason, by, now ms, keep ('1':
# leave a cordon already there as it is), host id. Returns 0 for an unknown host,
# else 1.
_CORDON_LUA = _with_feed("""#!lua
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local already = redis.call('HGET', KEYS[1], 'cordoned') == '1'
if already and ARGV[4] == '1' then
  return 1
end
redis.call('HSET', KEYS[1], 'cordoned', '1', 'cordon_reason', ARGV[1],
           'cordoned_by', ARGV[2], 'cordoned_ms', ARGV[3])
if not already then
  -- A plan made on a snapshot from before the cordon must not commit here:
  -- it conflicts, and its replan sees the host cordoned.
  local generation = redis.call('HINCRBY', KEYS[1], 'alloc_generation', 1)
  redis.call('HINCRBY', KEYS[2], 'epoch', 1)
  feed_append(KEYS[3], KEYS[4], KEYS[1], ARGV[5], generation)
end
return 1
""")

# KEYS: host, feed, feed-seq. ARGV: host id. Returns 0 for an unknown host,
# else 1.
_UNCORDON_LUA = _with_feed("""#!lua
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if redis.call('HGET', KEYS[1], 'cordoned') == '1' then
  redis.call('HDEL', KEYS[1], 'cordoned', 'cordon_reason', 'cordoned_by', 'cordoned_ms')
  local generation = redis.call('HINCRBY', KEYS[1], 'alloc_generation', 1)
  feed_append(KEYS[2], KEYS[3], KEYS[1], ARGV[1], generation)
end
return 1
""")

# KEYS: every per-host key (schema.all_host_keys): host, alloc, placements,
# placement-slots, placement-requests, placement-states, placement-tenants,
# versions, placement-bumps; then feed, feed-seq. ARGV: force ('1' or '0'),
# host id, heartbeat deadline ('': none; else only a host whose lease is
# marked expired and whose last heartbeat is older goes). Returns {code,
# pairs}: 0 when no key of the host exists; -2 when a deadline was given and
# the host is not that dead; -1 when it holds placements and force is off
# (pairs: placement id, state); 1 when every key is deleted (pairs: placement
# id, request id of each placement dropped with it).
_FORGET_HOST_LUA = _with_feed("""#!lua
local host_keys = {unpack(KEYS, 1, 9)}
local present = false
for i = 1, #host_keys do
  if redis.call('EXISTS', KEYS[i]) == 1 then present = true end
end
if not present then
  return {0, {}}
end
if ARGV[3] ~= '' then
  local r = redis.call('HMGET', KEYS[1], 'lease_expired', 'last_heartbeat_ms')
  if r[1] ~= '1' or tonumber(r[2] or '0') >= tonumber(ARGV[3]) then
    return {-2, {}}
  end
end
local ids = redis.call('HKEYS', KEYS[3])
table.sort(ids)
local found = {}
local busy = #ids > 0 and ARGV[1] ~= '1'
for _, id in ipairs(ids) do
  found[#found + 1] = id
  if busy then
    found[#found + 1] = redis.call('HGET', KEYS[6], id) or ''
  else
    found[#found + 1] = redis.call('HGET', KEYS[5], id) or ''
  end
end
if busy then
  return {-1, found}
end
redis.call('DEL', unpack(host_keys))
feed_append(KEYS[10], KEYS[11], KEYS[1], ARGV[2], -1)
return {1, found}
""")

#: How long a claim lasts without a renewal. Renewed by every commit attempt,
#: which follows the renewal within milliseconds; a caller that stalls longer
#: (a GC pause, a partition) has its commit refused by the host script.
CLAIM_TTL_MS = 10_000

#: Grace past a claim's deadline before another caller may resolve it: the
#: request record and the host may live on different Cluster nodes, whose
#: clocks differ by this much at most (NTP keeps them far closer).
CLAIM_SKEW_MS = 2_000

# A record that keeps changing under resolution (claims racing over an
# expired one) settles within a few rounds; more is a bug.
_CLAIM_ATTEMPTS = 8


#: A client of a single server (or Sentinel's primary) or of a Redis Cluster.
StoreClient = aioredis.Redis | RedisCluster

#: One script of a batch: the script, its keys, its arguments.
_ScriptCall = tuple[AsyncScript, list[str], list[Any]]


class _Script(Protocol):
    """A registered script, run on its own or through a :class:`ScriptBatcher`."""

    def __call__(self, *, keys: Sequence[Any], args: Sequence[Any]) -> Awaitable[Any]:
        """Run it; its reply."""
        ...


#: Scripts a cluster client runs at once, all batches of one process together
#: (see _run_scripts): redis-py's cluster client opens at most 100
#: connections per node and then fails a command instead of waiting.
_CLUSTER_SCRIPT_CONCURRENCY = 32

# One gate per cluster client, shared by every store on it (the coordinator
# and the housekeeper share the scheduler's client).
_CLUSTER_GATES: weakref.WeakKeyDictionary[RedisCluster, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _read_host_keys(host_id: str) -> list[str]:
    return [
        schema.host(host_id),
        schema.alloc(host_id),
        schema.placement_tenants(host_id),
        schema.versions(host_id),
    ]


def _pairs(flat: Sequence[Any]) -> dict[Any, Any]:
    """An HGETALL reply from a script (a flat list) as a mapping."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _host_reply(
    reply: Sequence[Any],
) -> tuple[dict[Any, Any], dict[Any, Any], dict[Any, Any], dict[Any, Any]]:
    fields, allocs, tenants, versions = reply
    return _pairs(fields), _pairs(allocs), _pairs(tenants), _pairs(versions)


def _streams(reply: Any) -> list[tuple[Any, Any]]:
    """An XREAD reply as (key, entries) pairs: RESP2 answers a list, RESP3 a map."""
    if not reply:
        return []
    if isinstance(reply, Mapping):
        return list(reply.items())
    return [(key, entries) for key, entries in reply]


def _fence_args(fence: Fence | None) -> list[str]:
    """The job and token a fenced script takes ("", "" for an unfenced write)."""
    return [fence.job, str(fence.token)] if fence else ["", ""]


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
    versions: Mapping[Any, Any],
) -> HostRecord:
    by_name = {_text(k): v for k, v in fields.items()}
    inventory = by_name.get(schema.F_INVENTORY)
    if inventory is None and schema.F_BOOT_ID not in by_name:
        raise StoreError(f"host record {schema.host(host_id)} has no inventory field")
    return HostRecord(
        host_id=host_id,
        inventory=_bytes(inventory) if inventory is not None else b"",
        agent_address=_text(by_name.get(schema.F_AGENT_ADDRESS)),
        boot_id=_text(by_name.get(schema.F_BOOT_ID)),
        inventory_generation=_int(by_name.get(schema.F_INVENTORY_GENERATION)),
        last_heartbeat_ms=_int(by_name.get(schema.F_LAST_HEARTBEAT_MS)),
        alloc_generation=_int(by_name.get(schema.F_ALLOC_GENERATION)),
        allocations={_text(k): _text(v) for k, v in allocs.items()},
        tenants={_text(k): _text(v) for k, v in tenants.items()},
        fences={
            name[len(schema.F_FENCE_PREFIX) :]: _int(value)
            for name, value in by_name.items()
            if name.startswith(schema.F_FENCE_PREFIX)
        },
        cordoned=_text(by_name.get(schema.F_CORDONED)) == "1",
        cordon_reason=_text(by_name.get(schema.F_CORDON_REASON)),
        cordoned_by=_text(by_name.get(schema.F_CORDONED_BY)),
        cordoned_ms=_int(by_name.get(schema.F_CORDONED_MS)),
        lease_expired=_text(by_name.get(schema.F_LEASE_EXPIRED)) == "1",
        versions={_text(k): _int(v) for k, v in versions.items()},
    )


class RedisStateStore:
    """Tessera's state in a Redis-protocol server.

    Every method raises ``ValueError`` for an empty host, placement or
    request id, and for a host id containing ``{`` or ``}`` (it would move
    the key's hash tag). Redis errors (connection lost, OOM) propagate as
    ``redis.exceptions.RedisError``; a script either ran whole or not at all.

    Args:
        client: an asyncio client, of one server or of a Redis Cluster,
            created with ``decode_responses=False`` (payloads are bytes).
        claim_ttl_ms: how long a request claim lasts without renewal.
        claim_skew_ms: grace past a claim's deadline before another caller
            may resolve it.
    """

    def __init__(
        self,
        client: StoreClient,
        *,
        claim_ttl_ms: int = CLAIM_TTL_MS,
        claim_skew_ms: int = CLAIM_SKEW_MS,
    ) -> None:
        self._client = client
        self._claim_ttl_ms = claim_ttl_ms
        self._claim_skew_ms = claim_skew_ms
        # register_script runs EVALSHA and loads the script on NOSCRIPT (a
        # restarted server, or a fresh one, has an empty script cache).
        # The scripts every Place and Release runs go through a batcher on a
        # plain client: calls of one event-loop turn share a pipeline. A
        # cluster client refuses scripts in a pipeline; there they go alone.
        batcher = None if isinstance(client, RedisCluster) else ScriptBatcher(client)
        # The reads that go with them too (a cluster client routes each alone).
        self._read: Callable[..., Awaitable[Any]] = (
            client.execute_command if batcher is None else batcher.command
        )

        def hot(source: str) -> _Script:
            script = client.register_script(source)
            return script if batcher is None else partial(batcher.run, script)

        self._commit = client.register_script(_COMMIT_LUA)
        self._claimed_commit = hot(_claimed_commit(_COMMIT_LUA))
        self._upsert = client.register_script(_UPSERT_HOST_LUA)
        self._touch = client.register_script(_TOUCH_HOST_LUA)
        self._update = hot(_UPDATE_PLACEMENT_LUA)
        self._release = hot(_RELEASE_LUA)
        self._lease = client.register_script(_LEASE_LUA)
        self._yield_lease = client.register_script(_YIELD_LEASE_LUA)
        self._raise_fence = client.register_script(_RAISE_FENCE_LUA)
        self._read_host = client.register_script(_READ_HOST_LUA)
        self._claim = hot(_CLAIM_LUA)
        self._intent = client.register_script(_INTENT_LUA)
        self._finalize = client.register_script(_FINALIZE_LUA)
        self._replace = client.register_script(_REPLACE_LUA)
        self._forget = client.register_script(_FORGET_LUA)
        # The same script as every Release's second step: batched with the rest.
        self._forget_released = hot(_FORGET_LUA)
        self._cordon = client.register_script(_CORDON_LUA)
        self._uncordon = client.register_script(_UNCORDON_LUA)
        self._forget_host = client.register_script(_FORGET_HOST_LUA)
        self._expire_host = client.register_script(_EXPIRE_HOST_LUA)
        self._feed_head = client.register_script(_FEED_HEAD_LUA)
        # Whether the server runs in cluster mode (read once): a multi-key
        # XREAD over every shard's feed is one command on a plain server,
        # one per shard where shards live in different slots.
        self._cluster_mode: bool | None = None

    async def _in_cluster(self) -> bool:
        """Whether the server runs in cluster mode (asked once)."""
        if self._cluster_mode is None:
            if isinstance(self._client, RedisCluster):
                self._cluster_mode = True
            else:
                info = await self._client.info("cluster")
                self._cluster_mode = bool(int(info.get("cluster_enabled", 0) or 0))
        return self._cluster_mode

    async def _run_scripts(self, calls: Sequence[_ScriptCall]) -> list[Any]:
        """Run many scripts, each on its own keys, in one round trip where the client can.

        A plain client pipelines them. A cluster client refuses scripts in a
        pipeline: they run side by side instead, a bounded number at a time
        (each node gets its own connections).
        """
        if not calls:
            return []
        if not isinstance(self._client, RedisCluster):
            async with self._client.pipeline(transaction=False) as pipe:
                for script, keys, args in calls:
                    await script(keys=keys, args=args, client=pipe)
                return list(await pipe.execute())
        gate = _CLUSTER_GATES.setdefault(
            self._client, asyncio.Semaphore(_CLUSTER_SCRIPT_CONCURRENCY)
        )

        async def one(call: _ScriptCall) -> Any:
            script, keys, args = call
            async with gate:
                return await script(keys=keys, args=args)

        return list(await asyncio.gather(*(one(c) for c in calls)))

    async def claim_layout(self) -> None:
        """Make sure the store is in this scheduler's key layout, marking an empty one.

        Raises:
            LayoutMismatchError: the store holds another layout's marker, or
                hosts written before layout markers existed.
        """
        found = _text(await self._client.get(schema.LAYOUT))
        if not found:
            # Hosts, yet no marker: an older scheduler wrote them. Checked
            # before marking, and the marker is never taken back, so replicas
            # starting together cannot mark an old store for each other.
            if await self._client.scard(schema.HOSTS):
                raise LayoutMismatchError(
                    "the store holds hosts written by a Tessera from before layout markers "
                    f"(this scheduler writes key layout {schema.LAYOUT_VERSION!r}): drain and "
                    "forget them with that version, or start on an empty store"
                )
            await self._client.set(schema.LAYOUT, schema.LAYOUT_VERSION, nx=True)
            found = _text(await self._client.get(schema.LAYOUT))
        if found != schema.LAYOUT_VERSION:
            raise LayoutMismatchError(
                f"the store is in key layout {found!r}, this scheduler writes layout "
                f"{schema.LAYOUT_VERSION!r}: run the matching version on it"
            )

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
        result = int(
            await self._upsert(
                keys=[schema.host(host_id), schema.versions(host_id), *schema.feed_keys(host_id)],
                args=[inventory, inventory_generation, boot_id, agent_address, now_ms, host_id],
            )
        )
        if result == 2:
            # A new record: a forget_host racing this registration may have
            # removed the index entry after the first SADD (its SREM follows
            # its delete); index it again, after the record exists.
            await self._client.sadd(schema.HOSTS, host_id)
        return bool(result)

    async def touch_host(self, host_id: str, boot_id: str, now_ms: int) -> HeartbeatOutcome:
        """Heartbeat: renew a host's lease.

        Args:
            host_id: the host.
            boot_id: the boot the agent is running in.
            now_ms: scheduler clock.

        Returns:
            What it did: false (``UNKNOWN``) if the host is unknown or
            registered with another boot (the agent must register again),
            ``REVIVED`` if it renewed a lease that had expired.
        """
        _check_host_id(host_id)
        return HeartbeatOutcome(
            int(
                await self._touch(
                    keys=[schema.host(host_id), *schema.feed_keys(host_id)],
                    args=[boot_id, now_ms, host_id],
                )
            )
        )

    async def cordon_host(
        self, host_id: str, *, reason: str, by: str, now_ms: int, keep: bool = False
    ) -> bool:
        """Take a host out of scheduling: snapshots show it cordoned.

        The cordon is written in the host's own hash, which registration and
        heartbeats leave alone, so only :meth:`uncordon_host` clears it. The
        first cordon bumps the alloc generation: a plan made before it cannot
        commit any more. Placements already on the host are untouched.

        Args:
            host_id: the host.
            reason: why, as operators will read it.
            by: who asked.
            now_ms: scheduler clock, recorded as when.
            keep: leave an existing cordon (its reason, who and when) as it is.

        Returns:
            False if the host is not registered (nothing is written).
        """
        _check_host_id(host_id)
        keep_arg = "1" if keep else "0"
        return bool(
            await self._cordon(
                keys=[schema.host(host_id), schema.versions(host_id), *schema.feed_keys(host_id)],
                args=[reason, by, now_ms, keep_arg, host_id],
            )
        )

    async def uncordon_host(self, host_id: str) -> bool:
        """Let new placements land on a host again (idempotent).

        Returns:
            False if the host is not registered.
        """
        _check_host_id(host_id)
        return bool(
            await self._uncordon(
                keys=[schema.host(host_id), *schema.feed_keys(host_id)], args=[host_id]
            )
        )

    async def forget_host(
        self, host_id: str, *, force: bool = False, silent_before_ms: int | None = None
    ) -> ForgetResult:
        """Remove a host and every key of it, if it holds no placement.

        One script on the host's slot checks the host's placements and
        deletes every per-host key (:func:`scheduler.store.schema.all_host_keys`);
        with ``force`` its placements go too. With ``silent_before_ms`` the
        same script first checks that the host is dead: its lease marked
        expired and its last heartbeat older than that, so a host whose
        agent came back meanwhile stays. The request record of each
        dropped placement is then forgotten, one command per record (each is
        its own slot), if it still names that placement; a crash before leaves
        records that name a placement that is gone, which claims treat as free.
        Last, the id leaves the host index. Nothing is torn down on the host.

        Args:
            host_id: the host.
            force: drop its placements (in any state) with it.
            silent_before_ms: forget it only if its lease is marked expired
                and its last heartbeat is older than this (scheduler clock);
                None: whatever its lease.

        Returns:
            FORGOTTEN with the dropped placements, NOT_FOUND, ALIVE, or BUSY
            with the placements that keep it (nothing is written).
        """
        _check_host_id(host_id)
        deadline = "" if silent_before_ms is None else str(int(silent_before_ms))
        code, flat = await self._forget_host(
            keys=[*schema.all_host_keys(host_id), *schema.feed_keys(host_id)],
            args=["1" if force else "0", host_id, deadline],
        )
        placements = {_text(k): _text(v) for k, v in _pairs(flat).items()}
        if int(code) == 0:
            return ForgetResult(ForgetOutcome.NOT_FOUND)
        if int(code) == -2:
            return ForgetResult(ForgetOutcome.ALIVE)
        if int(code) == -1:
            return ForgetResult(ForgetOutcome.BUSY, placements)
        await self._run_scripts(
            [
                (self._forget, [schema.request(request_id)], [placement_id])
                for placement_id, request_id in placements.items()
                if request_id
            ]
        )
        await self._client.srem(schema.HOSTS, host_id)
        if await self._client.exists(schema.host(host_id)):
            # Its agent registered it again meanwhile, before the SREM: keep
            # the index a superset of the records (see upsert_host).
            await self._client.sadd(schema.HOSTS, host_id)
        return ForgetResult(ForgetOutcome.FORGOTTEN, placements)

    async def host_ids(self) -> list[str]:
        """The id of every registered host, sorted (a page of ListHosts reads only its own)."""
        return sorted(_text(h) for h in await self._client.smembers(schema.HOSTS))

    async def get_host(self, host_id: str) -> HostRecord | None:
        """One host with its allocations, read atomically.

        Args:
            host_id: the host.

        Returns:
            The record, or None if the host is not registered.
        """
        _check_host_id(host_id)
        fields, allocs, tenants, versions = _host_reply(
            await self._read_host(keys=_read_host_keys(host_id))
        )
        if not fields:
            return None
        return _record(host_id, fields, allocs, tenants, versions)

    async def agent_address(self, host_id: str) -> str | None:
        """Where a host's agent listens, or None if the host is not registered.

        One field, for callers that reach the agent and need nothing else of
        the host (a Release): the whole record carries the inventory.
        """
        _check_host_id(host_id)
        found = await self._client.hget(schema.host(host_id), schema.F_AGENT_ADDRESS)
        return None if found is None else _text(found)

    @property
    def primary(self) -> tuple[str, int] | None:
        """The server a Sentinel-managed client last learnt is the primary (None: not one).

        Read without a round trip: the client's pool asks the Sentinels as its
        connections open and every health probe. A different answer from one
        read to the next means a failover happened in between, and may have
        lost writes the old primary acknowledged.
        """
        pool = sentinel_pool(self._client)
        if pool is None:
            return None
        address = pool.master_address
        return (str(address[0]), int(address[1])) if address else None

    async def snapshot(
        self, known: Mapping[str, tuple[str, int]] | None = None, *, inventories: bool = True
    ) -> StoreSnapshot:
        """Every registered host with its allocations.

        Each host is read atomically (one read-only script over its slot);
        hosts are not read at one instant, which the scheduler does not need:
        a plan names the generation it saw of its one host.

        Args:
            known: host -> (boot id, inventory generation) whose inventory
                the caller holds already: those records come with an empty
                ``inventory`` (the caller's copy is current).
            inventories: False leaves every inventory out (for callers that
                only need allocations and liveness).

        Returns:
            The snapshot.
        """
        host_ids = sorted(_text(h) for h in await self._client.smembers(schema.HOSTS))
        found = await self.read_hosts(host_ids, known, inventories=inventories)
        return StoreSnapshot(hosts={h: r for h, r in found.items() if r is not None})

    async def read_hosts(
        self,
        host_ids: Sequence[str],
        known: Mapping[str, tuple[str, int]] | None = None,
        *,
        inventories: bool = True,
    ) -> dict[str, HostRecord | None]:
        """Some hosts with their allocations, each read atomically, in one pipeline.

        Args:
            host_ids: the hosts.
            known: host -> (boot id, inventory generation) whose inventory
                the caller holds already (left out of those records).
            inventories: False leaves every inventory out.

        Returns:
            host id -> record, or None for a host that is not registered.
        """
        if not host_ids:
            return {}
        known = known or {}
        calls: list[_ScriptCall] = []
        for host_id in host_ids:
            _check_host_id(host_id)
            if not inventories:
                held = ["*", ""]
            elif host_id in known:
                boot_id, generation = known[host_id]
                held = [boot_id, str(generation)]
            else:
                held = ["", ""]
            calls.append((self._read_host, _read_host_keys(host_id), held))
        replies = await self._run_scripts(calls)
        hosts: dict[str, HostRecord | None] = {}
        for host_id, reply in zip(host_ids, replies, strict=True):
            fields, allocs, tenants, versions = _host_reply(reply)
            hosts[host_id] = _record(host_id, fields, allocs, tenants, versions) if fields else None
        return hosts

    async def expire_host(self, host_id: str, heartbeat_before_ms: int) -> bool:
        """Mark a host's lease expired if its last heartbeat is older than a deadline.

        The expiry bumps the alloc generation (a plan made while the host was
        alive does not commit) and goes on the feed; the next heartbeat or
        registration brings the host back.

        Args:
            host_id: the host.
            heartbeat_before_ms: the deadline, scheduler clock.

        Returns:
            True if the lease expired now (False: renewed since, expired
            already, or no such host).
        """
        _check_host_id(host_id)
        return bool(
            await self._expire_host(
                keys=[schema.host(host_id), schema.versions(host_id), *schema.feed_keys(host_id)],
                args=[host_id, heartbeat_before_ms],
            )
        )

    # -- the change feed ---------------------------------------------------------

    async def feed_heads(self) -> list[FeedCursor]:
        """Every shard's feed as it ends now: where a reader that has read everything stands.

        Read before a full read of the hosts, these cursors make the feed
        replay whatever changed during that read.
        """
        replies = await self._run_scripts(
            [
                (self._feed_head, [schema.feed(shard), schema.feed_seq(shard)], [])
                for shard in range(schema.FEED_SHARDS)
            ]
        )
        return [
            FeedCursor(shard, _text(entry_id), int(seq))
            for shard, (seq, entry_id) in enumerate(replies)
        ]

    async def read_feed(
        self, cursors: Sequence[FeedCursor], count: int
    ) -> dict[int, list[FeedEntry]]:
        """The entries after each cursor, at most ``count`` per shard.

        Args:
            cursors: one per shard to read.
            count: the most entries to return per shard.

        Returns:
            shard -> its entries in order (shards with none are left out).
        """
        streams = {schema.feed(c.shard): c.entry_id for c in cursors}
        shard_of_key = {schema.feed(c.shard): c.shard for c in cursors}
        if await self._in_cluster():
            async with self._client.pipeline(transaction=False) as pipe:
                for key, entry_id in streams.items():
                    pipe.xread({key: entry_id}, count=count)
                replies = await pipe.execute()
            found = [stream for reply in replies for stream in _streams(reply)]
        else:
            # Through the batcher: a replica under load follows the feed
            # before each plan, beside the scripts of other calls.
            found = _streams(
                await self._read("XREAD", "COUNT", count, "STREAMS", *streams, *streams.values())
            )
        out: dict[int, list[FeedEntry]] = {}
        for key, entries in found:
            shard = shard_of_key[_text(key)]
            out[shard] = [
                FeedEntry(
                    shard,
                    _text(entry_id),
                    _int(fields.get(schema.F_FEED_SEQ.encode())),
                    _text(fields.get(schema.F_FEED_HOST.encode())),
                    int(_text(fields.get(schema.F_FEED_GENERATION.encode())) or -1),
                    int(_text(fields.get(schema.F_FEED_INCARNATION.encode())) or 0),
                )
                for entry_id, fields in entries
            ]
        return out

    # -- requests --------------------------------------------------------------

    async def claim_request(self, request_id: str, digest: str, claimant: str) -> RequestClaim:
        """Step 1 of a reservation: take the request id for this call.

        A claim past its deadline (plus the skew margin) is resolved here: if
        its commit landed (the host holds the placement it named) the record
        is finalized and the answer is DUPLICATE; otherwise the caller takes
        the claim over. A committed record whose placement is gone (released,
        and the release did not get to forget the record) is free again.

        Args:
            request_id: the client's idempotency key.
            digest: digest of the request, recorded for a new claim.
            claimant: this call's unique name (re-claiming renews it).

        Returns:
            CLAIMED, DUPLICATE or BUSY, with the record's digest.
        """
        _check_id("request_id", request_id)
        _check_id("claimant", claimant)
        key = schema.request(request_id)
        fresh: list[str | int] = [claimant, digest, self._claim_ttl_ms]
        for _ in range(_CLAIM_ATTEMPTS):
            reply = await self._claim(
                keys=[key], args=[claimant, digest, self._claim_ttl_ms, self._claim_skew_ms]
            )
            verdict, stored_digest, holder, placement_id, host_id = (_text(x) for x in reply)
            if verdict == "CLAIMED":
                return RequestClaim(ClaimOutcome.CLAIMED, stored_digest)
            if verdict == "BUSY":
                return RequestClaim(ClaimOutcome.BUSY, stored_digest, placement_id)
            if verdict == "STALE":
                landed, settled = await self._settle(
                    request_id, holder, placement_id, host_id, successor=fresh
                )
                if settled:
                    if landed:
                        return RequestClaim(ClaimOutcome.DUPLICATE, stored_digest, placement_id)
                    return RequestClaim(ClaimOutcome.CLAIMED, digest)
                continue
            # COMMITTED: the answer, unless its placement is gone since.
            if bool(placement_id) and await self._holds(host_id, placement_id, request_id):
                return RequestClaim(ClaimOutcome.DUPLICATE, stored_digest, placement_id)
            if await self._replace(keys=[key], args=[schema.COMMITTED, "", placement_id, *fresh]):
                return RequestClaim(ClaimOutcome.CLAIMED, digest)
        raise StoreError(f"the record of request {request_id} kept changing under its claim; retry")

    async def abandon_claim(self, request_id: str, claimant: str) -> bool:
        """Drop this call's claim after every commit attempt failed for certain.

        Only after definite outcomes (CONFLICT, EXPIRED, no capacity): after
        an error the commit may have landed, and the claim must stay for the
        next caller or the housekeeper to resolve.

        Returns:
            Whether the claim was this caller's and is gone.
        """
        _check_id("request_id", request_id)
        return bool(
            await self._replace(
                keys=[schema.request(request_id)], args=[schema.CLAIMED, claimant, "*"]
            )
        )

    async def sweep_request_records(self) -> RecordSweep:
        """Settle what the request protocol left behind (the housekeeper's sweep).

        A claim past its deadline whose commit landed is finalized (the
        reaper then deals with the placement like any other); one whose
        commit never landed is deleted. A committed record whose placement
        its host no longer holds is forgotten: its release freed the host
        and then lost the store before it could forget the record (the
        record lives in another slot), and a release sent again finds no
        placement to name it by. Such a record is free already (see
        :meth:`claim_request`); left alone, records of every such release
        would pile up. Live claims and records of held placements are left
        alone.

        Returns:
            What was settled.
        """
        seconds, micros = await self._client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        resolved = forgotten = 0
        fields = [
            schema.F_STATE,
            schema.F_CLAIMANT,
            schema.F_DEADLINE_MS,
            schema.F_PLACEMENT_ID,
            schema.F_HOST_ID,
        ]
        page: list[str] = []
        async for raw in self._client.scan_iter(match=schema.request("*"), count=1000):
            page.append(_text(raw))
            if len(page) < _SWEEP_PAGE:
                continue
            found = await self._sweep_page(page, fields, now_ms)
            resolved, forgotten = resolved + found[0], forgotten + found[1]
            page = []
        if page:
            found = await self._sweep_page(page, fields, now_ms)
            resolved, forgotten = resolved + found[0], forgotten + found[1]
        return RecordSweep(claims_resolved=resolved, records_forgotten=forgotten)

    async def _sweep_page(
        self, keys: Sequence[str], fields: Sequence[str], now_ms: int
    ) -> tuple[int, int]:
        """Settle one page of request records; how many claims resolved, records forgotten.

        The records are read in one pipeline, and the hosts' answers for the
        committed ones in another: two round trips a page, not two a record.
        """
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, fields)
            rows = [[_text(x) for x in row] for row in await pipe.execute()]
        committed = [
            (key, row) for key, row in zip(keys, rows, strict=True) if row[0] == schema.COMMITTED
        ]
        held: list[Any] = []
        if committed:
            async with self._client.pipeline(transaction=False) as pipe:
                for _, row in committed:
                    if row[4]:
                        pipe.hget(schema.placement_requests(row[4]), row[3])
                answers = iter(await pipe.execute())
            held = [next(answers) if row[4] else None for _, row in committed]
        resolved = forgotten = 0
        prefix = len(schema.request(""))
        for (key, row), made_for in zip(committed, held, strict=True):
            # Placement ids are never reused and a record is committed only
            # once its commit landed: a placement gone from its host was
            # released, and cannot come back. The script deletes only a
            # record that still names it.
            if _text(made_for) != key[prefix:]:
                forgotten += int(await self._forget_released(keys=[key], args=[row[3]]))

        def stale(state: str, deadline: str) -> bool:
            return state == schema.CLAIMED and _int(deadline) + self._claim_skew_ms < now_ms

        for key, row in zip(keys, rows, strict=True):
            if not stale(row[0], row[2]):
                continue
            # Read again: the page was read a while ago, and a claimant may
            # have renewed its claim since (the settle script checks the
            # claimant, not the deadline).
            state, holder, deadline, placement_id, host_id = (
                _text(x) for x in await self._client.hmget(key, fields)
            )
            if not stale(state, deadline):
                continue
            _, settled = await self._settle(key[prefix:], holder, placement_id, host_id)
            resolved += int(settled)
        return resolved, forgotten

    async def _settle(
        self,
        request_id: str,
        holder: str,
        placement_id: str,
        host_id: str,
        *,
        successor: Sequence[str | int] = (),
    ) -> tuple[bool, bool]:
        """Settle a claim past its deadline: no commit of it can land any more.

        If its commit landed (the host holds the placement it named), the
        record is finalized; otherwise it is dropped, or handed to
        ``successor`` (claimant, digest, ttl) as a fresh claim.

        Returns:
            Whether its commit had landed, and whether the record was settled
            (False: it changed meanwhile, read it again).
        """
        key = schema.request(request_id)
        if placement_id and await self._holds(host_id, placement_id, request_id):
            return True, bool(await self._finalize(keys=[key], args=[holder, placement_id]))
        replaced = await self._replace(
            keys=[key], args=[schema.CLAIMED, holder, placement_id, *successor]
        )
        return False, bool(replaced)

    async def _holds(self, host_id: str, placement_id: str, request_id: str) -> bool:
        """Whether a host holds a placement made for this request."""
        if not host_id:
            return False
        made_for = await self._read("HGET", schema.placement_requests(host_id), placement_id)
        return _text(made_for) == request_id

    # -- reservations ----------------------------------------------------------

    async def commit_reservation(
        self,
        *,
        host_id: str,
        guards: Mapping[str, int],
        bumps: Sequence[str],
        slots: Sequence[str],
        placement_id: str,
        placement: bytes,
        request_id: str,
        claimant: str,
        tenant: str = "",
    ) -> CommitResult:
        """Steps 2 and 3 of a reservation: commit on the host, finalize the request.

        The request record first names the placement about to be committed
        (renewing the claim's deadline; LOST if the claim is no longer this
        caller's). One script on the host then checks, in order: the deadline
        has not passed (EXPIRED), the host is registered, every guard is at
        the version the plan saw, the placement id is unused and every slot
        is free (else CONFLICT); only then does it write the slot owners and
        the placement, bump the versions of ``bumps`` (and of ``tenants`` for
        a tenant new to the host) and the alloc generation, and put the host
        on the change feed. Finally the request record becomes committed.
        On a plain server the three steps are one script (one round trip,
        nothing between them); on a cluster the request record and the host
        live in different slots, and they are three.

        Args:
            host_id: the host the plan chose.
            guards: guard key -> the version the plan saw
                (:func:`scheduler.core.guards.guards`).
            bumps: the keys the commit changes (:func:`scheduler.core.guards.changed_by`);
                the release bumps them again.
            slots: slot keys the placement takes.
            placement_id: the new placement's id, naming the host
                (:func:`scheduler.store.schema.placement_id`).
            placement: serialized ``Placement``.
            request_id: the client's idempotency key, claimed by ``claimant``.
            claimant: the caller's claim (:meth:`claim_request`).
            tenant: the placement's tenant, recorded beside it for snapshots.

        Returns:
            What happened, and why.

        Raises:
            ValueError: an empty id, slot or guard key, or a placement id not
                naming the host.
            StoreError: the request record changed under a landed commit.
        """
        _check_host_id(host_id)
        _check_id("placement_id", placement_id)
        _check_id("request_id", request_id)
        if schema.host_of_placement(placement_id) != host_id:
            raise ValueError(f"placement_id {placement_id!r} does not name host {host_id!r}")
        for what in (*slots, *guards, *bumps):
            if not what:
                raise ValueError("slot and guard keys must not be empty")
        request_key = schema.request(request_id)
        guard_args: list[str | int] = [len(guards)]
        for key, version in sorted(guards.items()):
            guard_args += [key, str(version)]
        commit_keys = [*schema.all_host_keys(host_id), *schema.feed_keys(host_id)]
        commit_args = [
            placement_id,
            placement,
            request_id,
            host_id,
            tenant,
            0,  # the claim's deadline, set below
            *guard_args,
            len(bumps),
            *bumps,
            *slots,
        ]
        if not await self._in_cluster():
            reply = await self._claimed_commit(
                keys=[request_key, *commit_keys],
                args=[claimant, self._claim_ttl_ms, *commit_args],
            )
            return _commit_result(reply)
        # A cluster keeps the request record and the host in different
        # slots: intent, commit and finalization are three steps.
        deadline = int(
            await self._intent(
                keys=[request_key],
                args=[claimant, placement_id, host_id, self._claim_ttl_ms],
            )
        )
        if deadline < 0:
            return CommitResult(
                CommitOutcome.LOST,
                placement_id,
                f"the claim on request {request_id} is no longer this call's",
            )
        commit_args[5] = deadline
        result = _commit_result(await self._commit(keys=commit_keys, args=commit_args))
        if result.outcome is CommitOutcome.COMMITTED and not await self._finalize(
            keys=[request_key], args=[claimant, placement_id]
        ):
            # Only a release of the new placement (an operator, the reaper)
            # can have removed the record this fast; the placement is theirs.
            raise StoreError(
                f"request {request_id} changed while placement {placement_id} was committed"
            )
        return result

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
        result = int(
            await self._update(
                keys=[
                    schema.placements(host_id),
                    schema.placement_states(host_id),
                    schema.host(host_id),
                ],
                args=[placement_id, placement, state, *_fence_args(fence), *from_states],
            )
        )
        if result == -3:
            raise FencedOutError(f"fencing token {fence} is stale on host {host_id}")
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
        request: str = "",
    ) -> int:
        """Atomically free a placement's slots and forget it.

        Frees only the slots the placement still owns, deletes the placement
        and bumps the host's alloc generation (one script on the host); then
        forgets the request record if it still names this placement.

        Args:
            host_id: the placement's host.
            placement_id: the placement.
            from_states: release only from these states; empty allows any.
            fence: a background job's term; the release is refused once a
                newer term began.
            request: the placement's request id as the store names it
                (:func:`schema.tenant_request`), when the caller knows it:
                should the placement be gone already (this very release
                ran before and its reply was lost, so the call was sent
                again), a request record still naming it is forgotten.

        Returns:
            The host's alloc generation after the release (-1 when the host
            record is gone); 0 if there was no such placement on that host,
            or it was in another state (nothing is written).

        Raises:
            FencedOutError: ``fence`` is stale.
        """
        _check_host_id(host_id)
        _check_id("placement_id", placement_id)
        code, request_id, generation = await self._release(
            keys=[*schema.all_host_keys(host_id), *schema.feed_keys(host_id)],
            args=[placement_id, *_fence_args(fence), host_id, *from_states],
        )
        if int(code) == -3:
            raise FencedOutError(f"fencing token {fence} is stale on host {host_id}")
        if int(code) == 0 and request:
            await self._forget_released(keys=[schema.request(request)], args=[placement_id])
        if int(code) != 1:
            return 0
        if _text(request_id):
            # A crash before this line leaves a record naming a placement that
            # is gone: claim_request treats it as free.
            await self._forget_released(
                keys=[schema.request(_text(request_id))], args=[placement_id]
            )
        return int(generation) or -1

    # -- lookups ---------------------------------------------------------------

    async def get_placement(self, placement_id: str) -> tuple[str, bytes] | None:
        """A placement by id (the id names its host).

        Args:
            placement_id: the placement.

        Returns:
            ``(host_id, payload)``, or None if there is none.
        """
        host_id = schema.host_of_placement(placement_id)
        if not host_id or "{" in host_id or "}" in host_id:
            return None
        payload = await self._read("HGET", schema.placements(host_id), placement_id)
        if payload is None:
            return None
        return host_id, _bytes(payload)

    async def placement_for_request(self, request_id: str) -> tuple[str, str] | None:
        """The placement a request id made, once its commit landed.

        Args:
            request_id: the client's idempotency key.

        Returns:
            ``(placement_id, request_digest)``, or None if the id made no
            placement that still exists.
        """
        if not request_id:
            return None
        placement_id, host_id, digest = (
            _text(x)
            for x in await self._read(
                "HMGET",
                schema.request(request_id),
                schema.F_PLACEMENT_ID,
                schema.F_HOST_ID,
                schema.F_DIGEST,
            )
        )
        if not placement_id or not await self._holds(host_id, placement_id, request_id):
            return None
        return placement_id, digest

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

    async def current_fence(self, job: str) -> int:
        """The newest fencing token issued for ``job`` (0 before its first lease)."""
        raw = await self._client.get(schema.fence(job))
        return int(raw) if raw else 0

    async def raise_fences(self, host_ids: Sequence[str], fence: Fence) -> None:
        """Record a new term's token on hosts, before the term acts on them.

        Fenced writes are checked against the highest token their host has
        seen, so a new leader raises it everywhere first: from then on the
        deposed leader's writes are refused on every host, as if the check
        read the global fence.

        Raises:
            FencedOutError: a host has seen a newer term.
        """
        for host_id in host_ids:
            _check_host_id(host_id)
        replies = await self._run_scripts(
            [(self._raise_fence, [schema.host(h)], [fence.job, fence.token]) for h in host_ids]
        )
        stale = [h for h, ok in zip(host_ids, replies, strict=True) if not int(ok)]
        if stale:
            raise FencedOutError(f"fencing token {fence} is stale on hosts {stale[:5]}")

    async def list_placements(
        self, host_id: str | None = None, *, among: Sequence[str] | None = None
    ) -> list[tuple[str, bytes]]:
        """Placements of one host, of some hosts or of all hosts, ordered by placement id.

        Args:
            host_id: one host, or None for the hosts of ``among``.
            among: the hosts to read (a caller that knows which hold
                placements); None with no ``host_id``: every host.

        Returns:
            ``(host_id, payload)`` pairs.
        """
        if host_id is not None:
            _check_host_id(host_id)
            host_ids = [host_id]
        elif among is not None:
            for h in among:
                _check_host_id(h)
            host_ids = sorted(among)
        else:
            host_ids = await self.host_ids()
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
