"""One log line per placement and host lifecycle event, said by whoever made the change.

Two replicas share a real Valkey; the agents are the housekeeping tests'
fake at the gRPC edge. Each scenario is a run of operations and the lines of
``tessera.scheduler.events`` it must leave, as (level, state, subject)
triples: a replica that only reads a change off the feed says nothing.
"""

from __future__ import annotations

import logging

import pytest
import redis.asyncio as aioredis

from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.errors import HostOperationError
from tessera.scheduler.service.housekeeping import Housekeeper
from tessera.scheduler.store.redis_store import RedisStateStore
from tessera.v1 import placement_pb2

from ...conftest import Runner
from .test_housekeeping import SETTINGS, Clock, Host, gpu, inventory

EVENTS = "tessera.scheduler.events"
LEASE_MS = int(SETTINGS.lease_s * 1000)
DAY_MS = 86_400_000


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=EVENTS)
    return caplog


def said(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    """The event lines so far, as (level, state, placement or host), and forgets them."""
    out = [
        (
            r.levelname,
            str(r.__dict__["state"]),
            str(r.__dict__.get("placement") or r.__dict__["host"]),
        )
        for r in caplog.records
        if r.name == EVENTS
    ]
    caplog.clear()
    return out


def fields(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    """The structured fields of each event line so far."""
    keys = ("placement", "request", "tenant", "host", "state", "form", "units", "reason", "by")
    return [
        {k: r.__dict__[k] for k in keys if k in r.__dict__}
        for r in caplog.records
        if r.name == EVENTS
    ]


@pytest.fixture
def parts(redis_client: aioredis.Redis) -> tuple[RedisStateStore, Host, Clock]:
    return RedisStateStore(redis_client), Host(), Clock()


def test_a_place_and_a_release_are_one_line_each_on_the_replica_that_made_them(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner, lines: pytest.LogCaptureFixture
) -> None:
    store, host, clock = parts

    async def body() -> None:
        a = PlacementCoordinator(store, host, clock_ms=clock)
        b = PlacementCoordinator(store, host, clock_ms=clock)
        await a.register(inventory(), "agent:1")
        assert said(lines) == [("INFO", "registered", "h1")]

        placed = await a.place(gpu("r1"))
        await b.refreshed()  # the other replica reads it off the feed: no line
        assert fields(lines) == [
            {
                "placement": placed.placement_id, "request": "r1", "tenant": "acme",
                "host": "h1", "state": "ready", "form": "whole", "units": 1,
            }
        ]  # fmt: skip
        said(lines)

        await b.release(placed.placement_id, "")
        await a.refreshed()
        assert said(lines) == [("INFO", "released", placed.placement_id)]

    arun(body())


def test_a_place_whose_host_fails_is_one_warning_and_its_reservation_freed(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner, lines: pytest.LogCaptureFixture
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        said(lines)
        host.fail_prepare = True
        with pytest.raises(HostOperationError):
            await coordinator.place(gpu("r1"))
        ((level, state, _),) = said(lines)
        assert (level, state) == ("WARNING", "released")

    arun(body())


def test_a_release_whose_teardown_fails_is_one_warning_that_the_placement_failed(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner, lines: pytest.LogCaptureFixture
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        placed = await coordinator.place(gpu("r1"))
        said(lines)
        host.fail_unprepare = True
        with pytest.raises(HostOperationError):
            await coordinator.release(placed.placement_id, "")
        assert said(lines) == [("WARNING", "failed", placed.placement_id)]

    arun(body())


def test_a_host_is_registered_again_rebooted_cordoned_drained_and_forgotten_one_line_each(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner, lines: pytest.LogCaptureFixture
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        await coordinator.register(inventory(), "agent:2")  # the agent restarted
        placed = await coordinator.place(gpu("r1"))
        rebooted = inventory()
        rebooted.boot_id = "b2"
        await coordinator.register(rebooted, "agent:2")
        await coordinator.cordon("h1", "disk swap", "admin/alice")
        await coordinator.uncordon("h1", "admin/alice")
        await coordinator.drain("h1", "", "admin/alice")
        await coordinator.forget("h1", False, "admin/alice")
        assert said(lines) == [
            ("INFO", "registered", "h1"),
            ("INFO", "re-registered", "h1"),
            ("INFO", "ready", placed.placement_id),
            ("INFO", "rebooted", "h1"),
            ("WARNING", "failed", placed.placement_id),  # a reboot reset its devices
            ("INFO", "cordoned", "h1"),
            ("INFO", "uncordoned", "h1"),
            ("INFO", "released", placed.placement_id),  # by the drain
            ("INFO", "drained", "h1"),
            ("INFO", "forgotten", "h1"),
        ]

    arun(body())


def test_leases_expire_and_come_back_and_a_dead_host_is_forgotten_once_by_the_job(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner, lines: pytest.LogCaptureFixture
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        leader = Housekeeper(store, host, SETTINGS, owner="a", clock_ms=clock)
        said(lines)
        clock.ms += LEASE_MS + 1
        await leader.round()
        await leader.round()
        assert await coordinator.heartbeat("h1", "b1", None)
        assert await coordinator.heartbeat("h1", "b1", None)  # a live lease: nothing to say
        assert said(lines) == [("INFO", "lease-expired", "h1"), ("INFO", "lease-renewed", "h1")]

        clock.ms += LEASE_MS + DAY_MS + 1
        for _ in range(3):
            await leader.round()
        assert said(lines) == [("INFO", "lease-expired", "h1"), ("INFO", "forgotten", "h1")]

    arun(body())


def test_the_reaper_says_each_placement_it_finishes(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner, lines: pytest.LogCaptureFixture
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        placed = await coordinator.place(gpu("r1"))
        stuck = placement_pb2.Placement()
        stuck.CopyFrom(placed)
        await store.update_placement(
            "h1", placed.placement_id, stuck.SerializeToString(), state="pending"
        )
        said(lines)
        clock.ms += 61_000
        await coordinator.heartbeat("h1", "b1", None)
        leader = Housekeeper(store, host, SETTINGS, owner="a", clock_ms=clock)
        await leader.round()
        await leader.round()
        (line,) = fields(lines)
        assert line["state"] == "released" and line["placement"] == placed.placement_id
        assert "reaped" in str(line["reason"])

    arun(body())
