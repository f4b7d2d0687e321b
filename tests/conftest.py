"""Shared fixtures: a real Redis-protocol server for every test that needs state.

Fixtures:

* ``valkey_url`` (session): URL of the server all tests share. ``REDIS_URL``
  from the environment if set (it must be a disposable database: every test
  using ``redis_client`` flushes it), else an :class:`EmbeddedValkey` started
  in a temporary directory and stopped when the session ends.
* ``arun`` (function): runs a coroutine to completion on this test's event
  loop. pytest has no asyncio plugin here, so async tests are sync tests that
  call ``arun(coro)``; every call in one test shares one loop, which is what
  the asyncio Redis client needs (its connections belong to a loop).
* ``redis_client`` (function): a ``redis.asyncio.Redis`` on ``valkey_url``
  with ``decode_responses=False``, on an empty database (FLUSHDB before the
  test). Use it only through ``arun`` in the same test.

Example::

    def test_something(redis_client: aioredis.Redis, arun: Runner) -> None:
        async def body() -> None:
            await redis_client.set("k", b"v")
            assert await redis_client.get("k") == b"v"

        arun(body())
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from tessera.scheduler.store.embedded import EmbeddedValkey
from tessera.scheduler.store.wire import pack_with_hiredis

T = TypeVar("T")


class Runner(Protocol):
    """Type of the ``arun`` fixture: run a coroutine on the test's loop."""

    def __call__(self, coro: Coroutine[Any, Any, T], /) -> T: ...


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the shared test server: ``REDIS_URL``, or an embedded Valkey."""
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    data_dir: Path = tmp_path_factory.mktemp("valkey")
    with EmbeddedValkey(data_dir) as server:
        yield server.url


@pytest.fixture
def arun() -> Iterator[Runner]:
    """Run coroutines on one event loop per test, closed after it."""
    loop = asyncio.new_event_loop()

    def run(coro: Coroutine[Any, Any, T], /) -> T:
        return loop.run_until_complete(coro)

    try:
        yield run
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@pytest.fixture
def redis_client(valkey_url: str, arun: Runner) -> Iterator[aioredis.Redis]:
    """An asyncio client on an empty database of the shared server."""
    # Flush with a synchronous client so the async one has no connection yet
    # and binds to the test's loop on first use.
    with redis.Redis.from_url(valkey_url) as sync_client:
        sync_client.flushdb()
    # Packed by hiredis, as the scheduler's own client is (connect_store).
    client = pack_with_hiredis(aioredis.Redis.from_url(valkey_url, decode_responses=False))
    try:
        yield client
    finally:
        arun(client.aclose())
