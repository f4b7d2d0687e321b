"""The reaper and reconciler: one leader at a time, fenced, on a real Valkey."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from tessera.scheduler.service.agent_gateway import AgentCallError
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.errors import PlacementBusyError
from tessera.scheduler.service.housekeeping import Housekeeper, HousekeepingSettings
from tessera.scheduler.store.embedded import EmbeddedValkey
from tessera.scheduler.store.redis_store import Fence, FencedOutError, RedisStateStore
from tessera.security.audit import AuditLog
from tessera.v1 import inventory_pb2, placement_pb2

from ...conftest import Runner

NOW_MS = 10_000_000


class Host:
    """One agent's side as the scheduler reaches it: what it holds, what it was asked."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        # Which host each prepared placement went to: an agent reports only its own host's
        # placements, and a stub that reported every host's would have the housekeeper tear
        # down other hosts' placements as orphans (ids added to `held` by hand show everywhere).
        self.host_of: dict[str, str] = {}
        self.calls: list[tuple[str, str, int]] = []
        self.fail_prepare = False
        self.fail_unprepare = False

    async def prepare(
        self, address: str, placement: placement_pb2.Placement
    ) -> placement_pb2.Placement:
        return await self.prepare_fenced(address, placement, 0)

    async def unprepare(self, address: str, placement: placement_pb2.Placement) -> None:
        await self.unprepare_fenced(address, placement, 0)

    async def prepare_fenced(
        self, address: str, placement: placement_pb2.Placement, fencing_token: int
    ) -> placement_pb2.Placement:
        self.calls.append(("prepare", placement.placement_id, fencing_token))
        if self.fail_prepare:
            raise AgentCallError(address, grpc.StatusCode.INTERNAL, "bind failed")
        self.held.add(placement.placement_id)
        self.host_of[placement.placement_id] = placement.host_id
        return placement

    async def unprepare_fenced(
        self, address: str, placement: placement_pb2.Placement, fencing_token: int
    ) -> None:
        self.calls.append(("unprepare", placement.placement_id, fencing_token))
        if self.fail_unprepare:
            raise AgentCallError(address, grpc.StatusCode.UNAVAILABLE, "agent down")
        self.held.discard(placement.placement_id)

    async def get_state(self, address: str, host_id: str) -> list[str]:
        return sorted(p for p in self.held if self.host_of.get(p, host_id) == host_id)


def inventory() -> inventory_pb2.HostInventory:
    return inventory_pb2.HostInventory(
        host_id="h1", boot_id="b1", generation=1, iommu_present=True,
        pci_functions=[
            inventory_pb2.PciFunction(
                address=f"0000:0{i}:00.0", vendor_id=0x10DE, class_code=0x030200,
                iommu_group=i, has_iommu_group=True, role=inventory_pb2.PCI_ROLE_ENDPOINT,
            )
            for i in (1, 2)
        ],
        iommu_groups=[
            inventory_pb2.IommuGroup(number=i, members=[f"0000:0{i}:00.0"]) for i in (1, 2)
        ],
    )  # fmt: skip


def gpu(request_id: str) -> placement_pb2.PlacementRequest:
    return placement_pb2.PlacementRequest(
        request_id=request_id,
        tenant="acme",
        claims=[placement_pb2.Claim(name="g", kind=placement_pb2.DEVICE_KIND_GPU, count=1)],
    )


class Clock:
    def __init__(self) -> None:
        self.ms = NOW_MS

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def parts(redis_client: aioredis.Redis) -> tuple[RedisStateStore, Host, Clock]:
    return RedisStateStore(redis_client), Host(), Clock()


SETTINGS = HousekeepingSettings(interval_s=1, pending_after_s=60, releasing_after_s=60)


def keeper(store: RedisStateStore, host: Host, clock: Clock, owner: str) -> Housekeeper:
    return Housekeeper(store, host, SETTINGS, owner=owner, clock_ms=clock)


