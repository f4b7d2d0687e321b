"""The embedded Valkey requires a generated password, kept private and reused.

Any local user can reach a loopback port: without a password they could read
and rewrite every placement. The password is made on first start, kept in the
data directory (mode 0600) and reused on restart, so the URL, which carries
it, stays the same for as long as the data does. It is never shown except in
that URL: not on the server's command line, not in a log.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.backoff import NoBackoff
from redis.retry import Retry

from tessera.scheduler.store.embedded import EmbeddedValkey

#: redis-py retries a refused AUTH with backoff (seconds); a refusal is the point here.
NO_RETRY = Retry(NoBackoff(), 0)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _raw_ping(port: int) -> bytes:
    """What the server answers a PING from a client that did not authenticate."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        return sock.recv(256)


def test_the_password_is_kept_private_and_reused_across_restarts(tmp_path: Path) -> None:
    data = tmp_path / "valkey"
    port = _free_port()
    with EmbeddedValkey(data, port=port) as server, redis.Redis.from_url(server.url) as client:
        password = server.password_path.read_text().strip()
        assert len(password) >= 40
        assert server.url == f"redis://:{password}@127.0.0.1:{port}/0"
        assert _mode(server.password_path) == 0o600
        assert _mode(server.config_path) == 0o600
        assert _mode(data) == 0o700
        client.set("tessera:test:kept", b"1")
        first_url = server.url
    # A restart on the same data (and port) comes back at the same URL, so
    # every client that had it reconnects; the AOF came back with it.
    with EmbeddedValkey(data, port=port) as again, redis.Redis.from_url(again.url) as client:
        assert again.url == first_url
        assert again.password_path.read_text().strip() == password
        assert client.get("tessera:test:kept") == b"1"


def test_a_client_without_the_password_is_refused(tmp_path: Path) -> None:
    with EmbeddedValkey(tmp_path) as server:
        assert _raw_ping(server.port).startswith(b"-NOAUTH")
        with (
            redis.Redis(host="127.0.0.1", port=server.port, retry=NO_RETRY) as anonymous,
            pytest.raises(redis.AuthenticationError),
        ):
            anonymous.get("tessera:hosts")
        with (
            redis.Redis(
                host="127.0.0.1", port=server.port, password="guess", retry=NO_RETRY
            ) as guesser,
            pytest.raises(redis.AuthenticationError),
        ):
            guesser.get("tessera:hosts")
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()


def test_the_password_is_not_on_the_server_command_line(tmp_path: Path) -> None:
    # Any local user can read another process's command line (ps).
    with EmbeddedValkey(tmp_path) as server:
        password = server.password_path.read_text().strip()
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        assert password not in server.log_tail(100_000)
        assert password not in server.redacted_url
        assert server.redacted_url == f"redis://:***@127.0.0.1:{server.port}/0"


def test_a_password_file_others_could_read_is_replaced(tmp_path: Path) -> None:
    with EmbeddedValkey(tmp_path) as server:
        exposed = server.password_path.read_text().strip()
    server.password_path.chmod(0o644)
    with EmbeddedValkey(tmp_path) as again:
        fresh = again.password_path.read_text().strip()
        assert fresh != exposed
        assert _mode(again.password_path) == 0o600
        with (
            redis.Redis(host="127.0.0.1", port=again.port, password=exposed, retry=NO_RETRY) as old,
            pytest.raises(redis.AuthenticationError),
        ):
            old.ping()
        with redis.Redis.from_url(again.url) as client:
            assert client.ping()


def test_a_data_dir_an_older_release_left_open_is_closed_to_other_users(tmp_path: Path) -> None:
    data = tmp_path / "valkey"
    data.mkdir(mode=0o755)
    data.chmod(0o755)  # as a plain mkdir under umask 022 made it
    with EmbeddedValkey(data) as server:
        assert _mode(data) == 0o700
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()


def test_the_module_prints_the_password_only_in_its_url_line(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tessera.scheduler.store.embedded", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        password = (tmp_path / "valkey.password").read_text().strip()
        assert f":{password}@" in url
        with redis.Redis.from_url(url) as client:
            assert client.ping()
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "redis://:***@127.0.0.1:" in err
    assert password not in err
    assert password not in rest


def test_the_scheduler_log_redacts_the_embedded_password(tmp_path: Path) -> None:
    data = tmp_path / "valkey"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "tessera.scheduler", "--listen", "127.0.0.1:0",
            "--data-dir", str(data), "--log-level", "DEBUG",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "REDIS_URL": ""},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("tessera-scheduler listening on 127.0.0.1:"), line
        # An answer means the event loop runs past the signal handlers' set-up:
        # a SIGTERM before it would kill the scheduler and orphan its Valkey.
        with grpc.insecure_channel(line.split()[-1]) as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    password = (data / "valkey.password").read_text().strip()
    assert "started embedded Valkey at redis://:***@127.0.0.1:" in err
    assert password not in err
    assert password not in line + out
