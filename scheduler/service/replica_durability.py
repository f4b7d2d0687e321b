"""Sentinel's replicas held to the primary's durability for as long as the scheduler runs.

At start every replica the Sentinels name is checked like the primary
(:func:`scheduler.store.safety.check_replicas`): one that would evict or lose
placements is refused by name. A replica attached later, or one whose
settings an operator changes at run time, would go unchecked, and a failover
may promote it: placements acknowledged on the old primary could then be
evicted, handing devices in use out twice, or lost on its next restart.

:class:`ReplicaDurabilityWatcher` asks the Sentinels for the replicas every
minute and checks each. What it finds is logged when it first appears, at
ERROR for a problem (the scheduler keeps serving: the primary is sound, and
refusing every placement over a replica would not make the fleet safer) and
at WARNING for what could not be checked, and once more, at WARNING, when it
is gone. A problem is logged once, not every minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisError

from tessera.scheduler.store.safety import check_replicas

log = logging.getLogger("tessera.scheduler.replica_durability")

#: Findings remembered at most (a replica's findings are a few lines; a
#: Sentinel naming thousands of replicas is not one to trust with memory).
MAX_FINDINGS = 1024


class ReplicaDurabilityWatcher:
    """Checks Sentinel's replicas every ``interval_s`` and logs what changed.

    Args:
        pool: the scheduler's Sentinel connection pool
            (:func:`scheduler.store.safety.sentinel_pool`).
        interval_s: seconds between checks.
    """

    def __init__(self, pool: SentinelConnectionPool, *, interval_s: float = 60.0) -> None:
        self._pool = pool
        self._interval_s = interval_s
        self._problems: set[str] = set()
        self._warnings: set[str] = set()

    async def check(self) -> tuple[list[str], list[str]]:
        """Check every replica once and log the findings that appeared or went.

        Returns:
            The problems and warnings found this time (each names its replica).
        """
        problems, warnings = await check_replicas(self._pool)
        for found in problems:
            if found not in self._problems:
                # With its state: a finding that goes and comes back is
                # said again, never held back as a repeat (tessera.logs).
                log.error(
                    "a Sentinel replica would lose placements if promoted: %s "
                    "(the scheduler keeps serving on the primary)",
                    found,
                    extra={"state": "found", "finding": found},
                )
        for found in warnings:
            if found not in self._warnings:
                log.warning("a Sentinel replica: %s", found)
        for gone in sorted(self._problems - set(problems)):
            log.warning(
                "no longer found on the Sentinel replicas: %s",
                gone,
                extra={"state": "gone", "finding": gone},
            )
        self._problems = set(problems[:MAX_FINDINGS])
        self._warnings = set(warnings[:MAX_FINDINGS])
        return problems, warnings

    async def run(self, stop: asyncio.Event) -> None:
        """Check every ``interval_s`` until ``stop`` is set (the first check after one interval).

        The replicas were checked at start. A check that fails outright (the
        Sentinels do not answer, a replica never does) is logged as a
        warning and tried again next time.
        """
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)
            if stop.is_set():
                return
            try:
                # A replica that accepts connections and never answers must
                # not stall the watcher past its next turn.
                async with asyncio.timeout(self._interval_s):
                    await self.check()
            except (TimeoutError, RedisError, OSError) as err:
                log.warning("the Sentinel replicas could not be checked this time: %s", err)
