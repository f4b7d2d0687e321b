"""Placements looked up: by id, by the tenant's request id, or listed (whole or a page)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tessera.scheduler.core.validation import (
    FieldViolation,
    InvalidRequestError,
    shown,
    validate_lookup,
)
from tessera.scheduler.service.errors import PlacementNotFoundError
from tessera.scheduler.service.page_tokens import MAX_PAGE_BYTES, PageRequest
from tessera.scheduler.store import schema
from tessera.scheduler.store.redis_store import RedisStateStore
from tessera.v1 import placement_pb2

#: Hosts whose placements one pipelined read fetches while a page fills: a
#: page of 500 placements spread one per host costs 8 round trips, and a page
#: that fills from its first host reads no more than 64 hosts.
PAGE_READ_HOSTS = 64


class PlacementLookup:
    """Reads placements from the store, refusing ids no placement could have.

    Args:
        store: the Redis state store.
    """

    def __init__(self, store: RedisStateStore) -> None:
        self._store = store

    async def get(
        self, placement_id: str, request_id: str, tenant: str = ""
    ) -> placement_pb2.Placement:
        """A placement by its id or by the request id (of ``tenant``) that made it.

        Raises:
            InvalidRequestError: an id no placement could have (too long, odd
                characters): refused before it reaches a key or a message; a
                request id without its tenant.
            PlacementNotFoundError: there is none.
        """
        violations = validate_lookup(
            placement_id=placement_id, request_id=request_id, tenant=tenant
        )
        if request_id and not placement_id and not tenant and not violations:
            violations.append(
                FieldViolation("tenant", "is required with request_id (request ids are per tenant)")
            )
        if violations:
            raise InvalidRequestError(violations)
        if not placement_id and request_id:
            found = await self._store.placement_for_request(
                schema.tenant_request(tenant, request_id)
            )
            placement_id = found[0] if found else ""
        stored = await self._store.get_placement(placement_id) if placement_id else None
        if stored is None:
            what = (
                f"placement_id {shown(placement_id)}"
                if placement_id
                else f"request {shown(request_id)}"
            )
            raise PlacementNotFoundError(f"no placement for {what}")
        return placement_pb2.Placement.FromString(stored[1])

    async def list_placements(
        self, tenant: str = "", host_id: str = "", among: Sequence[str] | None = None
    ) -> list[placement_pb2.Placement]:
        """Placements, optionally of one tenant or host.

        Args:
            tenant: only this tenant's ("": every tenant's).
            host_id: only this host's ("": see ``among``).
            among: without ``host_id``, the only hosts that may hold any
                (None: read every host).

        Raises:
            InvalidRequestError: the tenant or host id is not an id.
        """
        if violations := validate_lookup(tenant=tenant, host_id=host_id):
            raise InvalidRequestError(violations)
        rows = await self._store.list_placements(host_id or None, among=among)
        out = [placement_pb2.Placement.FromString(payload) for _, payload in rows]
        return [p for p in out if not tenant or p.tenant == tenant]

    async def page(
        self,
        tenant: str,
        host_id: str,
        among: Sequence[str],
        page: PageRequest,
        *,
        visible: Callable[[str], bool],
        max_bytes: int = MAX_PAGE_BYTES,
    ) -> tuple[list[placement_pb2.Placement], str]:
        """One page of placements, ordered by host id, then placement id.

        Reads the hosts from the page's start on a few at a time (see
        :data:`PAGE_READ_HOSTS`) until the page is full and one more
        placement is found, so a page costs about what it holds, not the
        fleet.

        Args:
            tenant: only this tenant's ("": every tenant's).
            host_id: only this host's ("": see ``among``).
            among: without ``host_id``, the hosts that may hold any (those
                the model shows holding placements).
            page: where the page starts (after a placement id) and its size.
            visible: whether the caller may see a tenant's placements (the
                access policy's reading of an empty tenant filter).
            max_bytes: most bytes of placements in the page; a page holds at
                least one placement when any is left.

        Returns:
            The page, and the placement id the next page starts after ("":
            this is the last page).

        Raises:
            InvalidRequestError: the tenant or host id is not an id.
        """
        if violations := validate_lookup(tenant=tenant, host_id=host_id):
            raise InvalidRequestError(violations)
        start = (schema.host_of_placement(page.after) or "", page.after)
        hosts = [host_id] if host_id else sorted(set(among))
        hosts = [h for h in hosts if h >= start[0]]
        out: list[placement_pb2.Placement] = []
        size = 0
        for first in range(0, len(hosts), PAGE_READ_HOSTS):
            rows = await self._store.list_placements(among=hosts[first : first + PAGE_READ_HOSTS])
            found = [(h, placement_pb2.Placement.FromString(payload)) for h, payload in rows]
            found.sort(key=lambda row: (row[0], row[1].placement_id))
            for host, placement in found:
                if (host, placement.placement_id) <= start:
                    continue
                if (tenant and placement.tenant != tenant) or not visible(placement.tenant):
                    continue
                more = placement.ByteSize()
                if len(out) == page.size or (out and size + more > max_bytes):
                    # One more is left: the page ends at its last placement.
                    return out, out[-1].placement_id
                out.append(placement)
                size += more
        return out, ""
