"""Thin gRPC servicers: parse, call the coordinator, translate errors.

A placement request is converted to the domain here, once
(:func:`~scheduler.service.convert.submitted`), and the use cases see only
the domain request with its fingerprint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

import grpc
import redis.exceptions

from tessera.scheduler.core.plan import Plan, Unschedulable
from tessera.scheduler.core.request import PlacementRequest
from tessera.scheduler.core.validation import FieldViolation, validate_identifier
from tessera.scheduler.presentation import form_of
from tessera.scheduler.service.convert import (
    explain_response,
    parsed_request,
    submitted,
    submitted_batch,
)
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.errors import (
    SchedulerError,
    field_violations,
    status_of,
    status_trailer,
)
from tessera.scheduler.service.operator_config import OperatorConfig
from tessera.scheduler.service.page_tokens import (
    Listing,
    PageRequest,
    encode,
    filters_digest,
    last_key,
    page_size,
)
from tessera.security.interceptor import current_principal
from tessera.security.policy import AccessDeniedError, require_owner
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

T = TypeVar("T")

#: Most bytes of status details as gRPC sends them. Details travel in
#: trailing metadata, percent-encoded (a byte outside printable ASCII takes
#: three), and a client refuses metadata past its limit (8 KiB by default)
#: with RESOURCE_EXHAUSTED instead of the status the server meant.
MAX_DETAILS_BYTES = 2048


def _details(text: str) -> str:
    """``text`` cut so that it stays within :data:`MAX_DETAILS_BYTES` on the wire."""
    budget = MAX_DETAILS_BYTES - 64  # room for the note saying where it was cut
    size = 0
    for i, ch in enumerate(text):
        size += 1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode(errors="replace"))
        if size > budget:
            return f"{text[:i]}… (cut at {i:,} of {len(text):,} characters)"
    return text


async def _abort(
    context: Context,
    code: grpc.StatusCode,
    message: str,
    violations: Sequence[FieldViolation] = (),
) -> NoReturn:
    """End the call with ``code`` and ``message``; with violations, a BadRequest beside it.

    The one way a servicer fails a call: the message cut to
    :data:`MAX_DETAILS_BYTES`, and the same message inside the
    ``google.rpc.Status`` that carries the violations.
    """
    details = _details(message)
    await context.abort(code, details, status_trailer(code, details, violations))
    raise AssertionError("unreachable: abort raises")


async def _call(context: Context, fn: Callable[[], Awaitable[T]]) -> T:
    """Run a use case; turn a domain failure into its status code."""
    try:
        return await fn()
    # InvalidRequestError is a ValueError; AccessDeniedError the OWNER scope's refusal.
    except (SchedulerError, AccessDeniedError, ValueError) as err:
        await _abort(context, status_of(err), str(err), field_violations(err))
    except redis.exceptions.RedisError as err:
        if status_of(err) is not grpc.StatusCode.UNAVAILABLE:
            log.exception("internal error")
            await _abort(context, grpc.StatusCode.INTERNAL, "internal error; see the scheduler log")
        # Unreachable, or between primaries (NOREPLICAS, READONLY, ...).
        log.warning("state store unavailable: %s", err)
        await _abort(
            context,
            grpc.StatusCode.UNAVAILABLE,
            f"the state store is unavailable ({err}); nothing was done, retry",
        )
    except Exception:
        log.exception("internal error")
        await _abort(context, grpc.StatusCode.INTERNAL, "internal error; see the scheduler log")


async def _require(context: Context, present: bool, field: str) -> None:
    """Abort with INVALID_ARGUMENT naming ``field`` unless it is present."""
    if not present:
        violation = FieldViolation(field, "is required")
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(violation), [violation])


def _page(page_token: str, size: int, listing: Listing, filters: str) -> PageRequest:
    """Where a page a request asks for starts, and how long it may be.

    Raises:
        InvalidRequestError: a negative size; a token that is malformed, of
            the other list, of other filters or of another version.
    """
    return PageRequest(size=page_size(size), after=last_key(page_token, listing, filters))


class PlaceObserver(Protocol):
    """Told of each Place call: how long it took, its status code name, the form placed."""

    def __call__(self, seconds: float, outcome: str, form: str, /) -> None:
        """Record one call."""


def _ignore(seconds: float, outcome: str, form: str, /) -> None:
    return None


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    """The Scheduler service for frontends.

    Args:
        coordinator: the use cases.
        observe_place: told of each Place call (the metrics).
    """

    def __init__(
        self, coordinator: PlacementCoordinator, observe_place: PlaceObserver = _ignore
    ) -> None:
        self._c = coordinator
        self._observe_place = observe_place

    async def _owned(
        self, placement_id: str, request_id: str, tenant: str
    ) -> placement_pb2.Placement:
        """The placement, if the caller acts for its tenant (the policy's OWNER scope).

        Raises:
            PlacementNotFoundError: there is none.
            AccessDeniedError: it belongs to a tenant the caller does not act for.
        """
        placement = await self._c.get(placement_id, request_id, tenant)
        require_owner(
            current_principal(), placement.tenant, f"placement {placement_id or request_id}"
        )
        return placement

    async def Place(  # noqa: N802 - gRPC method names are CamelCase
        self, request: scheduler_pb2.PlaceRequest, context: Context
    ) -> scheduler_pb2.PlaceResponse:
        """Place one request."""
        started = time.perf_counter()
        outcome, form = "UNKNOWN", ""
        try:
            await _require(context, request.HasField("request"), "request")
            placement = await _call(
                context, lambda: self._c.placer.place(submitted(request.request))
            )
            outcome, form = "OK", form_of(placement)
            return scheduler_pb2.PlaceResponse(placement=placement)
        except BaseException:
            code = context.code()
            outcome = code.name if isinstance(code, grpc.StatusCode) else "CANCELLED"
            raise
        finally:
            self._observe_place(time.perf_counter() - started, outcome, form)

    async def PlaceBatch(  # noqa: N802
        self, request: scheduler_pb2.PlaceBatchRequest, context: Context
    ) -> scheduler_pb2.PlaceBatchResponse:
        """Place many requests jointly: one CP-SAT batch, gangs all or nothing."""
        await _require(context, len(request.requests) > 0, "requests")
        placements, unplaced = await _call(
            context,
            lambda: self._c.batches.place(
                submitted_batch(request.requests), request.all_or_nothing
            ),
        )
        return scheduler_pb2.PlaceBatchResponse(placements=placements, unplaced=unplaced)

    async def Release(  # noqa: N802
        self, request: scheduler_pb2.ReleaseRequest, context: Context
    ) -> scheduler_pb2.ReleaseResponse:
        """Release a placement."""
        await _require(context, bool(request.placement_id or request.request_id), "placement_id")

        async def release() -> placement_pb2.Placement:
            # Owner first: the placement's tenant never changes, so the id
            # checked here is the one released.
            owned = await self._owned(request.placement_id, request.request_id, request.tenant)
            return await self._c.release(owned.placement_id, "")

        placement = await _call(context, release)
        return scheduler_pb2.ReleaseResponse(placement=placement)

    async def GetPlacement(  # noqa: N802
        self, request: scheduler_pb2.GetPlacementRequest, context: Context
    ) -> placement_pb2.Placement:
        """Look a placement up."""
        await _require(context, bool(request.placement_id or request.request_id), "placement_id")
        return await _call(
            context, lambda: self._owned(request.placement_id, request.request_id, request.tenant)
        )

    async def ListPlacements(  # noqa: N802
        self, request: scheduler_pb2.ListPlacementsRequest, context: Context
    ) -> scheduler_pb2.ListPlacementsResponse:
        """One page of placements, ordered by host id, then placement id."""
        filters = filters_digest(request.tenant, request.host_id)
        # The policy checked a named tenant; an empty filter lists only the
        # tenants this caller acts for (applied before the page is cut, so
        # pages are full whatever the caller may not see).
        caller = current_principal()

        async def page() -> tuple[list[placement_pb2.Placement], str]:
            wanted = _page(request.page_token, request.page_size, Listing.PLACEMENTS, filters)
            return await self._c.placements_page(
                request.tenant, request.host_id, wanted, caller.acts_for
            )

        rows, after = await _call(context, page)
        return scheduler_pb2.ListPlacementsResponse(
            placements=rows, next_page_token=encode(Listing.PLACEMENTS, filters, after)
        )

    async def Explain(  # noqa: N802
        self, request: scheduler_pb2.ExplainRequest, context: Context
    ) -> scheduler_pb2.ExplainResponse:
        """Dry run."""
        await _require(context, request.HasField("request"), "request")

        async def explain() -> tuple[PlacementRequest, Plan | Unschedulable]:
            domain = parsed_request(request.request)
            return domain, await self._c.placer.explain(domain)

        domain, result = await _call(context, explain)
        return explain_response(domain, result)

    async def ListHosts(  # noqa: N802
        self, request: scheduler_pb2.ListHostsRequest, context: Context
    ) -> scheduler_pb2.ListHostsResponse:
        """One page of registered hosts, ordered by host id."""
        filters = filters_digest()

        async def page() -> tuple[list[scheduler_pb2.HostSummary], str]:
            wanted = _page(request.page_token, request.page_size, Listing.HOSTS, filters)
            return await self._c.hosts_page(wanted)

        hosts, after = await _call(context, page)
        if not current_principal().reads_everything:
            # Frontends see capacity, not where agents listen or what they run.
            for host in hosts:
                host.ClearField("agent_address")
                host.ClearField("boot_id")
                host.ClearField("labels")
                host.ClearField("cordoned_by")
        return scheduler_pb2.ListHostsResponse(
            hosts=hosts, next_page_token=encode(Listing.HOSTS, filters, after)
        )

    # -- host administration (admin only: see tessera.security.policy) ------

    @staticmethod
    def _who(context: Context) -> str:
        """The caller, as a cordon and the log record it (``admin/alice``)."""
        identity = current_principal().identity
        # A plaintext (development) server has no identities: name the peer.
        return str(identity) if identity else f"unauthenticated {context.peer()}"

    @staticmethod
    async def _host_id(context: Context, host_id: str) -> None:
        """Abort with INVALID_ARGUMENT unless ``host_id`` can name a host."""
        if violations := validate_identifier(host_id, "host_id"):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(violations[0]), violations)

    async def CordonHost(  # noqa: N802
        self, request: scheduler_pb2.CordonHostRequest, context: Context
    ) -> scheduler_pb2.HostSummary:
        """Take a host out of scheduling; its placements stay."""
        await self._host_id(context, request.host_id)
        who = self._who(context)
        return await _call(context, lambda: self._c.cordon(request.host_id, request.reason, who))

    async def UncordonHost(  # noqa: N802
        self, request: scheduler_pb2.UncordonHostRequest, context: Context
    ) -> scheduler_pb2.HostSummary:
        """Let new placements land on a host again."""
        await self._host_id(context, request.host_id)
        who = self._who(context)
        return await _call(context, lambda: self._c.uncordon(request.host_id, who))

    async def DrainHost(  # noqa: N802
        self, request: scheduler_pb2.DrainHostRequest, context: Context
    ) -> scheduler_pb2.DrainHostResponse:
        """Cordon a host and release every placement on it."""
        await self._host_id(context, request.host_id)
        who = self._who(context)
        host, released, failed = await _call(
            context, lambda: self._c.drain(request.host_id, request.reason, who)
        )
        return scheduler_pb2.DrainHostResponse(host=host, released=released, failed=failed)

    async def ForgetHost(  # noqa: N802
        self, request: scheduler_pb2.ForgetHostRequest, context: Context
    ) -> scheduler_pb2.ForgetHostResponse:
        """Remove a host (and, forced, its placements) from the store."""
        await self._host_id(context, request.host_id)
        who = self._who(context)
        dropped = await _call(context, lambda: self._c.forget(request.host_id, request.force, who))
        return scheduler_pb2.ForgetHostResponse(
            host_id=request.host_id, dropped_placement_ids=dropped
        )


class RegistryServicer(scheduler_pb2_grpc.RegistryServicer):
    """The Registry service for agents.

    The access policy lets an agent speak only for the host in its
    certificate; the labels that select placement are the operator's (see
    :class:`OperatorConfig`), applied to every inventory before it is stored.
    """

    def __init__(
        self, coordinator: PlacementCoordinator, operator: OperatorConfig | None = None
    ) -> None:
        self._c = coordinator
        self._operator = operator or OperatorConfig()

    async def Register(  # noqa: N802
        self, request: scheduler_pb2.RegisterRequest, context: Context
    ) -> scheduler_pb2.RegisterResponse:
        """Record a host's inventory and its agent's address."""
        await _require(context, bool(request.inventory.host_id), "inventory.host_id")
        await _require(context, bool(request.inventory.boot_id), "inventory.boot_id")
        await _require(context, bool(request.agent_address), "agent_address")
        self._operator.apply(request.inventory)
        await _call(context, lambda: self._c.register(request.inventory, request.agent_address))
        leases = self._c.leases
        return scheduler_pb2.RegisterResponse(
            heartbeat_interval_s=leases.heartbeat_interval_s,
            lease_s=leases.lease_s,
            fence=await _call(context, self._c.fence),
        )

    async def Heartbeat(  # noqa: N802
        self, request: scheduler_pb2.HeartbeatRequest, context: Context
    ) -> scheduler_pb2.HeartbeatResponse:
        """Renew a host's lease."""
        await _require(context, bool(request.host_id), "host_id")
        inventory = request.inventory if request.HasField("inventory") else None
        if inventory is not None:
            self._operator.apply(inventory)
        known = await _call(
            context, lambda: self._c.heartbeat(request.host_id, request.boot_id, inventory)
        )
        return scheduler_pb2.HeartbeatResponse(
            reregister=not known, fence=await _call(context, self._c.fence)
        )
