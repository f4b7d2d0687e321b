"""What a failed call raises: a :class:`TesseraError` subclass per status code that means something.

The scheduler documents its codes on the Scheduler service
(``tessera/v1/scheduler.proto``); each class here says what its code means
there. An INVALID_ARGUMENT carries, beside its readable message, the
``google.rpc.BadRequest`` field violations the scheduler attached (read with
grpcio-status), so a frontend can point at the field it got wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one field of a request, as ``google.rpc.BadRequest`` names it.

    Attributes:
        field: the field's path (``claims[0].count``, ``page_token``).
        description: what is wrong with it.
    """

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class TesseraError(Exception):
    """A call the scheduler (or the way to it) refused or could not answer.

    Args:
        code: the gRPC status code.
        message: the readable message (the status details).
        field_violations: the fields an invalid request got wrong (empty for
            other codes).

    Attributes:
        code: as above.
        message: as above.
        field_violations: as above, a tuple.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        field_violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field_violations = field_violations


class InvalidArgumentError(TesseraError):
    """INVALID_ARGUMENT: the request is wrong as written; ``field_violations`` name the fields."""


class NotFoundError(TesseraError):
    """NOT_FOUND: no placement (or host) has that id.

    A release retried after a lost answer can end here: the first attempt
    released it.
    """


class AlreadyExistsError(TesseraError):
    """ALREADY_EXISTS: the request id was used before for a different request."""


class NoCapacityError(TesseraError):
    """RESOURCE_EXHAUSTED: nothing can take the request now; the message says why per constraint."""


class PermissionDeniedError(TesseraError):
    """PERMISSION_DENIED: this identity may not make that call or touch that tenant."""


class UnauthenticatedError(TesseraError):
    """UNAUTHENTICATED: the scheduler did not accept the client certificate."""


class ConflictError(TesseraError):
    """ABORTED: the placement is being prepared or released, or every commit lost a race; retry."""


class FailedPreconditionError(TesseraError):
    """FAILED_PRECONDITION: the host still holds placements (host administration)."""


class UnavailableError(TesseraError):
    """UNAVAILABLE after the retries: the scheduler, its store or the host could not be reached.

    From Place, the reservation was released; from Release, the teardown
    failed and the placement is FAILED with its devices kept out of use.
    """


class DeadlineExceededError(TesseraError):
    """DEADLINE_EXCEEDED: no answer within the call's deadline; the call may still complete.

    Retry a Place with the same request id to learn its outcome.
    """


class PagingError(TesseraError):
    """The scheduler answered a page with the token it was asked for: the list would not end."""


_BY_CODE: Mapping[grpc.StatusCode, type[TesseraError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: NoCapacityError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def field_violations_of(call: grpc.Call) -> tuple[FieldViolation, ...]:
    """The BadRequest field violations a failed call carries in its status details.

    A status whose code or message differs from the call's (a proxy
    rewrote one) is ignored, as grpcio-status refuses it: the message is
    then all there is.
    """
    try:
        status = rpc_status.from_call(call)
    except ValueError:
        return ()
    if status is None:
        return ()
    out: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    return tuple(out)


def error_from_rpc(error: grpc.RpcError) -> TesseraError:
    """The :class:`TesseraError` a failed gRPC call stands for.

    Args:
        error: what a blocking stub raised (it is also the call: code,
            details, trailing metadata).
    """
    if not isinstance(error, grpc.Call):
        return TesseraError(grpc.StatusCode.UNKNOWN, str(error))
    code = error.code()
    message = error.details() or ""
    kind = _BY_CODE.get(code, TesseraError)
    violations = field_violations_of(error) if code is grpc.StatusCode.INVALID_ARGUMENT else ()
    return kind(code, message, violations)
