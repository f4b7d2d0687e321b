#!lua
--[[
Atomically commit one reservation on one host (Tessera's plan applier).

Every key is the host's or its shard's (hash tag {sNN} of the host's shard):
the commit stays in one hash slot. feed_append (prepended by redis_store.py)
puts the change on the shard's feed in the same atomic step.
The request id's idempotency lives in its own record, claimed before this
script runs (see schema.py); this script refuses to write once the claim's
deadline has passed, so a caller that finds the claim expired knows no
commit of it can still land.

The shebang line makes the server treat this as a script that writes: it is
refused up front under OOM instead of failing half way through its writes.
Every check happens before the first write, so the commit is all or nothing.

KEYS[1]  tessera:{sNN}:H:host                 host hash (alloc_generation field)
KEYS[2]  tessera:{sNN}:H:alloc                slot -> placement id
KEYS[3]  tessera:{sNN}:H:placements           placement id -> payload
KEYS[4]  tessera:{sNN}:H:placement-slots      placement id -> JSON array of slots
KEYS[5]  tessera:{sNN}:H:placement-requests   placement id -> request id
KEYS[6]  tessera:{sNN}:H:placement-states     placement id -> lifecycle state
KEYS[7]  tessera:{sNN}:H:placement-tenants    placement id -> tenant
KEYS[8]  tessera:{sNN}:H:versions             guard key -> version
KEYS[9]  tessera:{sNN}:H:placement-bumps      placement id -> JSON array of bumped keys
KEYS[10] tessera:{sNN}:feed                   the shard's change feed (stream)
KEYS[11] tessera:{sNN}:feed-seq               the feed's sequence counter

ARGV[1]  placement id
ARGV[2]  placement payload (opaque bytes)
ARGV[3]  request id
ARGV[4]  host id
ARGV[5]  tenant
ARGV[6]  claim deadline, server time in ms
ARGV[7]  G, the number of guards; then G pairs: guard key, expected version
         (what the plan saw: the devices it touches, the host's epoch and
         exclusive holds, its tenants for an exclusive plan; see
         scheduler/core/guards.py)
then     B, the number of keys the commit bumps; then B keys (the devices it
         takes slots of; "exclusive" for an exclusive hold). "tenants" is
         bumped here when the tenant is new to the host.
then     the slot keys

Returns {outcome, placement_id, detail, alloc generation after} with outcome
one of COMMITTED, CONFLICT, EXPIRED (generation 0 unless COMMITTED). A call sent
again after it landed (its reply lost) answers COMMITTED again.
]]

local host_key, alloc_key, placements_key = KEYS[1], KEYS[2], KEYS[3]
local slots_key, requests_key, states_key, tenants_key = KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local versions_key, bumps_key = KEYS[8], KEYS[9]
local placement_id, payload = ARGV[1], ARGV[2]
local request_id, host_id, tenant = ARGV[3], ARGV[4], ARGV[5]
local deadline = tonumber(ARGV[6])

-- This very commit ran already: a client whose connection failed before the
-- reply came sends it again (on a cluster, where this script runs on its
-- own). Placement ids are made afresh for each commit call, so one recorded
-- for this request can only be this call's: answer as it did, with the
-- host's generation now. Checked first, since what it wrote (versions bumped,
-- slots taken) would fail every check below.
if redis.call('HGET', requests_key, placement_id) == request_id then
  local generation = redis.call('HGET', host_key, 'alloc_generation') or '0'
  return {'COMMITTED', placement_id, 'committed already (the call was repeated)',
          tonumber(generation)}
end

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if now_ms > deadline then
  return {'EXPIRED', placement_id,
          'the claim on request ' .. request_id .. ' expired ' .. (now_ms - deadline) ..
          ' ms before the commit reached host ' .. host_id, 0}
end

if redis.call('EXISTS', host_key) == 0 then
  return {'CONFLICT', placement_id, 'host ' .. host_id .. ' is not registered', 0}
end

local at = 7
local n_guards = tonumber(ARGV[at])
for i = 1, n_guards do
  local key, expected = ARGV[at + 2 * i - 1], ARGV[at + 2 * i]
  local version = redis.call('HGET', versions_key, key) or '0'
  if version ~= expected then
    return {'CONFLICT', placement_id,
            key .. ' of host ' .. host_id .. ' is at version ' .. version ..
            ', the plan saw ' .. expected, 0}
  end
end
at = at + 2 * n_guards + 1
local n_bumps = tonumber(ARGV[at])
local bumps = {}
for i = 1, n_bumps do
  bumps[#bumps + 1] = ARGV[at + i]
end
at = at + n_bumps + 1

-- Placement ids are chosen by the caller: never overwrite one.
if redis.call('HEXISTS', placements_key, placement_id) == 1 then
  return {'CONFLICT', placement_id, 'placement id ' .. placement_id .. ' is already in use', 0}
end

local slots = {}
local seen = {}
for i = at, #ARGV do
  local slot = ARGV[i]
  if not seen[slot] then
    seen[slot] = true
    local owner = redis.call('HGET', alloc_key, slot)
    if owner then
      return {'CONFLICT', placement_id,
              'slot ' .. slot .. ' on host ' .. host_id .. ' is held by placement ' .. owner, 0}
    end
    slots[#slots + 1] = slot
  end
end

local new_tenant = true
for _, other in ipairs(redis.call('HVALS', tenants_key)) do
  if other == tenant then new_tenant = false end
end

-- All checks passed: from here on, only writes.
for _, slot in ipairs(slots) do
  redis.call('HSET', alloc_key, slot, placement_id)
end
redis.call('HSET', placements_key, placement_id, payload)
-- Reserved, not yet carried out by the host.
redis.call('HSET', states_key, placement_id, 'pending')
-- cjson encodes an empty Lua table as {}: store explicit empty arrays.
local encoded = '[]'
if #slots > 0 then
  encoded = cjson.encode(slots)
end
redis.call('HSET', slots_key, placement_id, encoded)
redis.call('HSET', requests_key, placement_id, request_id)
redis.call('HSET', tenants_key, placement_id, tenant)
for _, key in ipairs(bumps) do
  redis.call('HINCRBY', versions_key, key, 1)
end
if new_tenant then
  redis.call('HINCRBY', versions_key, 'tenants', 1)
end
local encoded_bumps = '[]'
if #bumps > 0 then
  encoded_bumps = cjson.encode(bumps)
end
redis.call('HSET', bumps_key, placement_id, encoded_bumps)
local new_generation = redis.call('HINCRBY', host_key, 'alloc_generation', 1)
feed_append(KEYS[10], KEYS[11], host_key, host_id, new_generation)
return {'COMMITTED', placement_id,
        'committed ' .. #slots .. ' slot(s) on host ' .. host_id ..
        ', alloc generation now ' .. new_generation, new_generation}
