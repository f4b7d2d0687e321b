"""How the scheduler reaches agents: the Agent gRPC service, one channel per host."""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import grpc

from tessera.security.identity import IdentityError, agent_dns_name
from tessera.security.tls import ChannelCache
from tessera.v1 import agent_pb2, agent_pb2_grpc, placement_pb2


class AgentCallError(Exception):
    """An agent call failed; carries the agent's status and message."""

    def __init__(self, address: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"agent {address}: {code.name}: {message}")
        self.code = code
        self.message = message


class AgentGateway(Protocol):
    """Carries placements out on hosts."""

    async def prepare(
        self, address: str, placement: placement_pb2.Placement
    ) -> placement_pb2.Placement:
        """Have the agent at ``address`` carry the placement out."""
        ...

    async def unprepare(self, address: str, placement: placement_pb2.Placement) -> None:
        """Have the agent at ``address`` tear the placement down."""
        ...


class HousekeepingGateway(AgentGateway, Protocol):
    """What the scheduler's background jobs need of agents, fenced by their term."""

    async def get_state(self, address: str, host_id: str) -> list[str]:
        """Placement ids the agent of ``host_id`` at ``address`` holds prepared."""
        ...

    async def prepare_fenced(
        self, address: str, placement: placement_pb2.Placement, fencing_token: int
    ) -> placement_pb2.Placement:
        """Prepare, as a background job of term ``fencing_token``."""
        ...

    async def unprepare_fenced(
        self, address: str, placement: placement_pb2.Placement, fencing_token: int
    ) -> None:
        """Unprepare, as a background job of term ``fencing_token``."""
        ...


class GrpcAgentGateway:
    """Talks to agents over gRPC with a deadline per call.

    With TLS, each call checks the agent at the address is the one certified
    for the placement's host (``<host>.agent.tessera``): a host that advertised
    another host's agent address gets nothing prepared there.

    Args:
        channels: channels by address (TLS or plaintext, rotating).
        timeout_s: deadline of one Prepare or Unprepare; binding a device can
            take seconds (a driver's remove path), so this is generous.
        state_timeout_s: deadline of GetState (the agent discovers its host
            for it): under the housekeeper's lease (10 s at least), so one
            agent that never answers cannot make the reaper lose its lease at
            every round.
    """

    def __init__(
        self, channels: ChannelCache, timeout_s: float = 30.0, state_timeout_s: float = 8.0
    ) -> None:
        self._timeout_s = timeout_s
        self._state_timeout_s = state_timeout_s
        self._channels = channels
        #: Failed calls so far, by (method, status code name): for /metrics.
        self.errors: Counter[tuple[str, str]] = Counter()

    def _failed(self, method: str, address: str, err: grpc.aio.AioRpcError) -> AgentCallError:
        """The error of a failed call, counted."""
        self.errors[(method, err.code().name)] += 1
        return AgentCallError(address, err.code(), err.details() or "")

    def _channel(self, address: str, host_id: str) -> grpc.aio.Channel:
        """The channel to the agent of ``host_id`` at ``address``.

        Raises:
            AgentCallError: the host id cannot name an agent identity (only a
                plaintext scheduler can have registered such a host).
        """
        try:
            server_name = agent_dns_name(host_id)
        except IdentityError as err:
            raise AgentCallError(
                address, grpc.StatusCode.FAILED_PRECONDITION, f"host id: {err}"
            ) from None
        return self._channels.get(address, server_name)

    def _stub(self, address: str, host_id: str) -> agent_pb2_grpc.AgentAsyncStub:
        """A stub for the agent of ``host_id`` at ``address`` (see :meth:`_channel`)."""
        return agent_pb2_grpc.AgentStub(self._channel(address, host_id))

    @property
    def channel_limit(self) -> int:
        """Agents whose channels are kept at most (see :class:`ChannelCache`)."""
        return self._channels.limit

    def connect(self, address: str, host_id: str) -> grpc.ChannelConnectivity:
        """Have the channel to ``host_id``'s agent connect, if it is not connected.

        Returns at once: gRPC connects in the background.

        Returns:
            The channel's state when asked (READY: connected already).

        Raises:
            AgentCallError: the host id cannot name an agent identity.
        """
        return self._channel(address, host_id).get_state(try_to_connect=True)

    async def prepare(
        self, address: str, placement: placement_pb2.Placement
    ) -> placement_pb2.Placement:
        """Call Agent.Prepare.

        Raises:
            AgentCallError: the call failed or timed out.
        """
        return await self.prepare_fenced(address, placement, 0)

    async def prepare_fenced(
        self, address: str, placement: placement_pb2.Placement, fencing_token: int
    ) -> placement_pb2.Placement:
        """Call Agent.Prepare with a background job's fencing token.

        Raises:
            AgentCallError: the call failed or timed out.
        """
        request = agent_pb2.PrepareRequest(placement=placement, fencing_token=fencing_token)
        try:
            stub = self._stub(address, placement.host_id)
            response: agent_pb2.PrepareResponse = await stub.Prepare(
                request, timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as err:
            raise self._failed("Prepare", address, err) from err
        return response.placement

    async def unprepare(self, address: str, placement: placement_pb2.Placement) -> None:
        """Call Agent.Unprepare.

        Raises:
            AgentCallError: the call failed or timed out.
        """
        await self.unprepare_fenced(address, placement, 0)

    async def unprepare_fenced(
        self, address: str, placement: placement_pb2.Placement, fencing_token: int
    ) -> None:
        """Call Agent.Unprepare with a background job's fencing token.

        Raises:
            AgentCallError: the call failed or timed out.
        """
        request = agent_pb2.UnprepareRequest(placement=placement, fencing_token=fencing_token)
        try:
            await self._stub(address, placement.host_id).Unprepare(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as err:
            raise self._failed("Unprepare", address, err) from err

    async def get_state(self, address: str, host_id: str) -> list[str]:
        """Call Agent.GetState: the placement ids the host holds prepared.

        Raises:
            AgentCallError: the call failed or timed out.
        """
        try:
            response: agent_pb2.GetStateResponse = await self._stub(address, host_id).GetState(
                agent_pb2.GetStateRequest(), timeout=self._state_timeout_s
            )
        except grpc.aio.AioRpcError as err:
            raise self._failed("GetState", address, err) from err
        return list(response.prepared_placements)

    async def close(self) -> None:
        """Close every channel."""
        await self._channels.close()
