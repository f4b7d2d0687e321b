"""A tenant's request id, claimed by one call: claim, answer a repeat, give up.

Step 1 of the commit protocol (see :mod:`scheduler.store.redis_store`): a call
claims the request id in its own record before it commits anything, so a
retry or a concurrent duplicate gets the first call's answer instead of a
second placement, and a request id used for a different request is refused.
"""

from __future__ import annotations

import uuid

from tessera.scheduler.core.lifecycle import FAILED, PENDING
from tessera.scheduler.core.validation import MAX_IDENT, shown
from tessera.scheduler.service.convert import Submitted, state_of
from tessera.scheduler.service.errors import (
    ContentionError,
    HostOperationError,
    PlacementBusyError,
    RequestIdReusedError,
)
from tessera.scheduler.store import schema
from tessera.scheduler.store.redis_store import ClaimOutcome, RedisStateStore
from tessera.v1 import placement_pb2

#: Claims of one request id before giving up: only a release racing the
#: claim (the placement vanished between claim and read) makes another.
MAX_CLAIM_ATTEMPTS = 3


def new_claimant() -> str:
    """A unique name for one call's claim on its request id."""
    return f"call-{uuid.uuid4().hex}"


def request_key(submitted: Submitted) -> str:
    """The store's name of a request's id: its tenant's (see ``schema.tenant_request``)."""
    return schema.tenant_request(submitted.request.tenant, submitted.request.request_id)


class RequestClaims:
    """Claims, answers and abandons request ids in the store.

    Args:
        store: the Redis state store.
    """

    def __init__(self, store: RedisStateStore) -> None:
        self._store = store

    async def existing(self, submitted: Submitted) -> placement_pb2.Placement | None:
        """The placement this request id already made, if any (a read, no claim).

        Raises:
            RequestIdReusedError: the id belongs to another request.
            PlacementBusyError: its placement is being prepared right now.
            HostOperationError: its placement failed.
        """
        found = await self._store.placement_for_request(request_key(submitted))
        if found is None:
            return None
        placement_id, stored_digest = found
        self._check_digest(submitted, stored_digest)
        return await self.answer(submitted, placement_id)

    async def claim(self, submitted: Submitted, claimant: str) -> placement_pb2.Placement | None:
        """Take the request id for this call.

        Returns:
            None when this call holds the claim and must place the request;
            the first call's placement when the request was placed already.

        Raises:
            RequestIdReusedError: the id belongs to another request.
            PlacementBusyError: another call is placing it right now.
            ContentionError: its placement kept vanishing under the claim.
        """
        request_id = submitted.request.request_id
        for _ in range(MAX_CLAIM_ATTEMPTS):
            claim = await self._store.claim_request(
                request_key(submitted), submitted.digest, claimant
            )
            self._check_digest(submitted, claim.digest)
            if claim.outcome is ClaimOutcome.CLAIMED:
                return None
            if claim.outcome is ClaimOutcome.BUSY:
                raise PlacementBusyError(
                    f"request {shown(request_id, MAX_IDENT)} is being placed by another "
                    "call; retry shortly"
                )
            answer = await self.answer(submitted, claim.placement_id)
            if answer is not None:
                return answer
            # Released between the claim and the read: claim it afresh.
        raise ContentionError(
            f"request {shown(request_id, MAX_IDENT)} kept changing under its claim; retry"
        )

    async def answer(
        self, submitted: Submitted, placement_id: str
    ) -> placement_pb2.Placement | None:
        """What a repeated request is told: the placement its first call made.

        Returns:
            The placement, or None when it is gone (released meanwhile).

        Raises:
            PlacementBusyError: it is being prepared right now.
            HostOperationError: it failed on its host.
        """
        stored = await self._store.get_placement(placement_id)
        if stored is None:
            return None
        placement = placement_pb2.Placement.FromString(stored[1])
        # The state as the payload says it: one script writes both, so one
        # read sees them agree. Reading the state apart could see a later
        # move than the payload (READY after a payload read while PENDING),
        # and answer a placement still being prepared as placed.
        request_id = submitted.request.request_id
        state = state_of(placement)
        if state is PENDING:
            # Another call with this request_id is carrying it out right now.
            raise PlacementBusyError(
                f"request {shown(request_id, MAX_IDENT)} is still being prepared on host "
                f"{placement.host_id} (placement {placement_id}); retry shortly"
            )
        if state is FAILED:
            raise HostOperationError(
                f"request {shown(request_id, MAX_IDENT)} failed on host {placement.host_id}: "
                f"{placement.message}"
            )
        return placement

    async def abandon(self, submitted: Submitted, claimant: str) -> None:
        """Free the request id now: every commit of this call answered and none landed."""
        await self._store.abandon_claim(request_key(submitted), claimant)

    @staticmethod
    def _check_digest(submitted: Submitted, stored: str) -> None:
        if stored != submitted.digest:
            # Not which placement it made: the first caller may be another
            # tenant, and its placement id names the host it runs on.
            raise RequestIdReusedError(
                f"request_id {shown(submitted.request.request_id, MAX_IDENT)} was already "
                "used for a different request; choose a new request_id"
            )
