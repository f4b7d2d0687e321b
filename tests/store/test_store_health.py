"""The store health watcher against a real Valkey that freezes, dies and comes back.

The watcher's PING must time out on a frozen server (SIGSTOP: the port still
accepts connections, nothing answers), fail on a dead one, and recover when
it answers again; every service name flips together, read back through a
real gRPC health server; each transition is logged once, not once per probe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tessera.scheduler.service.store_health import StoreHealthWatcher
from tessera.scheduler.store.connection import connect_store
from tessera.scheduler.store.embedded import EmbeddedValkey

from ..conftest import Runner

NAMES = ("tessera.v1.Scheduler", "tessera.v1.Registry", "")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedValkey]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    valkey = EmbeddedValkey(tmp_path / "valkey", port=port)
    valkey.start()
    try:
        yield valkey
    finally:
        if valkey.pid is not None:
            # Never leave a stopped process behind, whatever failed.
            os.kill(valkey.pid, signal.SIGCONT)
        valkey.stop()


def test_health_follows_a_frozen_a_dead_and_a_restarted_store(
    server: EmbeddedValkey, arun: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tessera.scheduler.store_health")

    async def body() -> None:
        servicer = health.aio.HealthServicer()
        for name in NAMES:
            await servicer.set(name, SERVING)
        grpc_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = health_pb2_grpc.HealthStub(channel)
        client = await connect_store(server.url)
        watcher = StoreHealthWatcher(client, servicer, NAMES, interval_s=0.1, timeout_s=0.5)

        async def statuses() -> set[int]:
            return {
                (await stub.Check(health_pb2.HealthCheckRequest(service=name))).status
                for name in NAMES
            }

        async def settle(expected: int, within_s: float = 10.0) -> None:
            deadline = time.monotonic() + within_s
            while time.monotonic() < deadline:
                await watcher.check()
                if await statuses() == {expected}:
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"health did not become {expected} in {within_s}s")

        try:
            await watcher.check()
            assert await statuses() == {SERVING}
            assert server.pid is not None

            os.kill(server.pid, signal.SIGSTOP)  # frozen: connects, never answers
            started = time.monotonic()
            await watcher.check()
            assert time.monotonic() - started < 5, "a frozen store must time out, not hang"
            assert await statuses() == {NOT_SERVING}
            assert not watcher.serving
            for _ in range(3):  # probes while still down log nothing new
                await watcher.check()

            os.kill(server.pid, signal.SIGCONT)
            await settle(SERVING)

            server.stop(grace=0)  # SIGKILL: dead
            await settle(NOT_SERVING)
            await watcher.check()

            server.start()  # same data, same port
            await settle(SERVING)
        finally:
            await watcher.aclose()
            await client.aclose()
            await channel.close()
            await grpc_server.stop(None)

    arun(body())
    transitions = [r.getMessage() for r in caplog.records if r.name.endswith("store_health")]
    assert len(transitions) == 4, transitions
    assert ["NOT_SERVING" in m for m in transitions] == [True, False, True, False]


def test_the_watcher_stops_when_asked(server: EmbeddedValkey, arun: Runner) -> None:
    async def body() -> None:
        servicer = health.aio.HealthServicer()
        client = await connect_store(server.url)
        try:
            watcher = StoreHealthWatcher(client, servicer, NAMES, interval_s=60)
            stop = asyncio.Event()
            task = asyncio.create_task(watcher.run(stop))
            await asyncio.sleep(0.2)
            stop.set()
            # Not after the 60 s interval: the wait ends with the stop.
            await asyncio.wait_for(task, 5)
            assert watcher.serving
        finally:
            await client.aclose()

    arun(body())
