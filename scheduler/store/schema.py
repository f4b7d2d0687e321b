"""Every Redis key the scheduler writes, in one place.

All keys start with ``tessera:``. Hosts are spread over :data:`FEED_SHARDS`
shards (by a CRC32 of the host id), and every key of a host carries its
shard's hash tag ``{sNN}``: the commit of a reservation, which must check and
write the host's generation, slot owners and placements, and append to the
shard's change feed, stays inside one Redis Cluster hash slot.

Per host (hash tag ``{sNN}`` of its shard; ``H`` is the host id):

=========================================  =======  =========================================
key                                        type     content
=========================================  =======  =========================================
``tessera:{sNN}:H:host``                   hash     ``inventory`` (serialized HostInventory),
                                                    ``agent_address``, ``boot_id``,
                                                    ``inventory_generation``,
                                                    ``last_heartbeat_ms``,
                                                    ``alloc_generation``, ``incarnation``
``tessera:{sNN}:H:alloc``                  hash     slot key (``iommu-group:12``) ->
                                                    placement id
``tessera:{sNN}:H:placements``             hash     placement id -> serialized Placement
``tessera:{sNN}:H:placement-slots``        hash     placement id -> JSON array of the slot
                                                    keys the placement owns (release frees
                                                    exactly these)
``tessera:{sNN}:H:placement-requests``     hash     placement id -> request id that made it
``tessera:{sNN}:H:placement-states``       hash     placement id -> ``pending``, ``ready``,
                                                    ``releasing`` or ``failed``
``tessera:{sNN}:H:placement-tenants``      hash     placement id -> tenant (what exclusivity
                                                    domains and interference are judged by)
``tessera:{sNN}:H:versions``               hash     guard key (``epoch``, ``group:12``,
                                                    ``tenants``, ``exclusive``) -> version
                                                    (see :mod:`scheduler.core.guards`)
``tessera:{sNN}:H:placement-bumps``        hash     placement id -> JSON array of the guard
                                                    keys its commit bumped (its release
                                                    bumps them again)
=========================================  =======  =========================================

Per shard (hash tag ``{sNN}``), the change feed replicas follow:

=========================================  =======  =========================================
``tessera:{sNN}:feed``                     stream   one entry per change of a host of the
                                                    shard: ``h`` host id, ``n`` sequence,
                                                    ``i`` its incarnation, ``g`` its alloc
                                                    generation after it
``tessera:{sNN}:feed-seq``                 integer  the last sequence number given out
=========================================  =======  =========================================

A write that changes what a replica plans on appends to its shard's feed in
the same script: commits, releases, registrations that change the inventory,
boot or address, cordon and uncordon, a lease expiring (the housekeeper's
sweep) or coming back (the next heartbeat), forgetting a host. Heartbeats that
change nothing do not. A replica keeps the cluster in memory, reads the feeds
from its cursors before planning and re-reads only the hosts named there; the
commit's generation check stays the safety net for anything it has not seen.

The host hash also holds ``fence:<job>``: the highest fencing token of a
background job that wrote to this host. A fenced write with a lower token is
refused, so the check stays inside the host's slot (the resource remembers
the newest term it saw, as Kleppmann's fencing has storage do).

An operator's **cordon** lives in the host hash too: ``cordoned`` (``1``),
``cordon_reason``, ``cordoned_by`` and ``cordoned_ms``, absent when the host is
not cordoned. Registration and heartbeats write only their own fields, so only
an uncordon removes them; reading them with the rest of the record keeps a
cordoned host out of every snapshot's schedulable hosts.

Per request (one key, so one slot):

========================================  =======  ==========================================
``tessera:request:<request_id>``          hash     ``state`` (``claimed`` or ``committed``),
                                                   ``digest``, ``claimant``, ``deadline_ms``,
                                                   ``placement_id``, ``host_id``
========================================  =======  ==========================================

Per background job (hash tag ``{job:<job>}``, so lease and fence share a slot):

========================================  =======  ==========================================
``tessera:{job:<job>}:lease``             string   ``<owner> <token>`` of the replica running
                                                   the job (the reaper), with a TTL
``tessera:{job:<job>}:fence``             integer  the job's fencing token: bumped each time
                                                   a new replica takes the lease
========================================  =======  ==========================================

Global: ``tessera:replicas`` (sorted set), the scheduler replicas placing
now, each scored by when its membership runs out (server time, ms): a replica
renews its own every few seconds and leaves on shutdown; members past their
time are dropped by the next renewal. Replicas split the hosts between them by
it (see :class:`scheduler.service.replica_roster.ReplicaRoster`).

Global: ``tessera:hosts`` (set), every registered host id. It is written
before the host record, so it is a superset of the registered hosts and
readers skip ids without a record; a registration that creates the record
writes it again after, so that forgetting the host at the same moment (its
delete, then its removal from the set) cannot leave a record out of it.

Every write touches one hash slot, ready for Redis Cluster:

* A **reservation** is committed in three single-slot steps, because
  idempotency spans hosts (a retried request may be planned onto another
  host). (1) *claim* the request id: its record becomes ``claimed`` by this
  attempt, with a deadline in server time; (2) record the *intent* (the
  placement id and host about to be committed; renews the deadline), then
  *commit* on the host, whose script refuses once the deadline passed;
  (3) *finalize*: the record becomes ``committed``. A caller finding a claim
  past its deadline (plus a margin for clock skew between Cluster nodes)
  knows no commit can still land: it adopts the placement if the host holds
  it, or takes the claim over. The housekeeper resolves abandoned claims the
  same way.
* A **release** frees the host's slots, then forgets the request record if it
  still names that placement. A crash in between leaves a record naming a
  placement that is gone; readers treat it as free.
* **Forgetting a host** deletes every per-host key (:func:`all_host_keys`) in
  one script on the host's slot, then each dropped placement's request record
  (one command per record: each is its own slot), then the id in
  ``tessera:hosts``. A crash in between leaves records naming placements that
  are gone (free, as after a release) or an index entry without a record
  (skipped).
* **Placement ids** name their host (``pl-<token>@<host_id>``), so a
  placement is found by id without a global index.
* ``snapshot`` reads each host with one read-only script on its slot (per-host
  consistency is all the scheduler needs), pipelined; the feed is read one
  stream per shard.

The functions below are the only places key names are spelled out.
"""

