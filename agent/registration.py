"""Keeps the scheduler informed: register, then heartbeat with leases."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
import tenacity

from tessera.agent.reporter import HostReporter
from tessera.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

#: The waits while the scheduler is unreachable: exponential from 0.2 s, capped
#: at 5 s, each a random fraction of that ("full jitter"), so a fleet of agents
#: that lost their scheduler together do not all come back in the same instant.
_BACKOFF = tenacity.wait_random_exponential(multiplier=0.2, max=5.0)


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
            extra={"host": inventory.host_id, "state": "registered"},
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

    async def _report(self, need_register: bool) -> bool:
        """Register, or heartbeat, once; whether the next report must be a Register."""
        if need_register:
            await self._register()
            return False
        return not await self._heartbeat()

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        """Wait ``seconds``, less if stopped; a poke cuts it short, then debounces."""
        self._wake.clear()
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        _, pending = await asyncio.wait(
            waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        if self._wake.is_set() and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._debounce_s)

    def _log_unreachable(self, retry: tenacity.RetryCallState) -> None:
        """The warning before each wait for the scheduler (the handler holds repeats back)."""
        failed = retry.outcome.exception() if retry.outcome is not None else None
        code = failed.code().name if isinstance(failed, grpc.aio.AioRpcError) else "?"
        delay = retry.next_action.sleep if retry.next_action is not None else 0.0
        log.warning(
            "scheduler unreachable (%s); retrying in %.1fs",
            code,
            delay,
            extra={"host": self._reporter.host_id, "state": "unreachable"},
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Register and heartbeat until ``stop`` is set."""

        async def pause(seconds: float) -> None:
            await self._pause(stop, seconds)

        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(grpc.aio.AioRpcError),
            wait=_BACKOFF,
            stop=lambda _: stop.is_set(),
            sleep=pause,
            before_sleep=self._log_unreachable,
            reraise=True,
        )
        need_register = True
        while not stop.is_set():
            try:
                # Each pass starts the backoff afresh: one report that went
                # through resets it.
                async for attempt in retrying:
                    if stop.is_set():
                        return  # stopped during a backoff: no call after stop
                    with attempt:
                        need_register = await self._report(need_register)
            except grpc.aio.AioRpcError:
                return  # stopped while the scheduler was unreachable
            if retrying.statistics.get("attempt_number", 1) > 1:
                # With its state: the next outage's warning is never held
                # back as a repeat of this one's (tessera.logs).
                log.info(
                    "scheduler reachable again",
                    extra={"host": self._reporter.host_id, "state": "reachable"},
                )
            if not need_register:
                await self._pause(stop, self._interval_s)
