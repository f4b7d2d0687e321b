"""A running scheduler connects to a registered host's agent before any Place, unless told not to.

Real processes: Valkey, a scheduler, an agent on a fake host, mutual TLS.
The housekeeper (whose reconciler also calls agents) runs once a day here,
so a connection to the agent can only come from warming. Connections are
read where Linux keeps them, ``/proc/net/tcp``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tessera.scheduler.local_cluster import LocalCluster

QUIET = ("--housekeeping-interval", "86400", "--full-sweep-interval", "86400")


def connections_to(port: int) -> int:
    """Established TCP connections whose far end is ``port`` (any address)."""
    found = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                found += 1
    return found


def start_one_host(cluster: LocalCluster, warm_interval: str) -> int:
    """Valkey, a scheduler warming every ``warm_interval`` s, one registered agent: its port."""
    cluster.start_valkey()
    cluster.start_scheduler("scheduler", *QUIET, "--agent-warm-interval", warm_interval)
    address = cluster.start_agent("ws-a", cluster.build_fake_host("gpu-workstation", "ws-a"))
    cluster.wait_for_hosts({"ws-a"})
    return int(address.rsplit(":", 1)[1])


def test_a_registered_agent_is_connected_to_before_any_place(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with LocalCluster(tmp_path_factory.mktemp("warm")) as cluster:
        port = start_one_host(cluster, "1")
        deadline = time.monotonic() + 20
        while connections_to(port) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert connections_to(port) >= 1


def test_with_warming_off_no_connection_is_made_until_a_place_needs_one(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with LocalCluster(tmp_path_factory.mktemp("cold")) as cluster:
        port = start_one_host(cluster, "0")
        time.sleep(3)
        assert connections_to(port) == 0