from __future__ import annotations

import functools
import re
import zlib

PREFIX = "tessera:"

FEED_SHARDS = 16
"""How many change feeds the hosts are spread over (fixed: it names keys).

Every host belongs to one shard, and every per-host key carries the shard's
hash tag, so a script that changes a host can append to its shard's feed in
the same hash slot. A replica follows all of them.
"""

FEED_MAXLEN = 16384
"""Entries each feed keeps (approximately: trimmed with ``MAXLEN ~``).

At a thousand changes a second over 16 shards that is about a minute of
history; a replica further behind than that resyncs in full.
"""

HOSTS = f"{PREFIX}hosts"
"""Set of every registered host id (global)."""

REPLICAS = f"{PREFIX}replicas"
"""Sorted set of the replicas placing now, scored by when each one's membership runs out (ms)."""

LAYOUT = f"{PREFIX}layout"
"""The key layout the store was written in (global string): :data:`LAYOUT_VERSION`."""

LAYOUT_VERSION = "2"
"""This layout: hosts in :data:`FEED_SHARDS` shards with change feeds, guard versions.

Layout 1 (no marker) tagged each host's keys with the host id itself. A
scheduler refuses a store in another layout: two replicas reading and
committing on different keys for one host would hand its devices out twice.
"""

# Fields of the host hash.
F_INVENTORY = "inventory"
F_AGENT_ADDRESS = "agent_address"
F_BOOT_ID = "boot_id"
F_INVENTORY_GENERATION = "inventory_generation"
F_LAST_HEARTBEAT_MS = "last_heartbeat_ms"
F_ALLOC_GENERATION = "alloc_generation"
F_FENCE_PREFIX = "fence:"
"""Prefix of the host hash's per-job fence fields (``fence:reaper``)."""
F_CORDONED = "cordoned"
"""``1`` while an operator keeps the host out of scheduling; absent otherwise."""
F_CORDON_REASON = "cordon_reason"
F_CORDONED_BY = "cordoned_by"
F_CORDONED_MS = "cordoned_ms"
F_INCARNATION = "incarnation"
"""Set when the store creates the host's record (server time, µs); also in
the host's ``versions``, so a plan made on an earlier incarnation of the same
host id (forgotten, or lost with the store's data) never commits."""
F_LEASE_EXPIRED = "lease_expired"
"""``1`` once the housekeeper found the host's lease run out; a heartbeat or
registration clears it. Expiry is thus an event (on the feed), not something
every reader computes from the heartbeat clock."""

