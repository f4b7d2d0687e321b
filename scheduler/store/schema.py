"""Every Redis key the scheduler writes, in one place.

All keys start with ``tessera:``. Keys that belong to one host carry the hash
tag ``{host_id}``, so every per-host key of a host lives in one Redis Cluster
hash slot: the commit of a reservation, which must check and write the host's
generation, slot owners and placements together, stays inside that slot.

Per host (hash tag ``{host_id}``):

========================================  =======  ==========================================
key                                       type     content
========================================  =======  ==========================================
``tessera:{H}:host``                      hash     ``inventory`` (serialized HostInventory),
                                                   ``agent_address``, ``boot_id``,
                                                   ``inventory_generation``,
                                                   ``last_heartbeat_ms``, ``alloc_generation``
``tessera:{H}:alloc``                     hash     slot key (``iommu-group:12``) -> placement id
``tessera:{H}:placements``                hash     placement id -> serialized Placement
``tessera:{H}:placement-slots``           hash     placement id -> JSON array of the slot keys
                                                   the placement owns (release frees exactly
                                                   these)
``tessera:{H}:placement-requests``        hash     placement id -> request id that made it
``tessera:{H}:placement-states``          hash     placement id -> ``pending``, ``ready``,
                                                   ``releasing`` or ``failed``
``tessera:{H}:placement-tenants``         hash     placement id -> tenant (what exclusivity
                                                   domains and interference are judged by)
========================================  =======  ==========================================

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
* ``snapshot`` reads all hosts in one MULTI, which is cross-slot; per-host
  consistency is all the scheduler needs, so under Cluster it would become one
  MULTI per host. Reads, not writes.

The functions below are the only places key names are spelled out.
"""

from __future__ import annotations

import re

PREFIX = "tessera:"

HOSTS = f"{PREFIX}hosts"
"""Set of every registered host id (global)."""

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


def _tag(host_id: str) -> str:
    # Braces in an id would move the hash tag; ids are validated before use.
    return f"{PREFIX}{{{host_id}}}"


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
        :func:`host_keys`, then ``placement_states`` and ``placement_tenants``.
    """
    return [*host_keys(host_id), placement_states(host_id), placement_tenants(host_id)]
