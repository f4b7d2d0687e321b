"""Keeps the scheduler informed: register, then heartbeat with leases."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from tessera.agent.reporter import HostReporter
from tessera.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

#: Retry delays while the scheduler is unreachable, capped.
_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


class RegistrationLoop:
    """Registers the host and heartbeats until stopped.

    A heartbeat carries the inventory only when discovery found a change; the
    scheduler answering ``reregister`` (it lost the host, or the boot changed)
    sends the agent back to Register.

    Args:
        channel: gives the channel to the scheduler for each call (a new one
            once the TLS files rotate).
        reporter: discovers the host.
        agent_address: where this agent's Agent service listens.
        debounce_s: after a poke, wait this long before reporting, so a burst
            of host operations costs one discovery, not one each (discovery
            reads the whole tree; allocations are already in the store).
    """

    def __init__(
        self,
        channel: Callable[[], grpc.aio.Channel],
        reporter: HostReporter,
        agent_address: str,
        debounce_s: float = 1.0,
    ) -> None:
        self._channel = channel
        self._reporter = reporter
        self._address = agent_address
        self._interval_s = 5.0
        self._debounce_s = debounce_s
        self._wake = asyncio.Event()
        self.registered = asyncio.Event()
        #: Told the newest fencing token the scheduler reports (the servicer
        #: bounds the tokens it accepts by it).
        self.on_fence: Callable[[int], None] = lambda token: None

    def _stub(self) -> scheduler_pb2_grpc.RegistryAsyncStub:
        return scheduler_pb2_grpc.RegistryStub(self._channel())

    def poke(self) -> None:
        """Report now instead of at the next interval (the host just changed)."""
        self._wake.set()

    async def _register(self) -> None:
        inventory, _ = await asyncio.to_thread(self._reporter.report)
        response = await self._stub().Register(
            scheduler_pb2.RegisterRequest(inventory=inventory, agent_address=self._address),
            timeout=10,
        )
        self._interval_s = float(response.heartbeat_interval_s or 5)
        self.on_fence(response.fence)
        log.info(
            "registered %s (generation %d) with the scheduler",
            inventory.host_id,
            inventory.generation,
        )
        self.registered.set()

    async def _heartbeat(self) -> bool:
        inventory, changed = await asyncio.to_thread(self._reporter.report)
        request = scheduler_pb2.HeartbeatRequest(
            host_id=inventory.host_id, boot_id=inventory.boot_id, generation=inventory.generation
        )
        if changed:
            request.inventory.CopyFrom(inventory)
        response = await self._stub().Heartbeat(request, timeout=10)
        self.on_fence(response.fence)
        return not response.reregister

    async def run(self, stop: asyncio.Event) -> None:
        """Register and heartbeat until ``stop`` is set."""
        attempt = 0
        need_register = True
        while not stop.is_set():
            try:
                if need_register:
                    await self._register()
                    need_register = False
                elif not await self._heartbeat():
                    need_register = True
                    continue
                attempt = 0
                delay = self._interval_s
            except grpc.aio.AioRpcError as err:
                delay = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
                attempt += 1
                log.warning("scheduler unreachable (%s); retrying in %.1fs", err.code().name, delay)
            self._wake.clear()
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            _, pending = await asyncio.wait(
                waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            if self._wake.is_set() and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self._debounce_s)
