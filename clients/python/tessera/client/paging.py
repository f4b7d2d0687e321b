"""Every item of a paginated list, one call per page, on any blocking Scheduler stub.

ListPlacements and ListHosts answer a page at a time (AIP-158): at most
``page_size`` items (0: the scheduler's default of 500, at most 1,000) and a
``next_page_token`` that is empty on the last page. A page may be short, even
empty, while more follow: only the token says whether the list goes on.
These helpers follow the tokens for callers that hold a raw stub (the
``tessera`` CLI, scripts); :class:`tessera.client.Client` uses them too.
They raise what the stub raises (:class:`grpc.RpcError`) and give each page
call its own deadline.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from tessera.client.errors import PagingError
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc


def _check_progress(sent: str, received: str, method: str) -> None:
    """Refuse a token that would ask for the same page again (the loop would not end)."""
    if received and received == sent:
        raise PagingError(
            grpc.StatusCode.INTERNAL, f"{method} answered page token {received[:32]!r} again"
        )


def all_placements(
    stub: scheduler_pb2_grpc.SchedulerStub,
    request: scheduler_pb2.ListPlacementsRequest | None = None,
    *,
    timeout: float | None,
    wait_for_ready: bool | None = None,
) -> Iterator[placement_pb2.Placement]:
    """Every placement the request's filters match, ordered by host id, then placement id.

    Args:
        stub: a blocking Scheduler stub.
        request: the filters (tenant, host_id) and page_size; its page_token
            is where the first page starts (usually empty). Not modified.
        timeout: seconds each page call may take.
        wait_for_ready: passed to each call (see gRPC's wait_for_ready).

    Yields:
        Placements, a page's worth fetched at a time.

    Raises:
        grpc.RpcError: a page call failed (the pages before it were yielded).
        PagingError: the scheduler answered with the token it was sent.
    """
    page = scheduler_pb2.ListPlacementsRequest()
    if request is not None:
        page.CopyFrom(request)
    while True:
        response = stub.ListPlacements(page, timeout=timeout, wait_for_ready=wait_for_ready)
        yield from response.placements
        if not response.next_page_token:
            return
        _check_progress(page.page_token, response.next_page_token, "ListPlacements")
        page.page_token = response.next_page_token


def all_hosts(
    stub: scheduler_pb2_grpc.SchedulerStub,
    request: scheduler_pb2.ListHostsRequest | None = None,
    *,
    timeout: float | None,
    wait_for_ready: bool | None = None,
) -> Iterator[scheduler_pb2.HostSummary]:
    """Every registered host, ordered by host id (see :func:`all_placements` for the arguments).

    Raises:
        grpc.RpcError: a page call failed (the pages before it were yielded).
        PagingError: the scheduler answered with the token it was sent.
    """
    page = scheduler_pb2.ListHostsRequest()
    if request is not None:
        page.CopyFrom(request)
    while True:
        response = stub.ListHosts(page, timeout=timeout, wait_for_ready=wait_for_ready)
        yield from response.hosts
        if not response.next_page_token:
            return
        _check_progress(page.page_token, response.next_page_token, "ListHosts")
        page.page_token = response.next_page_token
