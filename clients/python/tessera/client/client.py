"""A blocking client of the Scheduler service for frontends."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from tessera.client.channel import SCHEDULER_SERVER_NAME, RetryPolicy, open_channel
from tessera.client.errors import error_from_rpc
from tessera.client.paging import all_hosts, all_placements
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

T = TypeVar("T")

#: Seconds a call that waits for a host to carry work out (Place, PlaceBatch,
#: Release) may take by default: binding devices to VFIO, creating VFs, mdevs
#: or MIG instances, and tearing them down, takes seconds on a busy host.
PLACE_TIMEOUT_S = 60.0


class Client:
    """The Scheduler service, typed, with deadlines, retries and mutual TLS.

    One client holds one channel; it is safe to share between threads. Use
    it as a context manager, or call :meth:`close`.

    Args:
        target: the scheduler, ``host:port``.
        tls_dir: a directory with ``ca.pem``, ``cert.pem`` and ``key.pem``
            (read once, here); None speaks plaintext, which a scheduler
            serves on loopback only.
        timeout: seconds each call may take (each page of a list), retries
            included.
        place_timeout: seconds Place, PlaceBatch and Release may take: they
            return once the host has carried the work out.
        retry: how calls that fail with UNAVAILABLE are retried (see
            :mod:`tessera.client.channel`); None: only transparently.
        wait_for_ready: a call made while the scheduler cannot be reached
            waits for it until its deadline, instead of failing (and being
            retried) at once; for clients started beside their scheduler.
        server_name: the name the scheduler's certificate must carry.
        options: more gRPC channel options.

    Raises:
        TlsFilesError: the TLS directory cannot be read.
    """

    def __init__(
        self,
        target: str,
        *,
        tls_dir: Path | None = None,
        timeout: float = 10.0,
        place_timeout: float = PLACE_TIMEOUT_S,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen, shared safely
        wait_for_ready: bool = False,
        server_name: str = SCHEDULER_SERVER_NAME,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if timeout <= 0 or place_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self._channel = open_channel(
            target, tls_dir=tls_dir, retry=retry, server_name=server_name, options=options
        )
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self._timeout = timeout
        self._place_timeout = place_timeout
        self._wait_for_ready = wait_for_ready

    # -- placements ---------------------------------------------------------

    def place(
        self, request: placement_pb2.PlacementRequest, *, timeout: float | None = None
    ) -> placement_pb2.Placement:
        """Place one request and have its host carry it out.

        Args:
            request: what to place. Without a ``request_id`` the client
                makes one up (a UUID), so that its own retries are safe;
                set one to retry across calls or processes: the same id
                always yields the same placement. Not modified.
            timeout: seconds, instead of the client's ``place_timeout``.

        Returns:
            The placement, READY, with the handles (``/dev/vfio/<group>``,
            MIG UUIDs) in its allocations.

        Raises:
            InvalidArgumentError: the request is wrong (``field_violations``).
            NoCapacityError: nothing can take it now.
            AlreadyExistsError: its request id was used for another request.
            TesseraError: another failure, by its code.
        """
        sent = _with_request_id(request)
        response = self._call(
            lambda: self._stub.Place(
                scheduler_pb2.PlaceRequest(request=sent),
                timeout=timeout or self._place_timeout,
                wait_for_ready=self._wait_for_ready,
            )
        )
        return response.placement

    def place_batch(
        self,
        requests: Iterable[placement_pb2.PlacementRequest],
        *,
        all_or_nothing: bool = False,
        timeout: float | None = None,
    ) -> scheduler_pb2.PlaceBatchResponse:
        """Place many requests jointly (one solver run; gangs all or nothing).

        Args:
            requests: what to place; each without a ``request_id`` gets a
                UUID, as :meth:`place` does. Not modified.
            all_or_nothing: place every request or none.
            timeout: seconds, instead of the client's ``place_timeout``.

        Returns:
            The placements, and the requests not placed with why.

        Raises:
            TesseraError: the batch as a whole was refused, by its code.
        """
        batch = scheduler_pb2.PlaceBatchRequest(
            requests=[_with_request_id(r) for r in requests], all_or_nothing=all_or_nothing
        )
        return self._call(
            lambda: self._stub.PlaceBatch(
                batch,
                timeout=timeout or self._place_timeout,
                wait_for_ready=self._wait_for_ready,
            )
        )

    def release(
        self,
        placement_id: str = "",
        *,
        request_id: str = "",
        tenant: str = "",
        timeout: float | None = None,
    ) -> placement_pb2.Placement:
        """Tear a placement down on its host and free its devices.

        Args:
            placement_id: the placement; or, empty, ``request_id`` names it.
            request_id: the request id that made it (with ``tenant`` unless
                the caller is a tenant identity).
            tenant: whose request id it is.
            timeout: seconds, instead of the client's ``place_timeout``.

        Returns:
            The placement as it was released.

        Raises:
            NotFoundError: there is none (also when a retry follows a
                release whose answer was lost).
            ConflictError: it is being prepared or released; retry.
            UnavailableError: the teardown failed; the placement is FAILED.
            TesseraError: another failure, by its code.
        """
        request = scheduler_pb2.ReleaseRequest(
            placement_id=placement_id, request_id=request_id, tenant=tenant
        )
        response = self._call(
            lambda: self._stub.Release(
                request,
                timeout=timeout or self._place_timeout,
                wait_for_ready=self._wait_for_ready,
            )
        )
        return response.placement

    def get(
        self,
        placement_id: str = "",
        *,
        request_id: str = "",
        tenant: str = "",
        timeout: float | None = None,
    ) -> placement_pb2.Placement:
        """A placement by its id, or by the request id that made it (see :meth:`release`).

        Raises:
            NotFoundError: there is none.
            TesseraError: another failure, by its code.
        """
        request = scheduler_pb2.GetPlacementRequest(
            placement_id=placement_id, request_id=request_id, tenant=tenant
        )
        return self._call(
            lambda: self._stub.GetPlacement(
                request, timeout=timeout or self._timeout, wait_for_ready=self._wait_for_ready
            )
        )

    def list_placements(
        self,
        *,
        tenant: str = "",
        host_id: str = "",
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[placement_pb2.Placement]:
        """Every placement the caller may see that matches the filters, page after page.

        Ordered by host id, then placement id. Pages are fetched as the
        iteration reaches them, each call with its own deadline.

        Args:
            tenant: only this tenant's ("": every tenant the caller acts for).
            host_id: only this host's.
            page_size: placements per call (0: the scheduler's default).
            timeout: seconds per page, instead of the client's ``timeout``.

        Raises:
            TesseraError: a page call failed, by its code (raised by the
                iteration; the placements of the pages before it were
                yielded).
        """
        request = scheduler_pb2.ListPlacementsRequest(
            tenant=tenant, host_id=host_id, page_size=page_size
        )
        return self._iterate(
            all_placements(
                self._stub,
                request,
                timeout=timeout or self._timeout,
                wait_for_ready=self._wait_for_ready,
            )
        )

    def list_hosts(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[scheduler_pb2.HostSummary]:
        """Every registered host, ordered by host id, page after page (see :meth:`list_placements`).

        Raises:
            TesseraError: a page call failed, by its code (raised by the
                iteration).
        """
        return self._iterate(
            all_hosts(
                self._stub,
                scheduler_pb2.ListHostsRequest(page_size=page_size),
                timeout=timeout or self._timeout,
                wait_for_ready=self._wait_for_ready,
            )
        )

    def explain(
        self, request: placement_pb2.PlacementRequest, *, timeout: float | None = None
    ) -> scheduler_pb2.ExplainResponse:
        """Where a request would go now, or why not (each filter's rejections); changes nothing.

        Raises:
            InvalidArgumentError: the request is wrong (``field_violations``).
            TesseraError: another failure, by its code.
        """
        return self._call(
            lambda: self._stub.Explain(
                scheduler_pb2.ExplainRequest(request=request),
                timeout=timeout or self._timeout,
                wait_for_ready=self._wait_for_ready,
            )
        )

    # -- lifetime -----------------------------------------------------------

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------

    @staticmethod
    def _call(call: Callable[[], T]) -> T:
        """Make one call; a gRPC failure becomes its :class:`TesseraError`."""
        try:
            return call()
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    @staticmethod
    def _iterate(items: Iterator[T]) -> Iterator[T]:
        """``items``, with a gRPC failure of any page raised as its :class:`TesseraError`."""
        try:
            yield from items
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err


def _with_request_id(request: placement_pb2.PlacementRequest) -> placement_pb2.PlacementRequest:
    """``request`` itself if it has a request id, else a copy with a fresh one."""
    if request.request_id:
        return request
    copy = placement_pb2.PlacementRequest()
    copy.CopyFrom(request)
    copy.request_id = f"client-{uuid.uuid4().hex}"
    return copy
