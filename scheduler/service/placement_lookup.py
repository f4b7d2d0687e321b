"""Placements looked up: by id, by the tenant's request id, or listed."""

from __future__ import annotations

from collections.abc import Sequence

from tessera.scheduler.core.validation import (
    FieldViolation,
    InvalidRequestError,
    shown,
    validate_lookup,
)
from tessera.scheduler.service.errors import PlacementNotFoundError
from tessera.scheduler.store import schema
from tessera.scheduler.store.redis_store import RedisStateStore
from tessera.v1 import placement_pb2


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
