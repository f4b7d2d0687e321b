"""Domain failures, the one table that maps them to gRPC status codes, and rich statuses.

An INVALID_ARGUMENT answer carries, beside its readable message, a
``google.rpc.Status`` whose details hold a ``google.rpc.BadRequest`` with one
field violation per problem (:func:`status_trailer`), in the
``grpc-status-details-bin`` trailer that grpcio-status and the status helpers
of every other gRPC language read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
import redis.exceptions
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tessera.scheduler.core.validation import FieldViolation, InvalidRequestError
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


#: Most bytes of the BadRequest detail. It travels base64-encoded (4/3) in a
#: trailer beside the message (at most 2 KiB, see the servicers'
#: ``MAX_DETAILS_BYTES``) and the message again inside the Status; a client
#: refuses metadata past 8 KiB, so the violations get what stays well below it.
MAX_VIOLATION_BYTES = 1536
#: Characters kept of one violation's field path and of its description.
MAX_VIOLATION_FIELD = 160
MAX_VIOLATION_DESCRIPTION = 320


def field_violations(error: BaseException) -> list[FieldViolation]:
    """The field violations a failure names (none but an invalid request's)."""
    return list(error.violations) if isinstance(error, InvalidRequestError) else []


def status_trailer(
    code: grpc.StatusCode, message: str, violations: Sequence[FieldViolation]
) -> tuple[tuple[str, str | bytes], ...]:
    """The trailer carrying a ``google.rpc.Status`` with a BadRequest; empty without violations.

    Violations are kept in order while they fit :data:`MAX_VIOLATION_BYTES`,
    each cut to :data:`MAX_VIOLATION_FIELD` and
    :data:`MAX_VIOLATION_DESCRIPTION` characters: they come from untrusted
    requests (the message already says how many problems there were).

    Args:
        code: the call's status code.
        message: the readable message, exactly as the call's details carry it
            (``grpc_status.rpc_status.from_call`` refuses a Status whose code
            or message differs from the call's).
        violations: the problems, each naming its field.
    """
    if not violations:
        return ()
    bad = error_details_pb2.BadRequest()
    for violation in violations:
        entry = error_details_pb2.BadRequest.FieldViolation(
            field=violation.field[:MAX_VIOLATION_FIELD],
            description=violation.message[:MAX_VIOLATION_DESCRIPTION],
        )
        # 4: the entry's own tag and length prefix.
        if bad.ByteSize() + entry.ByteSize() + 4 > MAX_VIOLATION_BYTES:
            break
        bad.field_violations.append(entry)
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(bad)
    return tuple(rpc_status.to_status(status).trailing_metadata)
