"""Thin gRPC servicers: parse, call the coordinator, translate errors."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import redis.exceptions

from scheduler.core.identity import PlacementId
from scheduler.core.plan import Unschedulable
from scheduler.service.convert import placement_from_plan
from scheduler.service.coordinator import PlacementCoordinator
from scheduler.service.errors import SchedulerError, status_of
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

T = TypeVar("T")


async def _call(context: Context, fn: Callable[[], Awaitable[T]]) -> T:
    """Run a use case; turn a domain failure into its status code."""
    try:
        return await fn()
    except (SchedulerError, ValueError) as err:  # InvalidRequestError is a ValueError
        await context.abort(status_of(err), str(err))
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
        log.warning("state store unavailable: %s", err)
        await context.abort(
            status_of(err), f"the state store is unavailable ({err}); nothing was done, retry"
        )
    except Exception:
        log.exception("internal error")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the scheduler log")
    raise AssertionError("unreachable: abort raises")


async def _require(context: Context, present: bool, field: str) -> None:
    """Abort with INVALID_ARGUMENT naming ``field`` unless it is present."""
    if not present:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: is required")


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    """The Scheduler service for frontends."""

    def __init__(self, coordinator: PlacementCoordinator) -> None:
        self._c = coordinator

    async def Place(  # noqa: N802 - gRPC method names are CamelCase
        self, request: scheduler_pb2.PlaceRequest, context: Context
    ) -> scheduler_pb2.PlaceResponse:
        """Place one request."""
        await _require(context, request.HasField("request"), "request")
        placement = await _call(context, lambda: self._c.place(request.request))
        return scheduler_pb2.PlaceResponse(placement=placement)

    async def PlaceBatch(  # noqa: N802
        self, request: scheduler_pb2.PlaceBatchRequest, context: Context
    ) -> scheduler_pb2.PlaceBatchResponse:
        """Place many requests jointly: one CP-SAT batch, gangs all or nothing."""
        await _require(context, len(request.requests) > 0, "requests")
        placements, unplaced = await _call(
            context,
            lambda: self._c.place_batch(list(request.requests), request.all_or_nothing),
        )
        return scheduler_pb2.PlaceBatchResponse(placements=placements, unplaced=unplaced)

    async def Release(  # noqa: N802
        self, request: scheduler_pb2.ReleaseRequest, context: Context
    ) -> scheduler_pb2.ReleaseResponse:
        """Release a placement."""
        await _require(context, bool(request.placement_id or request.request_id), "placement_id")
        placement = await _call(
            context, lambda: self._c.release(request.placement_id, request.request_id)
        )
        return scheduler_pb2.ReleaseResponse(placement=placement)

    async def GetPlacement(  # noqa: N802
        self, request: scheduler_pb2.GetPlacementRequest, context: Context
    ) -> placement_pb2.Placement:
        """Look a placement up."""
        await _require(context, bool(request.placement_id or request.request_id), "placement_id")
        return await _call(context, lambda: self._c.get(request.placement_id, request.request_id))

    async def ListPlacements(  # noqa: N802
        self, request: scheduler_pb2.ListPlacementsRequest, context: Context
    ) -> scheduler_pb2.ListPlacementsResponse:
        """List placements."""
        rows = await _call(
            context, lambda: self._c.list_placements(request.tenant, request.host_id)
        )
        return scheduler_pb2.ListPlacementsResponse(placements=rows)

    async def Explain(  # noqa: N802
        self, request: scheduler_pb2.ExplainRequest, context: Context
    ) -> scheduler_pb2.ExplainResponse:
        """Dry run."""
        await _require(context, request.HasField("request"), "request")
        result = await _call(context, lambda: self._c.explain(request.request))
        if isinstance(result, Unschedulable):
            by_plugin: dict[str, list[str]] = defaultdict(list)
            totals: dict[str, int] = defaultdict(int)
            for r in result.rejections:
                by_plugin[r.plugin].append(f"{r.reason}: {r.count}")
                totals[r.plugin] += r.count
            return scheduler_pb2.ExplainResponse(
                placeable=False,
                summary=result.summary,
                verdicts=[
                    scheduler_pb2.FilterVerdict(plugin=p, rejected=totals[p], reasons=reasons)
                    for p, reasons in sorted(by_plugin.items())
                ],
            )
        placement = placement_from_plan(
            result, placement_id=PlacementId(""), request=request.request, now_ms=0
        )
        placement.message = "would be placed here (nothing reserved)"
        return scheduler_pb2.ExplainResponse(
            placeable=True,
            placement=placement,
            summary=f"fits on {result.host_id} with score {result.score}",
            # Why this host: each scorer's contribution, as a verdict that
            # rejected nothing.
            verdicts=[
                scheduler_pb2.FilterVerdict(plugin=line.split(" ", 1)[0], reasons=[line])
                for line in result.reasons
            ],
        )

    async def ListHosts(  # noqa: N802
        self, request: scheduler_pb2.ListHostsRequest, context: Context
    ) -> scheduler_pb2.ListHostsResponse:
        """List registered hosts."""
        return scheduler_pb2.ListHostsResponse(hosts=await _call(context, self._c.hosts))


class RegistryServicer(scheduler_pb2_grpc.RegistryServicer):
    """The Registry service for agents."""

    def __init__(self, coordinator: PlacementCoordinator) -> None:
        self._c = coordinator

    async def Register(  # noqa: N802
        self, request: scheduler_pb2.RegisterRequest, context: Context
    ) -> scheduler_pb2.RegisterResponse:
        """Record a host's inventory and its agent's address."""
        await _require(context, bool(request.inventory.host_id), "inventory.host_id")
        await _require(context, bool(request.inventory.boot_id), "inventory.boot_id")
        await _require(context, bool(request.agent_address), "agent_address")
        await _call(context, lambda: self._c.register(request.inventory, request.agent_address))
        leases = self._c.leases
        return scheduler_pb2.RegisterResponse(
            heartbeat_interval_s=leases.heartbeat_interval_s, lease_s=leases.lease_s
        )

    async def Heartbeat(  # noqa: N802
        self, request: scheduler_pb2.HeartbeatRequest, context: Context
    ) -> scheduler_pb2.HeartbeatResponse:
        """Renew a host's lease."""
        await _require(context, bool(request.host_id), "host_id")
        inventory = request.inventory if request.HasField("inventory") else None
        known = await _call(
            context, lambda: self._c.heartbeat(request.host_id, request.boot_id, inventory)
        )
        return scheduler_pb2.HeartbeatResponse(reregister=not known)
