"""The scheduler refuses a Redis that could lose or evict its state, and says why.

These tests change server settings with CONFIG SET, so they run on a server of
their own, never on the shared ``valkey_url`` (which may be an external one).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from tessera.scheduler.store.embedded import EmbeddedValkey
from tessera.scheduler.store.safety import UnsafeStoreConfig, check_durability

from ..conftest import Runner

SAFE = {"appendonly": "yes", "maxmemory-policy": "noeviction", "appendfsync": "everysec"}
EVICTING = [
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkey]:
    data_dir: Path = tmp_path_factory.mktemp("safety-valkey")
    with EmbeddedValkey(data_dir) as srv:
        yield srv


@pytest.fixture
def admin(server: EmbeddedValkey) -> Iterator[redis.Redis]:
    """A sync client to change settings; restores the safe ones afterwards."""
    with redis.Redis.from_url(server.url, decode_responses=True) as client:
        yield client
        client.config_set("appendonly", "yes")
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("appendfsync", "everysec")
        for user in client.acl_users():
            if user != "default":
                client.acl_deluser(user)


def check(url: str, arun: Runner, *, allow_unsafe: bool) -> list[str]:
    async def body() -> list[str]:
        client = aioredis.Redis.from_url(url, decode_responses=False)
        try:
            return await check_durability(client, allow_unsafe=allow_unsafe)
        finally:
            await client.aclose()

    return arun(body())


def test_the_embedded_configuration_is_safe_and_quiet(
    server: EmbeddedValkey, admin: redis.Redis, arun: Runner
) -> None:
    assert check(server.url, arun, allow_unsafe=False) == []


def test_appendonly_no_is_refused_with_the_reason(
    server: EmbeddedValkey, admin: redis.Redis, arun: Runner
) -> None:
    admin.config_set("appendonly", "no")
    with pytest.raises(UnsafeStoreConfig) as refused:
        check(server.url, arun, allow_unsafe=False)
    message = str(refused.value)
    assert "appendonly is 'no'" in message
    assert "can be lost on restart" in message
    assert "set appendonly yes or pass --allow-unsafe-redis" in message
    assert len(refused.value.problems) == 1


def test_appendonly_no_is_allowed_with_the_override_as_a_warning(
    server: EmbeddedValkey, admin: redis.Redis, arun: Runner
) -> None:
    admin.config_set("appendonly", "no")
    warnings = check(server.url, arun, allow_unsafe=True)
    assert len(warnings) == 1
    assert "appendonly is 'no'" in warnings[0]


@pytest.mark.parametrize("policy", EVICTING)
def test_an_evicting_policy_is_refused_with_the_reason(
    policy: str, server: EmbeddedValkey, admin: redis.Redis, arun: Runner
) -> None:
    admin.config_set("maxmemory-policy", policy)
    with pytest.raises(UnsafeStoreConfig) as refused:
        check(server.url, arun, allow_unsafe=False)
    message = str(refused.value)
    assert f"maxmemory-policy is '{policy}'" in message
    assert "evict" in message
    assert "set maxmemory-policy noeviction or pass --allow-unsafe-redis" in message


@pytest.mark.parametrize("policy", EVICTING)
def test_an_evicting_policy_is_allowed_with_the_override_as_a_warning(
    policy: str, server: EmbeddedValkey, admin: redis.Redis, arun: Runner
) -> None:
    admin.config_set("maxmemory-policy", policy)
    warnings = check(server.url, arun, allow_unsafe=True)
    assert len(warnings) == 1
    assert f"maxmemory-policy is '{policy}'" in warnings[0]


def test_every_unsafe_setting_is_named_at_once(
    server: EmbeddedValkey, admin: redis.Redis, arun: Runner
) -> None:
    admin.config_set("appendonly", "no")
    admin.config_set("maxmemory-policy", "allkeys-lru")
    with pytest.raises(UnsafeStoreConfig) as refused:
        check(server.url, arun, allow_unsafe=False)
    assert len(refused.value.problems) == 2


def test_appendfsync_no_only_warns(
    server: EmbeddedValkey, admin: redis.Redis, arun: Runner
) -> None:
    admin.config_set("appendfsync", "no")
    warnings = check(server.url, arun, allow_unsafe=False)
    assert len(warnings) == 1
    assert "appendfsync is 'no'" in warnings[0]


def _limited_url(server: EmbeddedValkey, admin: redis.Redis, *denied: str) -> str:
    """A user that may not run ``denied`` commands, as on a managed Redis."""
    admin.acl_setuser(
        "limited",
        enabled=True,
        passwords=["+secret"],
        keys=["*"],
        channels=["*"],
        categories=["+@all"],
        commands=[f"-{cmd}" for cmd in denied],
    )
    return f"redis://limited:secret@127.0.0.1:{server.port}/0"


def test_a_forbidden_config_is_a_warning_not_a_crash(
    server: EmbeddedValkey, admin: redis.Redis, arun: Runner
) -> None:
    url = _limited_url(server, admin, "config")
    warnings = check(url, arun, allow_unsafe=False)
    assert len(warnings) == 1
    assert "CONFIG is unavailable" in warnings[0]
    assert "INFO" in warnings[0]


def test_without_config_an_unsafe_server_is_still_refused_via_info(
    server: EmbeddedValkey, admin: redis.Redis, arun: Runner
) -> None:
    admin.config_set("appendonly", "no")
    admin.config_set("maxmemory-policy", "volatile-lru")
    url = _limited_url(server, admin, "config")
    with pytest.raises(UnsafeStoreConfig) as refused:
        check(url, arun, allow_unsafe=False)
    assert len(refused.value.problems) == 2
    warnings = check(url, arun, allow_unsafe=True)
    assert any("CONFIG is unavailable" in w for w in warnings)
    assert any("appendonly is 'no'" in w for w in warnings)


def test_without_config_or_info_the_unverifiable_settings_are_warned_about(
    server: EmbeddedValkey, admin: redis.Redis, arun: Runner
) -> None:
    url = _limited_url(server, admin, "config", "info")
    warnings = check(url, arun, allow_unsafe=False)
    assert any("CONFIG is unavailable" in w for w in warnings)
    assert any("could not read appendonly" in w for w in warnings)
    assert any("could not read maxmemory-policy" in w for w in warnings)
