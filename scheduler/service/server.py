"""The scheduler's gRPC server: its two services, health and reflection."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tessera.keepalive import KEEPALIVE
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.operator_config import OperatorConfig
from tessera.scheduler.service.servicers import PlaceObserver, RegistryServicer, SchedulerServicer
from tessera.security.audit import AuditLog
from tessera.security.interceptor import AccessInterceptor
from tessera.security.policy import RULES, AccessPolicy
from tessera.security.tls import TlsDir
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

SERVICE_NAMES = (
    scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
    scheduler_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
)


def audit_resources(request: Any, response: Any) -> dict[str, object]:
    """The ids an audit record of a Scheduler or Registry call names."""
    out: dict[str, object] = {}
    if isinstance(request, scheduler_pb2.PlaceRequest | scheduler_pb2.ExplainRequest):
        out = {"tenant": request.request.tenant, "request_id": request.request.request_id}
    elif isinstance(request, scheduler_pb2.PlaceBatchRequest):
        out = {
            "tenants": sorted({r.tenant for r in request.requests})[:16],
            "requests": len(request.requests),
        }
    elif isinstance(request, scheduler_pb2.RegisterRequest):
        out = {
            "host_id": request.inventory.host_id,
            "boot_id": request.inventory.boot_id,
            "agent_address": request.agent_address,
        }
    else:
        for name in ("placement_id", "request_id", "host_id", "tenant"):
            value = getattr(request, name, "")
            if isinstance(value, str) and value:
                out[name] = value
    placement = getattr(response, "placement", None)
    if isinstance(placement, placement_pb2.Placement) and placement.placement_id:
        out.update(
            placement_id=placement.placement_id, host_id=placement.host_id, tenant=placement.tenant
        )
    if isinstance(response, scheduler_pb2.PlaceBatchResponse):
        out["placement_ids"] = [p.placement_id for p in response.placements][:64]
    if isinstance(response, scheduler_pb2.DrainHostResponse):
        out["released"] = [p.placement_id for p in response.released][:64]
        out["not_released"] = [f.placement_id for f in response.failed][:64]
    if isinstance(response, scheduler_pb2.ForgetHostResponse):
        out["dropped"] = list(response.dropped_placement_ids)[:64]
    return out


async def build_server(
    coordinator: PlacementCoordinator,
    listen: str,
    *,
    tls: TlsDir | None = None,
    audit: AuditLog | None = None,
    operator: OperatorConfig | None = None,
    observe_place: PlaceObserver | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Create (not start) the server.

    Args:
        coordinator: the use cases.
        listen: host:port (port 0 picks one).
        tls: mutual TLS; None serves plaintext (development: see
            :func:`tessera.security.tls.check_listen`).
        audit: where audit records go (default: nowhere).
        operator: the operator's frontend grants and host labels.
        observe_place: told of each Place call (the metrics); None: nobody.

    Returns:
        The server, the port it bound (``listen`` may ask for port 0), and the
        health servicer, so the caller can flip it to NOT_SERVING on shutdown.
    """
    operator = operator or OperatorConfig()
    interceptor = AccessInterceptor(
        AccessPolicy(frontend_grants=operator.frontend_grants),
        tls=tls is not None,
        audit=audit or AuditLog(None, "scheduler"),
        resources={method: audit_resources for method in RULES},
    )
    server = grpc.aio.server(interceptors=[interceptor], options=KEEPALIVE.server_options())
    servicer = (
        SchedulerServicer(coordinator, observe_place)
        if observe_place is not None
        else SchedulerServicer(coordinator)
    )
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    scheduler_pb2_grpc.add_RegistryServicer_to_server(
        RegistryServicer(coordinator, operator), server
    )
    # The asyncio servicer: the blocking one holds a worker thread for every
    # Watch stream, even a cancelled one, until the few threads are gone.
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (*SERVICE_NAMES, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if tls is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, tls.server_credentials())
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return server, port, health_servicer