# Fields of a feed entry.
F_FEED_HOST = "h"
F_FEED_SEQ = "n"
F_FEED_GENERATION = "g"
F_FEED_INCARNATION = "i"

# Fields of a request record.
F_STATE = "state"
F_DIGEST = "digest"
F_CLAIMANT = "claimant"
F_DEADLINE_MS = "deadline_ms"
F_PLACEMENT_ID = "placement_id"
F_HOST_ID = "host_id"

# States of a request record.
CLAIMED = "claimed"
COMMITTED = "committed"

_PLACEMENT_ID = re.compile(r"^pl-([^@]+)@(.+)$", re.DOTALL)


def shard_of(host_id: str) -> int:
    """The feed shard a host belongs to (stable across processes and versions).

    Args:
        host_id: the host.

    Returns:
        0 .. FEED_SHARDS - 1.
    """
    return zlib.crc32(host_id.encode("utf-8")) % FEED_SHARDS


def _shard_tag(shard: int) -> str:
    return f"{PREFIX}{{s{shard:02d}}}"


@functools.lru_cache(maxsize=1 << 16)
def _tag(host_id: str) -> str:
    # Cached: every store command names a host's keys, and the CRC of the id
    # showed in profiles of placement at a few hundred commits a second.
    # Braces in an id would move the hash tag; ids are validated before use.
    # The host id follows the tag, and every suffix below is free of ':',
    # so no two (host, suffix) pairs spell the same key.
    return f"{_shard_tag(shard_of(host_id))}:{host_id}"


def feed(shard: int) -> str:
    """Stream of one shard's host changes: entries ``h`` (host id), ``n`` (sequence).

    Appended by every script that changes what a replica plans on (a commit,
    a release, a registration that changed something, a cordon, a lease
    expiring or coming back, forgetting a host), in the same atomic step.

    Args:
        shard: the shard (:func:`shard_of`).

    Returns:
        The key name.
    """
    return f"{_shard_tag(shard)}:feed"


def feed_seq(shard: int) -> str:
    """Counter of one shard's feed entries: each entry carries the next value.

    A reader that finds the entries after its cursor not numbered on from its
    own count knows it missed some (trimmed, or the store lost data) and
    resyncs.

    Args:
        shard: the shard.

    Returns:
        The key name.
    """
    return f"{_shard_tag(shard)}:feed-seq"


def feed_keys(host_id: str) -> list[str]:
    """The shard keys a script changing a host appends to: feed and its sequence.

    Args:
        host_id: the host.

    Returns:
        ``[feed, feed_seq]`` of the host's shard.
    """
    shard = shard_of(host_id)
    return [feed(shard), feed_seq(shard)]


def host(host_id: str) -> str:
    """Hash of a host's registration: inventory, boot, heartbeat, alloc generation.

    Args:
        host_id: the host.

    Returns:
        The key name.
    """
    return f"{_tag(host_id)}:host"


def alloc(host_id: str) -> str:
    """Hash of a host's slot owners: slot key -> placement id.

    Args:
        host_id: the host.

    Returns:
        The key name.
    """
    return f"{_tag(host_id)}:alloc"


def placements(host_id: str) -> str:
    """Hash of a host's placements: placement id -> serialized payload.

    Args:
        host_id: the host.

    Returns:
        The key name.
    """
    return f"{_tag(host_id)}:placements"


def placement_slots(host_id: str) -> str:
    """Hash of the slots each placement of a host owns: placement id -> JSON array.

    Args:
        host_id: the host.

    Returns:
        The key name.
    """
    return f"{_tag(host_id)}:placement-slots"


def placement_requests(host_id: str) -> str:
    """Hash of the request id each placement of a host was made for.

    Args:
        host_id: the host.

    Returns:
        The key name.
    """
    return f"{_tag(host_id)}:placement-requests"


def placement_states(host_id: str) -> str:
    """Hash of each placement's lifecycle state: placement id -> ``pending`` etc.

    Kept beside the opaque payload so that state changes can be
    compare-and-set in Lua without parsing the payload.

    Args:
        host_id: the host.

    Returns:
        The key name.
    """
    return f"{_tag(host_id)}:placement-states"


