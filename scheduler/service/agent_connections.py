"""Keep this replica's connections to its agents open before a Place needs them.

A Place ends with the agent's Prepare. On a host this replica has not
called yet, that call first opens the channel: a TCP connect and a mutual TLS
handshake on both sides, measured at about 2 ms of the Place's latency over
gRPC at 10,000 hosts (p50 5.4 ms on hosts first called, 3.3 ms on hosts
called before). Only the housekeeper's lease holder talks to every host (its
reconciler); every other replica would pay that handshake on the first Place
to each host, and again each time gRPC closes a channel left idle.

So each replica goes over the live hosts every :attr:`WarmSettings.interval_s`
and asks gRPC to connect each channel that is not connected (a channel
already connected costs nothing to ask). Connections are asked for at most
:attr:`WarmSettings.rate_per_s` a second, so a replica that starts beside
a large fleet does not spend a burst of handshakes while it serves, and for
at most :func:`warm_budget` hosts, kept under the channel cache's limit so
that warming never evicts a channel in use. Hosts this replica places on
first (its share of the roster, and in it hosts holding placements) are
warmed first. Cordoned hosts and hosts
whose lease ran out are left alone: no Place goes there.

Not covered: a host registered since the last round, and hosts past the
budget. A connection a middlebox dropped silently still reads as connected
until keepalive notices (see :mod:`tessera.keepalive`: within 80 s), after
which the next round connects it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import grpc
from redis.exceptions import RedisError

from tessera.scheduler.service.agent_gateway import AgentCallError
from tessera.scheduler.store.redis_store import HostRecord

log = logging.getLogger("tessera.scheduler.agent_connections")

#: Hosts gone over between two turns of the event loop.
_YIELD_EVERY = 256


class AgentConnector(Protocol):
    """What warming needs of the agent gateway."""

    @property
    def channel_limit(self) -> int:
        """Agents whose channels the gateway keeps at most."""
        ...

    def connect(self, address: str, host_id: str) -> grpc.ChannelConnectivity:
        """Ask the channel to ``host_id``'s agent to connect, if it is not connected.

        Returns:
            The channel's state when asked.

        Raises:
            AgentCallError: no channel can be made for this host.
        """
        ...


@dataclass(frozen=True)
class WarmSettings:
    """How often and how fast connections are warmed.

    Attributes:
        interval_s: seconds between rounds over the live hosts; under
            gRPC's idle timeout (30 min), so that a channel gRPC closed for
            want of calls is open again before long.
        rate_per_s: connections asked for per second at most.
    """

    interval_s: float = 60.0
    rate_per_s: float = 200.0

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and self.rate_per_s > 0):
            raise ValueError(
                "warm settings: interval and rate must be positive "
                f"({self.interval_s!r}, {self.rate_per_s!r})"
            )


def warm_budget(channel_limit: int) -> int:
    """Hosts kept connected at most: three quarters of the channels a gateway keeps.

    The rest is left to hosts outside the budget (a drain's Unprepare on a
    cordoned host, a Place past the budget), so a round never evicts a
    channel in use.
    """
    return channel_limit * 3 // 4


@dataclass(frozen=True)
class WarmRound:
    """What one round did.

    Attributes:
        hosts: live, uncordoned hosts seen.
        asked: channels asked to connect (not connected when asked).
        connected: channels already connected.
        failing: of those asked, channels whose last try failed (an agent
            down): gRPC retries them on its own backoff.
        skipped: live hosts past the budget.
        unreachable: hosts no channel can be made for (a host id that names
            no agent identity).
    """

    hosts: int
    asked: int
    connected: int
    failing: int = 0
    skipped: int = 0
    unreachable: int = 0


class AgentConnections:
    """Warms the channels to the agents of the live hosts, round after round.

    Args:
        records: the hosts as this replica's live model holds them, brought
            up to date (the coordinator's snapshot).
        gateway: opens channels; at most :func:`warm_budget` of its limit
            are warmed.
        prefer: whether a host is in this replica's share (warmed first).
        settings: interval and rate.
        sleep: how a round waits between bursts (tests pass their own).
    """

    def __init__(
        self,
        records: Callable[[], Awaitable[Mapping[str, HostRecord]]],
        gateway: AgentConnector,
        *,
        prefer: Callable[[str], bool] = lambda _host: True,
        settings: WarmSettings | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._records = records
        self._gateway = gateway
        self._prefer = prefer
        self._settings = settings or WarmSettings()
        self._sleep = sleep

    @property
    def budget(self) -> int:
        """Hosts kept connected at most (see :func:`warm_budget`)."""
        return warm_budget(self._gateway.channel_limit)

    def _chosen(self, records: Mapping[str, HostRecord]) -> tuple[list[HostRecord], int]:
        """The hosts to warm, this replica's share first, and how many are past the budget."""
        live = [r for r in records.values() if not (r.cordoned or r.lease_expired)]
        # Past the budget, where Places go next first: this replica's share,
        # and in it hosts already holding placements (best fit fills them
        # before it opens an empty host). Then by name, for a stable choice
        # from round to round.
        live.sort(key=lambda r: (not self._prefer(r.host_id), not r.allocations, r.host_id))
        budget = self.budget
        return live[:budget], max(0, len(live) - budget)

    async def round(self) -> WarmRound:
        """Go over the live hosts once, asking unconnected channels to connect.

        Returns:
            What the round found and asked for.

        Raises:
            RedisError, OSError: the store could not be read.
        """
        chosen, skipped = self._chosen(await self._records())
        # Bursts of a tenth of a second's worth, each followed by its share
        # of the second: the handshakes spread out at the rate asked.
        rate = self._settings.rate_per_s
        burst = max(1, round(rate / 10))
        pause = burst / rate
        asked = connected = failing = unreachable = 0
        for n, record in enumerate(chosen, 1):
            if n % _YIELD_EVERY == 0:
                # Places go on meanwhile: a round over 10,000 connected
                # hosts is ~50 ms of work, never one stretch of it.
                await self._sleep(0)
            try:
                state = self._gateway.connect(record.agent_address, record.host_id)
            except AgentCallError:
                unreachable += 1
                continue
            if state is grpc.ChannelConnectivity.READY:
                connected += 1
                continue
            asked += 1
            failing += state is grpc.ChannelConnectivity.TRANSIENT_FAILURE
            if asked % burst == 0:
                await self._sleep(pause)
        return WarmRound(len(chosen) + skipped, asked, connected, failing, skipped, unreachable)

    async def run(self, stop: asyncio.Event) -> None:
        """Warm every interval until ``stop`` is set; a store that does not answer waits a round.

        A round paced over a large fleet lasts minutes (10,000 hosts at 200
        a second: 50 s): ``stop`` ends it mid-way, so a replica shutting
        down is not held up. The refresh a round may be waiting on is
        shared and shielded (:class:`ModelRefresh`): cancelling the round
        leaves it to the Places that wait on it too.
        """
        while not stop.is_set():
            warming = asyncio.ensure_future(self.round())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait((warming, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                if not warming.done():
                    warming.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await warming
            if warming.cancelled():
                return
            self._report(warming)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._settings.interval_s)

    def _report(self, warming: asyncio.Future[WarmRound]) -> None:
        """Log what a finished round did, or why it could not."""
        try:
            done = warming.result()
        except (RedisError, OSError) as err:
            log.debug("agent connections not warmed this round: %s", err)
            return
        except Exception:
            # Warming only saves latency: whatever went wrong, Places still
            # connect on their own, and the next round tries again.
            log.warning("agent connections not warmed this round", exc_info=True)
            return
        # Agents that stay down are asked every round: said once at INFO,
        # then only when a round asks for more than those.
        if done.asked > done.failing:
            log.info(
                "asked %d agent connections to open (%d open, %d failing, %d hosts past the "
                "budget of %d)",
                done.asked, done.connected, done.failing, done.skipped, self.budget,
            )  # fmt: skip
        elif done.asked:
            log.debug("%d agent connections still failing", done.failing)
