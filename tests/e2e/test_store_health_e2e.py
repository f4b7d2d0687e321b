"""A scheduler's gRPC health follows its store: frozen, killed, restarted.

The embedded Valkey (its own process, as in production) is frozen with
SIGSTOP, thawed, killed with SIGKILL and started again on the same data dir
and port. The scheduler process keeps running throughout; its health service,
asked over its real mutual-TLS port, must say NOT_SERVING for every service
while the store does not answer and SERVING once it does, and its log must
carry one line per transition.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.scheduler.local_cluster import LocalCluster

NAMES = ("", "tessera.v1.Scheduler", "tessera.v1.Registry")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: The watcher probes every 2 s with a 1 s timeout: well within this.
WITHIN_S = 15


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("store-health")) as c:
        c.start_valkey()
        c.start_scheduler()
        yield c


def wait_for(stub: health_pb2_grpc.HealthStub, status: int) -> None:
    """Block until every service name reports ``status``."""
    deadline = time.monotonic() + WITHIN_S
    seen: set[int] = set()
    while time.monotonic() < deadline:
        seen = {
            stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            for name in NAMES
        }
        if seen == {status}:
            return
        time.sleep(0.2)
    raise AssertionError(f"health is {seen}, not {status}, after {WITHIN_S}s")


def test_health_is_not_serving_while_the_store_is_frozen_or_dead(cluster: LocalCluster) -> None:
    stub = health_pb2_grpc.HealthStub(cluster.channel())
    wait_for(stub, SERVING)
    valkey = cluster.valkey_server_pid()
    os.kill(valkey, signal.SIGSTOP)
    try:
        wait_for(stub, NOT_SERVING)
    finally:
        os.kill(valkey, signal.SIGCONT)
    wait_for(stub, SERVING)

    cluster.kill_valkey()
    wait_for(stub, NOT_SERVING)
    cluster.restart_valkey()
    wait_for(stub, SERVING)

    assert cluster.processes["scheduler"].poll() is None, "the scheduler rides it out"
    log = (cluster.workdir / "logs" / "scheduler.log").read_text()
    assert log.count("health is NOT_SERVING") == 2, log
    assert log.count("health is SERVING") == 2, log
