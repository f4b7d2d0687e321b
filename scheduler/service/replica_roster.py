"""Keep this replica on the store's roster and tell its engine who else places.

Replicas plan optimistically on one store: two that pick one device at once
lose a commit between them (measured: a fifth of all commits with two
replicas on one mixed fleet, all on the few hosts best fit liked most). With
the roster, each replica's engine walks its own share of the hosts first
(:meth:`scheduler.core.engine.fastpath.Engine.set_peers`), so concurrent plans
seldom meet.

A replica renews its membership every :attr:`RosterSettings.interval_s`
(it runs out after :attr:`RosterSettings.ttl_s` on the store's clock) and
leaves on shutdown, so its share goes to the others at once; one that dies
keeps its share until its membership runs out, and the others still place
there when their own shares have no room. The roster only steers preference:
safety stays with the commit's checks, whatever it says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from tessera.scheduler.store.roster import RosterStore

log = logging.getLogger("tessera.scheduler.roster")


@dataclass(frozen=True)
class RosterSettings:
    """How often a replica renews its membership and how long one lasts.

    Attributes:
        interval_s: seconds between renewals.
        ttl_s: how long a membership lasts without renewal: a replica that
            died keeps its share this long.
    """

    interval_s: float = 2.0
    ttl_s: float = 6.0

    def __post_init__(self) -> None:
        if not 0 < self.interval_s < self.ttl_s:
            raise ValueError(
                f"roster interval ({self.interval_s:g} s) must be positive and under "
                f"the membership's life ({self.ttl_s:g} s)"
            )


class ReplicaRoster:
    """Renews one replica's membership and hands the members to its engine when they change.

    Args:
        store: the roster in the store.
        name: this replica's name (the engine's affinity).
        on_change: called with every member, this replica included, when the
            set changes (the engine's ``set_peers``).
        settings: renewal interval and membership life.
    """

    def __init__(
        self,
        store: RosterStore,
        name: str,
        on_change: Callable[[frozenset[str]], None],
        settings: RosterSettings | None = None,
    ) -> None:
        self._store = store
        self._name = name
        self._on_change = on_change
        self._settings = settings or RosterSettings()
        self._members: frozenset[str] = frozenset({name})

    @property
    def members(self) -> frozenset[str]:
        """The replicas the last renewal found, this one included."""
        return self._members

    async def renew(self) -> None:
        """Renew once; tell the engine if the members changed.

        A store that does not answer keeps the members last seen: the
        preference they give stays as good as it was, and nothing commits
        while the store is down anyway.
        """
        try:
            members = await self._store.renew(self._name, int(self._settings.ttl_s * 1000))
        except (RedisError, OSError) as err:
            log.debug("roster renewal failed: %s", err)
            return
        if members != self._members:
            log.info(
                "replicas placing now: %s (this one: %s)", ", ".join(sorted(members)), self._name
            )
            self._members = members
            self._on_change(members)

    async def run(self, stop: asyncio.Event) -> None:
        """Renew every interval until ``stop`` is set, then leave the roster."""
        try:
            while not stop.is_set():
                await self.renew()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._settings.interval_s)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await self._store.leave(self._name)
