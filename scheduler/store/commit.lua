#!lua
--[[
Atomically commit one reservation on one host (Tessera's plan applier).

Every key is the host's (hash tag {H}): the commit stays in one hash slot.
The request id's idempotency lives in its own record, claimed before this
script runs (see schema.py); this script refuses to write once the claim's
deadline has passed, so a caller that finds the claim expired knows no
commit of it can still land.

The shebang line makes the server treat this as a script that writes: it is
refused up front under OOM instead of failing half way through its writes.
Every check happens before the first write, so the commit is all or nothing.

KEYS[1]  tessera:{H}:host                  host hash (alloc_generation field)
KEYS[2]  tessera:{H}:alloc                 slot -> placement id
KEYS[3]  tessera:{H}:placements            placement id -> payload
KEYS[4]  tessera:{H}:placement-slots       placement id -> JSON array of slots
KEYS[5]  tessera:{H}:placement-requests    placement id -> request id
KEYS[6]  tessera:{H}:placement-states      placement id -> lifecycle state
KEYS[7]  tessera:{H}:placement-tenants     placement id -> tenant

ARGV[1]  expected alloc generation (decimal)
ARGV[2]  placement id
ARGV[3]  placement payload (opaque bytes)
ARGV[4]  request id
ARGV[5]  host id
ARGV[6]  tenant
ARGV[7]  claim deadline, server time in ms
ARGV[8..] slot keys

Returns {outcome, placement_id, detail} with outcome one of
COMMITTED, CONFLICT, EXPIRED.
]]

local host_key, alloc_key, placements_key = KEYS[1], KEYS[2], KEYS[3]
local slots_key, requests_key, states_key, tenants_key = KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local expected = ARGV[1]
local placement_id, payload = ARGV[2], ARGV[3]
local request_id, host_id, tenant = ARGV[4], ARGV[5], ARGV[6]
local deadline = tonumber(ARGV[7])

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if now_ms > deadline then
  return {'EXPIRED', placement_id,
          'the claim on request ' .. request_id .. ' expired ' .. (now_ms - deadline) ..
          ' ms before the commit reached host ' .. host_id}
end

if redis.call('EXISTS', host_key) == 0 then
  return {'CONFLICT', placement_id, 'host ' .. host_id .. ' is not registered'}
end

local generation = redis.call('HGET', host_key, 'alloc_generation') or '0'
if generation ~= expected then
  return {'CONFLICT', placement_id,
          'alloc generation of host ' .. host_id .. ' is ' .. generation ..
          ', the plan expected ' .. expected}
end

-- Placement ids are chosen by the caller: never overwrite one.
if redis.call('HEXISTS', placements_key, placement_id) == 1 then
  return {'CONFLICT', placement_id, 'placement id ' .. placement_id .. ' is already in use'}
end

local slots = {}
local seen = {}
for i = 8, #ARGV do
  local slot = ARGV[i]
  if not seen[slot] then
    seen[slot] = true
    local owner = redis.call('HGET', alloc_key, slot)
    if owner then
      return {'CONFLICT', placement_id,
              'slot ' .. slot .. ' on host ' .. host_id .. ' is held by placement ' .. owner}
    end
    slots[#slots + 1] = slot
  end
end

-- All checks passed: from here on, only writes.
for _, slot in ipairs(slots) do
  redis.call('HSET', alloc_key, slot, placement_id)
end
redis.call('HSET', placements_key, placement_id, payload)
-- Reserved, not yet carried out by the host.
redis.call('HSET', states_key, placement_id, 'pending')
-- cjson encodes an empty Lua table as {}: store an explicit empty array.
local encoded = '[]'
if #slots > 0 then
  encoded = cjson.encode(slots)
end
redis.call('HSET', slots_key, placement_id, encoded)
redis.call('HSET', requests_key, placement_id, request_id)
redis.call('HSET', tenants_key, placement_id, tenant)
local new_generation = redis.call('HINCRBY', host_key, 'alloc_generation', 1)
return {'COMMITTED', placement_id,
        'committed ' .. #slots .. ' slot(s) on host ' .. host_id ..
        ', alloc generation now ' .. new_generation}
