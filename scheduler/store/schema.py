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

Global (not hash-tagged by host):

========================================  =======  ==========================================
``tessera:hosts``                         set      every registered host id
``tessera:request:<request_id>``          hash     ``placement_id``, ``digest``, ``host_id``
``tessera:placement:<placement_id>``      string   host id holding the placement
``tessera:lease:<job>``                   string   ``<owner> <token>`` of the replica running
                                                   a background job (the reaper), with a TTL
``tessera:fence:<job>``                   integer  the job's fencing token: bumped each time
                                                   a new replica takes the lease; writes of
                                                   the job carry it and are refused once stale
========================================  =======  ==========================================

Cross-slot operations, and why they are acceptable for now:

* ``commit_reservation`` and ``release`` also write the request index and the
  placement index, which live in other slots. Idempotency needs the request
  check and the reservation to happen atomically: a retried request may be
  planned onto a different host, so the request index cannot be per host.
  Tessera targets a single Redis/Valkey primary today, where a Lua script over
  any keys is atomic. Under Redis Cluster this would become a two-step
  protocol (claim the request id in its own slot, then commit on the host,
  undoing the claim on conflict).
* ``snapshot`` reads all hosts in one MULTI, which is cross-slot; per-host
  consistency is all the scheduler needs, so under Cluster it would become one
  MULTI per host.
* ``tessera:hosts`` is written outside the host's commit (before the host
  record), so it is a superset of the registered hosts and readers skip ids
  without a record.

The functions below are the only places key names are spelled out.
"""

from __future__ import annotations

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

# Fields of a request index hash.
F_PLACEMENT_ID = "placement_id"
F_DIGEST = "digest"
F_HOST_ID = "host_id"


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


def request(request_id: str) -> str:
    """Hash indexing a request id: ``placement_id``, ``digest``, ``host_id``.

    Global (cross-slot with the host keys): see the module docstring.

    Args:
        request_id: the client's idempotency key.

    Returns:
        The key name.
    """
    return f"{PREFIX}request:{request_id}"


def placement_index(placement_id: str) -> str:
    """String holding the host id of a placement, to find it by id alone.

    Global (cross-slot with the host keys): see the module docstring.

    Args:
        placement_id: the placement.

    Returns:
        The key name.
    """
    return f"{PREFIX}placement:{placement_id}"


def lease(job: str) -> str:
    """String naming the replica that runs a background job, with a TTL.

    Args:
        job: the job ("reaper").

    Returns:
        The key name.
    """
    return f"{PREFIX}lease:{job}"


def fence(job: str) -> str:
    """Counter of a background job's leadership terms: its fencing token.

    Args:
        job: the job ("reaper").

    Returns:
        The key name.
    """
    return f"{PREFIX}fence:{job}"


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