def placement_tenants(host_id: str) -> str:
    """Hash of each placement's tenant: placement id -> tenant name.

    Read into every snapshot: the engine keeps other tenants out of a
    tenant's exclusive domains, which needs who holds each slot.

    Args:
        host_id: the host.

    Returns:
        The key name.
    """
    return f"{_tag(host_id)}:placement-tenants"


def versions(host_id: str) -> str:
    """Hash of a host's guard versions: guard key -> counter.

    A commit checks the versions of the keys its plan depends on (the
    devices it touches, the host's epoch and exclusive holds) and bumps those
    it changes, so plans for different devices of one host do not collide.

    Args:
        host_id: the host.

    Returns:
        The key name.
    """
    return f"{_tag(host_id)}:versions"


def placement_bumps(host_id: str) -> str:
    """Hash of the guard keys each placement's commit bumped: placement id -> JSON array.

    Args:
        host_id: the host.

    Returns:
        The key name.
    """
    return f"{_tag(host_id)}:placement-bumps"


def tenant_request(tenant: str, request_id: str) -> str:
    """The store's name of a tenant's request id: ``<tenant>|<request id>``.

    Request ids are each tenant's own: two tenants using the same id never
    meet, so one can neither squat another's ids nor learn whether an id is
    in use. ``|`` is in neither a tenant nor a request id, so the pair is
    unambiguous. Every request key and record field holds this form; the
    placement itself keeps the client's request id.

    Args:
        tenant: the request's tenant.
        request_id: the client's idempotency key.

    Returns:
        The id the request protocol's keys and records use.
    """
    return f"{tenant}|{request_id}"


def request(request_id: str) -> str:
    """Hash of a request id's claim: state, digest, claimant, deadline, placement.

    One key: every step of the request protocol is a single-key script.

    Args:
        request_id: a tenant's request id as :func:`tenant_request` names it.

    Returns:
        The key name.
    """
    return f"{PREFIX}request:{request_id}"


def placement_id(token: str, host_id: str) -> str:
    """A placement id naming its host: ``pl-<token>@<host_id>``.

    Args:
        token: unique part (no ``@``).
        host_id: the host the placement is committed on.

    Returns:
        The placement id.

    Raises:
        ValueError: the token is empty or holds ``@``.
    """
    if not token or "@" in token:
        raise ValueError(f"placement token {token!r} must be non-empty and hold no '@'")
    return f"pl-{token}@{host_id}"


def host_of_placement(placement_id: str) -> str | None:
    """The host a placement id names, or None if it is not a placement id.

    Args:
        placement_id: as made by :func:`placement_id`.

    Returns:
        The host id.
    """
    found = _PLACEMENT_ID.match(placement_id)
    return found.group(2) if found else None


#: The scheduler's background job (reaper and reconciler): one lease, one fence.
BACKGROUND_JOB = "reaper"


def lease(job: str) -> str:
    """String naming the replica that runs a background job, with a TTL.

    Shares the fence's hash tag: both are written by one script.

    Args:
        job: the job ("reaper").

    Returns:
        The key name.
    """
    return f"{PREFIX}{{job:{job}}}:lease"


def fence(job: str) -> str:
    """Counter of a background job's leadership terms: its fencing token.

    Shares the lease's hash tag: both are written by one script.

    Args:
        job: the job ("reaper").

    Returns:
        The key name.
    """
    return f"{PREFIX}{{job:{job}}}:fence"


def host_keys(host_id: str) -> list[str]:
    """Every per-host key of a host, in the order the Lua scripts expect them.

    Args:
        host_id: the host.

    Returns:
        ``[host, alloc, placements, placement_slots, placement_requests]``.
    """
    return [
        host(host_id),
        alloc(host_id),
        placements(host_id),
        placement_slots(host_id),
        placement_requests(host_id),
    ]


def all_host_keys(host_id: str) -> list[str]:
    """Every key that belongs to a host: what forgetting the host deletes.

    A new per-host key must be added here, or a forgotten host leaves it
    behind (``tests/store`` scans for leftovers with the host's hash tag).

    Args:
        host_id: the host.

    Returns:
        :func:`host_keys`, then ``placement_states``, ``placement_tenants``,
        ``versions`` and ``placement_bumps``: the order the Lua scripts expect.
    """
    return [
        *host_keys(host_id),
        placement_states(host_id),
        placement_tenants(host_id),
        versions(host_id),
        placement_bumps(host_id),
    ]
