"""Commands packed by hiredis: the same bytes as redis-py's packer, the same refusals."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from tessera.scheduler.store.wire import pack_with_hiredis
from tests.conftest import Runner

#: Arguments of the kinds the store's scripts send: names, slot keys, numbers,
#: serialized protobuf, text outside ASCII, and a large value.
COMMANDS: list[tuple[Any, ...]] = [
    ("EVALSHA", "0" * 40, 2, b"tessera:host:{h1}", "tessera:feed:{3}", 7, -1, 2**64),
    ("SET", "k", b"\x00\r\n\xff" * 10_000),
    ("SET", "k", "café ✓"),
    ("HSET", "k", "f", 1.5, "g", 1e20, "h", 3.0),
    ("CONFIG GET", "databases"),
    (b"CLIENT SETNAME", b"tessera"),
    ("ZADD", memoryview(b"roster"), 10, bytearray(b"replica-a")),
]


def _python_packer() -> Connection:
    return Connection()


def _hiredis_packer() -> Connection:
    client = pack_with_hiredis(aioredis.Redis())
    connection = client.connection_pool.connection_class()
    assert isinstance(connection, Connection)
    return connection


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_same_bytes_as_redis_py(command: tuple[Any, ...]) -> None:
    expected = b"".join(bytes(part) for part in _python_packer().pack_command(*command))
    assert b"".join(_hiredis_packer().pack_command(*command)) == expected


@pytest.mark.parametrize("bad", [None, True, False, ["nested"], {"a": 1}])
def test_refuses_what_redis_py_refuses(bad: Any) -> None:
    with pytest.raises(DataError):
        _python_packer().pack_command("SET", "k", bad)
    with pytest.raises(DataError):
        _hiredis_packer().pack_command("SET", "k", bad)


@pytest.mark.parametrize(
    ("url", "plain"),
    [
        ("redis://localhost:6379", Connection),
        ("rediss://localhost:6380", SSLConnection),
        ("unix:///run/valkey.sock", UnixDomainSocketConnection),
    ],
)
def test_every_transport_keeps_its_connection_class(url: str, plain: type) -> None:
    client = pack_with_hiredis(aioredis.Redis.from_url(url))
    packed = client.connection_pool.connection_class
    assert packed is not plain
    assert issubclass(packed, plain)


def test_a_real_server_reads_what_hiredis_packed(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    """The conftest client packs with hiredis: values come back byte for byte."""
    assert client_packs_with_hiredis(redis_client)
    values: dict[Any, Any] = {
        "binary": b"\x00\r\n\xff" * 1000,
        "text": "café ✓".encode(),
        "number": b"42",
    }

    async def body() -> Any:
        await redis_client.hset("tessera:wire-test", mapping=values)
        return await redis_client.hgetall("tessera:wire-test")

    assert arun(body()) == {k.encode(): v for k, v in values.items()}


def client_packs_with_hiredis(client: aioredis.Redis) -> bool:
    """Whether a client's connections pack with hiredis."""
    return client.connection_pool.connection_class.pack_command is not Connection.pack_command
