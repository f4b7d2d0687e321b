"""The scheduler's gRPC server: its two services, health and reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scheduler.service.coordinator import PlacementCoordinator
from scheduler.service.servicers import RegistryServicer, SchedulerServicer
from tessera.v1 import scheduler_pb2, scheduler_pb2_grpc

SERVICE_NAMES = (
    scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
    scheduler_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
)


def build_server(
    coordinator: PlacementCoordinator, listen: str
) -> tuple[grpc.aio.Server, int, health.HealthServicer]:
    """Create (not start) the server.

    Returns:
        The server, the port it bound (``listen`` may ask for port 0), and the
        health servicer, so the caller can flip it to NOT_SERVING on shutdown.
    """
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(coordinator), server)
    scheduler_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(coordinator), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (*SERVICE_NAMES, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return server, port, health_servicer
