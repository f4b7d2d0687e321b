"""The scheduler's way to agents: which agent it accepts at an address."""

from __future__ import annotations

import grpc
import pytest

from tessera.scheduler.service.agent_gateway import AgentCallError, GrpcAgentGateway
from tessera.security.tls import ChannelCache
from tessera.v1 import placement_pb2

from ...conftest import Runner


def test_a_host_id_that_cannot_name_an_agent_identity_fails_the_call_not_the_job(
    arun: Runner,
) -> None:
    # A plaintext scheduler accepts host ids like "rack/7"; no agent
    # certificate can name one, so the call fails as a host failure would.
    gateway = GrpcAgentGateway(ChannelCache(None))
    placement = placement_pb2.Placement(placement_id="pl-x@rack/7", host_id="rack/7")

    async def body() -> None:
        try:
            with pytest.raises(AgentCallError) as err:
                await gateway.prepare("127.0.0.1:1", placement)
            assert err.value.code is grpc.StatusCode.FAILED_PRECONDITION
            assert "host id" in err.value.message
            with pytest.raises(AgentCallError):
                await gateway.get_state("127.0.0.1:1", "rack/7")
        finally:
            await gateway.close()

    arun(body())
