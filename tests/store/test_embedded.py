"""The embedded Valkey starts durable, persists across restarts, and stops cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tessera.scheduler.store import embedded
from tessera.scheduler.store.embedded import EmbeddedValkey, EmbeddedValkeyError


def _answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=1) as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_it_starts_with_a_durable_loopback_configuration(tmp_path: Path) -> None:
    with EmbeddedValkey(tmp_path / "data") as server:
        password = server.password_path.read_text().strip()
        assert server.url == f"redis://:{password}@127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(server.url, decode_responses=True) as client:
            assert client.ping()
            config = {
                name: client.config_get(name)[name]
                for name in (
                    "appendonly",
                    "save",
                    "protected-mode",
                    "bind",
                    "maxmemory-policy",
                    "appendfsync",
                    "dir",
                    "logfile",
                )
            }
    assert config == {
        "appendonly": "yes",
        "save": "",
        "protected-mode": "yes",
        "bind": "127.0.0.1",
        "maxmemory-policy": "noeviction",
        "appendfsync": "everysec",
        "dir": str((tmp_path / "data").resolve()),
        "logfile": str(tmp_path / "data" / "valkey.log"),
    }
    assert "Ready to accept connections" in (tmp_path / "data" / "valkey.log").read_text()


def test_it_stops_on_leaving_the_context(tmp_path: Path) -> None:
    with EmbeddedValkey(tmp_path) as server:
        url = server.url
        assert server.running()
    assert not server.running()
    assert not _answers(url)
    server.stop()  # idempotent


def test_data_survives_a_clean_restart_on_the_same_directory(tmp_path: Path) -> None:
    with EmbeddedValkey(tmp_path) as server, redis.Redis.from_url(server.url) as client:
        client.set("tessera:test:k", b"\x00\xffvalue")
        client.hset("tessera:test:h", mapping={"a": "1", "b": "2"})
    with EmbeddedValkey(tmp_path) as again, redis.Redis.from_url(again.url) as client:
        assert client.get("tessera:test:k") == b"\x00\xffvalue"
        assert client.hgetall("tessera:test:h") == {b"a": b"1", b"b": b"2"}


def test_an_acknowledged_write_survives_a_killed_server(tmp_path: Path) -> None:
    # A process crash (not a power loss) loses nothing even with everysec:
    # the AOF is written before the reply is sent.
    server = EmbeddedValkey(tmp_path)
    server.start()
    try:
        with redis.Redis.from_url(server.url) as client:
            client.set("tessera:test:crash", b"kept")
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
    finally:
        server.stop()
    with EmbeddedValkey(tmp_path) as again, redis.Redis.from_url(again.url) as client:
        assert client.get("tessera:test:crash") == b"kept"


def test_a_second_server_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    with EmbeddedValkey(tmp_path), pytest.raises(EmbeddedValkeyError, match="another Valkey"):
        EmbeddedValkey(tmp_path).start()
    # The lock is released with the first server.
    with EmbeddedValkey(tmp_path) as again:
        assert _answers(again.url)


def test_a_startup_failure_shows_the_server_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedValkey(tmp_path, port=port)
        with pytest.raises(EmbeddedValkeyError, match=r"(?i)address already in use"):
            server.start(timeout=10)
    assert not server.running()
    # A failed start leaves the directory usable.
    with EmbeddedValkey(tmp_path) as again:
        assert _answers(again.url)


def test_a_picked_port_taken_meanwhile_is_retried_with_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy])
        real_pick = embedded._free_port
        monkeypatch.setattr(embedded, "_free_port", lambda: next(picks, None) or real_pick())
        with EmbeddedValkey(tmp_path) as server:
            assert server.port != busy
            assert _answers(server.url)


def test_a_fixed_port_is_used(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with EmbeddedValkey(tmp_path, port=port, appendfsync="always") as server:
        assert server.port == port
        with redis.Redis.from_url(server.url, decode_responses=True) as client:
            assert client.config_get("appendfsync") == {"appendfsync": "always"}


def test_an_unknown_fsync_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="appendfsync"):
        EmbeddedValkey(tmp_path, appendfsync="sometimes")


def test_the_module_prints_its_url_first_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tessera.scheduler.store.embedded", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("redis://:")
        assert url.endswith("/0")
        assert "@127.0.0.1:" in url
        with redis.Redis.from_url(url) as client:
            client.set("tessera:test:via-module", b"1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not _answers(url)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with EmbeddedValkey(tmp_path) as again, redis.Redis.from_url(again.url) as client:
        assert client.get("tessera:test:via-module") == b"1"
