"""Typed Python client of the Tessera scheduler: deadlines, retries on UNAVAILABLE, mutual TLS.

:class:`Client` wraps the Scheduler service of ``tessera.v1`` for frontends;
:func:`all_placements` and :func:`all_hosts` page through the lists on any
blocking stub. Failures raise a :class:`TesseraError` subclass by status
code, carrying the message and, for an invalid request, the
``google.rpc.BadRequest`` field violations. This package depends on gRPC and
protobuf only, never on the scheduler's own code.
"""

from tessera.client.channel import (
    RETRIED_METHODS,
    SCHEDULER_SERVER_NAME,
    RetryPolicy,
    TlsFilesError,
    open_channel,
    service_config,
)
from tessera.client.client import PLACE_TIMEOUT_S, Client
from tessera.client.errors import (
    AlreadyExistsError,
    ConflictError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NoCapacityError,
    NotFoundError,
    PagingError,
    PermissionDeniedError,
    TesseraError,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc,
)
from tessera.client.paging import all_hosts, all_placements

__all__ = [
    "PLACE_TIMEOUT_S",
    "RETRIED_METHODS",
    "SCHEDULER_SERVER_NAME",
    "AlreadyExistsError",
    "Client",
    "ConflictError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InvalidArgumentError",
    "NoCapacityError",
    "NotFoundError",
    "PagingError",
    "PermissionDeniedError",
    "RetryPolicy",
    "TesseraError",
    "TlsFilesError",
    "UnauthenticatedError",
    "UnavailableError",
    "all_hosts",
    "all_placements",
    "error_from_rpc",
    "open_channel",
    "service_config",
]
