"""A synchronous handle on an AgentServicer served over real gRPC, for readable tests.

The server and the channel live on the test's event loop (the ``arun``
fixture); each call runs the loop until its answer arrives, which also lets
the server serve it.
"""

from __future__ import annotations

import grpc

from tessera.agent.service import AgentServicer
from tessera.v1 import agent_pb2, agent_pb2_grpc, placement_pb2

from ..conftest import Runner


class AgentClient:
    """Prepare and Unprepare one agent, as the scheduler would."""

    def __init__(self, arun: Runner, servicer: AgentServicer) -> None:
        self._arun = arun

        async def start() -> tuple[grpc.aio.Server, grpc.aio.Channel]:
            # gRPC's asyncio objects belong to the loop running when they are made.
            server = grpc.aio.server()
            agent_pb2_grpc.add_AgentServicer_to_server(servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")

        self._server, self._channel = arun(start())
        self._stub = agent_pb2_grpc.AgentStub(self._channel)

    def close(self) -> None:
        """Close the channel and stop the server."""
        self._arun(self._channel.close())
        self._arun(self._server.stop(None))

    def prepare(
        self, placement: placement_pb2.Placement, fencing_token: int = 0
    ) -> placement_pb2.Placement:
        """Prepare; the placement as the agent answered it."""
        request = agent_pb2.PrepareRequest(placement=placement, fencing_token=fencing_token)

        async def call() -> agent_pb2.PrepareResponse:
            return await self._stub.Prepare(request)

        return self._arun(call()).placement

    def unprepare(self, placement_id: str, fencing_token: int = 0) -> None:
        """Unprepare."""
        request = agent_pb2.UnprepareRequest(
            placement=placement_pb2.Placement(placement_id=placement_id),
            fencing_token=fencing_token,
        )

        async def call() -> None:
            await self._stub.Unprepare(request)

        self._arun(call())

    def refusal(self, placement: placement_pb2.Placement) -> tuple[grpc.StatusCode, str]:
        """Prepare a placement that must fail; its status code and details."""
        try:
            self.prepare(placement)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
        raise AssertionError(f"placement {placement.placement_id} was prepared")

    def prepared(self) -> list[str]:
        """The placements the agent reports as prepared."""

        async def call() -> agent_pb2.GetStateResponse:
            return await self._stub.GetState(agent_pb2.GetStateRequest())

        return list(self._arun(call()).prepared_placements)