def test_one_replica_leads_and_a_successor_gets_a_larger_token_that_fences_the_old_one(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        placed = await coordinator.place(gpu("r1"))
        a, b = keeper(store, host, clock, "a"), keeper(store, host, clock, "b")
        first = await a.round()
        assert first.leader and not (await b.round()).leader
        assert (await a.round()).token == first.token  # renewing keeps the term
        await store.yield_lease("reaper", "a")
        second = await b.round()
        assert second.leader and second.token > first.token
        # The deposed leader's writes are refused by the store.
        with pytest.raises(FencedOutError):
            await store.release("h1", placed.placement_id, fence=Fence("reaper", first.token))
        assert len(await coordinator.list_placements()) == 1

    arun(body())


def test_a_placement_stuck_pending_is_torn_down_and_released(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        placed = await coordinator.place(gpu("r1"))
        # A replica died between commit and READY: the store says PENDING.
        stuck = placement_pb2.Placement()
        stuck.CopyFrom(placed)
        stuck.state = placement_pb2.PLACEMENT_STATE_PENDING
        await store.update_placement(
            "h1", placed.placement_id, stuck.SerializeToString(), state="pending"
        )
        housekeeper = keeper(store, host, clock, "a")
        assert (await housekeeper.round()).reaped == 0  # not stuck long enough yet
        clock.ms += 61_000
        report = await housekeeper.round()
        assert report.reaped == 1
        assert await coordinator.list_placements() == []
        assert ("unprepare", placed.placement_id, report.token) in host.calls
        assert host.held == set()

    arun(body())


def test_what_the_reaper_does_to_a_placement_is_in_the_audit_log(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner, tmp_path: Path
) -> None:
    store, host, clock = parts
    audit = AuditLog(str(tmp_path / "audit.jsonl"), "scheduler")

    async def body() -> str:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        placed = await coordinator.place(gpu("r1"))
        stuck = placement_pb2.Placement()
        stuck.CopyFrom(placed)
        await store.update_placement(
            "h1", placed.placement_id, stuck.SerializeToString(), state="pending"
        )
        clock.ms += 61_000
        housekeeper = Housekeeper(store, host, SETTINGS, owner="a", clock_ms=clock, audit=audit)
        assert (await housekeeper.round()).reaped == 1
        return placed.placement_id

    placement_id = arun(body())
    audit.close()
    (record,) = [json.loads(line) for line in (tmp_path / "audit.jsonl").open()]
    assert record["action"] == "reap" and record["outcome"] == "OK"
    assert record["who"].startswith("a (reaper job, fencing token ")
    assert record["resources"] == {"placement_id": placement_id, "host_id": "h1", "tenant": "acme"}
    assert "pending" in record["detail"]


def test_a_stuck_placement_whose_host_cannot_tear_down_is_quarantined(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        placed = await coordinator.place(gpu("r1"))
        releasing = placement_pb2.Placement()
        releasing.CopyFrom(placed)
        await store.update_placement(
            "h1", placed.placement_id, releasing.SerializeToString(), state="releasing"
        )
        host.fail_unprepare = True
        clock.ms += 61_000
        report = await keeper(store, host, clock, "a").round()
        assert report.quarantined == 1
        (kept,) = await coordinator.list_placements()
        assert kept.state == placement_pb2.PLACEMENT_STATE_FAILED
        assert "teardown failed" in kept.message
        # Its slot stays taken: the other GPU is all that is left.
        await coordinator.register(inventory(), "agent:1")  # lease renewed after the wait
        await coordinator.place(gpu("r2"))
        with pytest.raises(Exception, match="iommu-group-allocated"):
            await coordinator.place(gpu("r3"))

    arun(body())


def test_reconcile_tears_down_what_the_store_forgot_and_prepares_what_the_host_lost(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        kept = await coordinator.place(gpu("r1"))
        # While the agent was away: it lost r1, and still holds one released.
        host.held = {"pl-released-long-ago"}
        host.calls.clear()
        report = await keeper(store, host, clock, "a").round()
        assert report.orphans_torn_down == 1 and report.reprepared == 1
        assert host.held == {kept.placement_id}
        assert all(token == report.token for _, _, token in host.calls)

    arun(body())


def test_a_lost_placement_that_cannot_be_prepared_again_is_marked_failed(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        await coordinator.place(gpu("r1"))
        host.held = set()
        host.fail_prepare = True
        report = await keeper(store, host, clock, "a").round()
        assert report.quarantined == 1
        (failed,) = await coordinator.list_placements()
        assert failed.state == placement_pb2.PLACEMENT_STATE_FAILED
        assert "lost it" in failed.message

    arun(body())


def test_a_placement_being_prepared_again_cannot_be_released_under_the_reconciler(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        kept = await coordinator.place(gpu("r1"))
        host.held = set()  # the host lost it
        seen: list[str | None] = []
        prepare = host.prepare_fenced

        async def watching(
            address: str, placement: placement_pb2.Placement, fencing_token: int
        ) -> placement_pb2.Placement:
            # While the host prepares it again, the store says "being prepared":
            # a Release now is refused instead of freeing its slots under us.
            seen.append(await store.placement_state("h1", placement.placement_id))
            with pytest.raises(PlacementBusyError):
                await coordinator.release(kept.placement_id, "")
            return await prepare(address, placement, fencing_token)

        host.prepare_fenced = watching  # type: ignore[method-assign]
        report = await keeper(store, host, clock, "a").round()
        assert seen == ["pending"] and report.reprepared == 1
        (after,) = await coordinator.list_placements()
        assert after.state == placement_pb2.PLACEMENT_STATE_READY

    arun(body())


# -- dead hosts (Nomad's node GC) -------------------------------------------------

DAY_MS = 86_400_000
#: SETTINGS' lease (the default 20 s), in ms: the lease runs out this long after the last heartbeat.
LEASE_MS = int(SETTINGS.lease_s * 1000)


def test_a_host_dead_longer_than_forget_dead_after_s_and_holding_nothing_is_forgotten(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner, tmp_path: Path
) -> None:
    store, host, clock = parts
    audit = AuditLog(str(tmp_path / "audit.jsonl"), "scheduler")
    assert SETTINGS.forget_dead_after_s == 86_400  # the default: a day, as Nomad's

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        housekeeper = Housekeeper(store, host, SETTINGS, owner="a", clock_ms=clock, audit=audit)
        clock.ms += LEASE_MS + 1
        report = await housekeeper.round()
        assert report.leases_expired == 1 and report.dead_hosts_forgotten == 0
        # Expired for exactly a day: kept.
        clock.ms = NOW_MS + LEASE_MS + DAY_MS
        assert (await housekeeper.round()).dead_hosts_forgotten == 0
        assert [h.host_id for h in await coordinator.hosts()] == ["h1"]
        # A moment longer: gone from the store, as an operator's forget would do it.
        clock.ms += 1
        assert (await housekeeper.round()).dead_hosts_forgotten == 1
        assert await coordinator.hosts() == []
        assert await store.get_host("h1") is None
        assert (await housekeeper.round()).dead_hosts_forgotten == 0
        # Should its agent come back, it registers the host as new.
        assert not await coordinator.heartbeat("h1", "b1", None)
        assert await coordinator.register(inventory(), "agent:1")
        [back] = await coordinator.hosts()
        assert back.schedulable and not back.lease_expired

    arun(body())
    audit.close()
    (record,) = [json.loads(line) for line in (tmp_path / "audit.jsonl").open()]
    assert (record["action"], record["outcome"]) == ("forget-dead-host", "OK")
    assert record["who"].startswith("a (reaper job, fencing token ")
    assert record["resources"] == {"host_id": "h1"}
    assert "no heartbeat for 86420 s" in record["detail"]  # the lease (20 s) and a day


def test_a_dead_host_holding_a_placement_is_never_forgotten_and_stays_listed_as_expired(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner
) -> None:
    store, host, clock = parts

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        placed = await coordinator.place(gpu("r1"))
        housekeeper = keeper(store, host, clock, "a")
        clock.ms += LEASE_MS + 1
        assert (await housekeeper.round()).leases_expired == 1
        clock.ms += 30 * DAY_MS
        assert (await housekeeper.round()).dead_hosts_forgotten == 0
        [summary] = await coordinator.hosts()
        assert summary.lease_expired and not summary.schedulable
        assert summary.heartbeat_age_ms == LEASE_MS + 1 + 30 * DAY_MS
        assert summary.allocated_groups == 1
        assert [p.placement_id for p in await coordinator.list_placements()] == [
            placed.placement_id
        ]

    arun(body())


def test_dead_hosts_are_kept_when_forget_dead_after_s_is_0(
    parts: tuple[RedisStateStore, Host, Clock], arun: Runner
) -> None:
    store, host, clock = parts
    never = HousekeepingSettings(
        interval_s=1, pending_after_s=60, releasing_after_s=60, forget_dead_after_s=0
    )

    async def body() -> None:
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        housekeeper = Housekeeper(store, host, never, owner="a", clock_ms=clock)
        clock.ms += LEASE_MS + 1
        assert (await housekeeper.round()).leases_expired == 1
        clock.ms += 365 * DAY_MS
        assert (await housekeeper.round()).dead_hosts_forgotten == 0
        [summary] = await coordinator.hosts()
        assert summary.host_id == "h1" and summary.lease_expired

    arun(body())


class StoreBlinkingHost(Host):
    """A host whose Prepare takes the store away for a moment (a restart, a failover)."""

    def __init__(self, server: EmbeddedValkey, outage_s: float) -> None:
        super().__init__()
        self.server = server
        self.outage_s = outage_s

    async def prepare_fenced(
        self, address: str, placement: placement_pb2.Placement, fencing_token: int
    ) -> placement_pb2.Placement:
        prepared = await super().prepare_fenced(address, placement, fencing_token)
        self.server.stop()
        threading.Timer(self.outage_s, self.server.start).start()
        return prepared


def test_a_prepared_placement_is_confirmed_ready_across_a_short_store_outage(
    tmp_path: Path, arun: Runner
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = EmbeddedValkey(tmp_path / "valkey", port=port, appendfsync="always")
    server.start()
    try:

        async def body() -> None:
            client = aioredis.Redis.from_url(server.url, decode_responses=False)
            try:
                store = RedisStateStore(client)
                host = StoreBlinkingHost(server, outage_s=1.0)
                coordinator = PlacementCoordinator(store, host, clock_ms=Clock())
                await coordinator.register(inventory(), "agent:1")
                placed = await coordinator.place(gpu("r1"))
                assert placed.state == placement_pb2.PLACEMENT_STATE_READY
                assert await store.placement_state("h1", placed.placement_id) == "ready"
            finally:
                await client.aclose()

        arun(body())
    finally:
        server.stop()
