"""The reconciler against placements that change while it asks the host (issue 12, item 7).

The reconciler reads two sides that move on their own: what the agent holds
(GetState) and what the store says. A Place that completes between the two
reads must not look lost, and a Release that completes between them must not
look lost either. These tests pin each interleaving down deterministically:
the agent's side is the only thing faked (the ``Host`` gateway of
test_housekeeping.py), the store is a real Valkey, and the Place and Release
are the coordinator's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.store.redis_store import RedisStateStore
from tessera.v1 import placement_pb2

from ...conftest import Runner
from .test_housekeeping import Clock, Host, gpu, inventory, keeper


class RacingHost(Host):
    """A host whose GetState answers, then lets something else finish before the reply lands.

    ``during_get_state`` runs after the answer is taken and before it is
    returned: exactly the window in which a reconciler that reads the host and
    then the store sees the store move past the host's answer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.during_get_state: Callable[[], Awaitable[None]] | None = None
        self.prepare_gate: asyncio.Event | None = None
        self.prepare_started = asyncio.Event()

    async def prepare(
        self, address: str, placement: placement_pb2.Placement
    ) -> placement_pb2.Placement:
        # A Place's Prepare (unfenced): hold it at the agent until let go, so
        # the placement sits committed and PENDING, not yet held.
        self.prepare_started.set()
        if self.prepare_gate is not None:
            await self.prepare_gate.wait()
        return await super().prepare(address, placement)

    async def get_state(self, address: str, host_id: str) -> list[str]:
        answer = await super().get_state(address, host_id)
        hook, self.during_get_state = self.during_get_state, None
        if hook is not None:
            await hook()
        return answer


@pytest.fixture
def parts(redis_client: aioredis.Redis) -> tuple[RedisStateStore, RacingHost, Clock]:
    return RedisStateStore(redis_client), RacingHost(), Clock()


def test_a_place_that_completes_while_the_host_is_asked_is_not_taken_for_lost(
    parts: tuple[RedisStateStore, RacingHost, Clock], arun: Runner
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        host.prepare_gate = asyncio.Event()
        placing = asyncio.create_task(coordinator.place(gpu("r1")))
        await host.prepare_started.wait()  # committed PENDING, Prepare in flight

        async def place_completes() -> None:
            # GetState answered "not held" (Prepare had not finished); now the
            # Prepare finishes and the Place confirms READY, all before that
            # answer reaches the reconciler.
            assert host.prepare_gate is not None
            host.prepare_gate.set()
            placed = await placing
            assert placed.state == placement_pb2.PLACEMENT_STATE_READY

        host.during_get_state = place_completes
        states: list[str | None] = []
        prepare_fenced = host.prepare_fenced

        async def watching(
            address: str, placement: placement_pb2.Placement, fencing_token: int
        ) -> placement_pb2.Placement:
            # A re-prepare (the job's, fenced; a Place's carries no token)
            # would first flip the live placement back to PENDING.
            if fencing_token:
                states.append(await store.placement_state("h1", placement.placement_id))
            return await prepare_fenced(address, placement, fencing_token)

        host.prepare_fenced = watching  # type: ignore[method-assign]
        report = await keeper(store, host, clock, "a").round()

        assert report.leader and host.during_get_state is None  # the race was run
        placed = placing.result()
        assert states == []  # never flipped back to PENDING "being prepared"
        assert report.reprepared == 0 and report.orphans_torn_down == 0
        assert [c for c in host.calls if c[2] == report.token] == []  # the host was left alone
        assert await store.placement_state("h1", placed.placement_id) == "ready"
        assert host.held == {placed.placement_id}
        # Its tenant can release it straight away: nothing says "is pending".
        await coordinator.release(placed.placement_id, "")
        assert host.held == set()

    arun(body())


def test_a_release_that_completes_while_the_host_is_asked_is_neither_lost_nor_orphaned(
    parts: tuple[RedisStateStore, RacingHost, Clock], arun: Runner
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        placed = await coordinator.place(gpu("r1"))

        async def release_completes() -> None:
            # GetState answered "held"; the tenant's Release then tears it
            # down and forgets it before the reconciler reads the store.
            await coordinator.release(placed.placement_id, "")

        host.during_get_state = release_completes
        host.calls.clear()
        report = await keeper(store, host, clock, "a").round()

        assert report.leader and host.during_get_state is None
        assert report.reprepared == 0 and report.quarantined == 0
        # Held at GetState, gone from the store after it: tearing it down
        # again is the orphan rule, and harmless (Unprepare is idempotent).
        assert report.orphans_torn_down == 1
        assert [c[0] for c in host.calls if c[2] == report.token] == ["unprepare"]
        assert host.held == set() and await coordinator.list_placements() == []

    arun(body())


def test_a_placement_the_host_really_lost_is_still_prepared_again(
    parts: tuple[RedisStateStore, RacingHost, Clock], arun: Runner
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        placed = await coordinator.place(gpu("r1"))
        other = await coordinator.place(gpu("r2"))

        async def other_is_released() -> None:
            # Something else moves in the store while the host is asked; the
            # placement that was READY throughout and is not held is lost.
            await coordinator.release(other.placement_id, "")

        host.held = set()  # the agent came back empty
        host.during_get_state = other_is_released
        report = await keeper(store, host, clock, "a").round()

        assert report.reprepared == 1 and report.orphans_torn_down == 0
        assert host.held == {placed.placement_id}
        assert await store.placement_state("h1", placed.placement_id) == "ready"

    arun(body())
