"""Domain failures, and the one table that maps them to gRPC status codes."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
import redis.exceptions

from tessera.scheduler.core.validation import InvalidRequestError
from tessera.security.policy import AccessDeniedError


class SchedulerError(Exception):
    """Base of failures the scheduler reports to its clients."""


class NoCapacityError(SchedulerError):
    """No host can take the request now."""

    def __init__(self, summary: str, reasons: list[str]) -> None:
        text = summary + ("; " + "; ".join(reasons) if reasons else "")
        super().__init__(text)
        self.summary = summary
        self.reasons = reasons


class RequestIdReusedError(SchedulerError):
    """A request_id came back with a different request."""


class PlacementNotFoundError(SchedulerError):
    """No placement has that id (or request id)."""


class PlacementBusyError(SchedulerError):
    """The placement is mid-operation (being prepared or released); retry."""


class ContentionError(SchedulerError):
    """Every commit attempt lost a race against other placements."""


class HostOperationError(SchedulerError):
    """The agent could not carry the placement out (or tear it down)."""


class HostNotFoundError(SchedulerError):
    """No host is registered under that id."""


class HostBusyError(SchedulerError):
    """The host still holds placements; drain it first (or force)."""


#: Exception type -> status code. The first matching entry wins.
STATUS_CODES: Mapping[type[Exception], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    AccessDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    NoCapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RequestIdReusedError: grpc.StatusCode.ALREADY_EXISTS,
    PlacementNotFoundError: grpc.StatusCode.NOT_FOUND,
    ContentionError: grpc.StatusCode.ABORTED,
    PlacementBusyError: grpc.StatusCode.ABORTED,
    HostOperationError: grpc.StatusCode.UNAVAILABLE,
    HostNotFoundError: grpc.StatusCode.NOT_FOUND,
    HostBusyError: grpc.StatusCode.FAILED_PRECONDITION,
    # The store restarting or unreachable: nothing was acknowledged, retry.
    redis.exceptions.ConnectionError: grpc.StatusCode.UNAVAILABLE,
    redis.exceptions.TimeoutError: grpc.StatusCode.UNAVAILABLE,
    # A store between primaries: a demoted one refusing writes, a cluster
    # down or resharding. The write was refused whole (scripts fail at their
    # first write): retry.
    redis.exceptions.ReadOnlyError: grpc.StatusCode.UNAVAILABLE,
    redis.exceptions.ClusterDownError: grpc.StatusCode.UNAVAILABLE,
    redis.exceptions.TryAgainError: grpc.StatusCode.UNAVAILABLE,
}

#: Replies redis-py has no type for that say the same: the write was refused
#: whole, for a while (a primary short of replicas with min-replicas-to-write,
#: a replica whose primary is down, one still loading its data).
RETRY_LATER_REPLIES = ("NOREPLICAS", "MASTERDOWN", "LOADING")


def status_of(error: Exception) -> grpc.StatusCode:
    """Status code for a domain failure; INTERNAL for anything else (a bug)."""
    for kind, code in STATUS_CODES.items():
        if isinstance(error, kind):
            return code
    if isinstance(error, redis.exceptions.ResponseError) and str(error).startswith(
        RETRY_LATER_REPLIES
    ):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL
