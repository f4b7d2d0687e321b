"""Valkey killed with SIGKILL under load, with ``appendfsync always``.

Clients place (and release some) through two scheduler replicas; mid-run the
valkey-server process is killed outright (no shutdown, no AOF flush) and
started again on the same data directory and port. Every placement a client
got READY for before the kill, and did not start to release, must be in the
store afterwards, READY. The schedulers must reconnect by themselves and place
again, and within 30 s the cluster must converge: the independent auditor
clean against the store and every host, placements stranded PENDING or
RELEASING by the calls in flight at the kill reaped by the housekeeper. Then
everything is released and, once the housekeeper's next full sweep has
forgotten the request records of releases cut in two by the kill, nothing may
be left.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from tessera.scheduler.local_cluster import LocalCluster
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

from .auditor import AuditReport, audit, read_store

HOSTS = {"ws-0": "gpu-workstation", "ws-1": "gpu-workstation", "nic": "sriov-nic", "vg": "vgpu"}
CLIENTS = 6
CONVERGE_S = 30
#: Short reaper patience so stranded work is handled within CONVERGE_S.
SCHEDULER_FLAGS = (
    "--reap-pending-after", "6", "--housekeeping-interval", "1", "--full-sweep-interval", "5",
)  # fmt: skip


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, list[str]]]:
    with LocalCluster(tmp_path_factory.mktemp("crash")) as c:
        c.start_valkey(appendfsync="always")
        addresses = [c.start_scheduler(f"scheduler-{i}", *SCHEDULER_FLAGS) for i in range(2)]
        for host_id, fixture in HOSTS.items():
            c.start_agent(host_id, c.build_fake_host(fixture, host_id))
        c.wait_for_hosts(set(HOSTS))
        yield c, addresses


def request(rid: str, rng: random.Random, kind: str = "") -> placement_pb2.PlacementRequest:
    kind = kind or rng.choice(("whole", "vf", "mdev"))
    if kind == "whole":
        claim = placement_pb2.Claim(
            name="gpu", kind=placement_pb2.DEVICE_KIND_GPU, count=1,
            forms=[placement_pb2.DEVICE_FORM_WHOLE_DEVICE],
        )  # fmt: skip
    elif kind == "vf":
        claim = placement_pb2.Claim(
            name="vf", kind=placement_pb2.DEVICE_KIND_NIC, count=1,
            forms=[placement_pb2.DEVICE_FORM_VF], min_isolation=placement_pb2.ISOLATION_SHARED,
        )  # fmt: skip
    else:
        claim = placement_pb2.Claim(
            name="vgpu", kind=placement_pb2.DEVICE_KIND_GPU, count=1,
            forms=[placement_pb2.DEVICE_FORM_MDEV], mdev_types=["nvidia-63"],
            min_isolation=placement_pb2.ISOLATION_SHARED,
        )  # fmt: skip
    return placement_pb2.PlacementRequest(request_id=rid, tenant="acme", claims=[claim])


class Clients:
    """Client threads placing and releasing until stopped."""

    def __init__(self, channels: list[grpc.Channel]) -> None:
        self.channels = channels
        self.stubs = [scheduler_pb2_grpc.SchedulerStub(ch) for ch in self.channels]
        self.lock = threading.Lock()
        self.acked: dict[str, float] = {}  # placement id -> when READY came back
        self.release_started: set[str] = set()
        self.released: set[str] = set()
        self.codes: Counter[str] = Counter()
        self.stop = threading.Event()
        self.allow_release = threading.Event()
        self.allow_release.set()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        held: list[str] = []
        n = 0
        while not self.stop.is_set():
            n += 1
            stub = self.stubs[n % len(self.stubs)]
            if held and self.allow_release.is_set() and len(held) > 4 and rng.random() < 0.5:
                pid = held.pop(0)
                with self.lock:
                    self.release_started.add(pid)
                try:
                    stub.Release(scheduler_pb2.ReleaseRequest(placement_id=pid), timeout=10)
                    with self.lock:
                        self.codes["release/OK"] += 1
                        self.released.add(pid)
                except grpc.RpcError as err:
                    with self.lock:
                        self.codes[f"release/{err.code().name}"] += 1
                continue
            req = request(f"crash-{index}-{n}", rng)
            try:
                answer = stub.Place(scheduler_pb2.PlaceRequest(request=req), timeout=10)
            except grpc.RpcError as err:
                with self.lock:
                    self.codes[f"place/{err.code().name}"] += 1
                time.sleep(0.05)
                continue
            placement = answer.placement
            with self.lock:
                self.codes["place/OK"] += 1
                if placement.state == placement_pb2.PLACEMENT_STATE_READY:
                    self.acked[placement.placement_id] = time.monotonic()
            held.append(placement.placement_id)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        for ch in self.channels:
            ch.close()

    def must_survive(self, before: float) -> set[str]:
        """Acknowledged before ``before`` and never sent to Release."""
        with self.lock:
            return {p for p, t in self.acked.items() if t < before} - self.release_started

    def held(self) -> set[str]:
        with self.lock:
            return set(self.acked) - self.release_started


def wait_clean(
    c: LocalCluster, roots: dict[str, Path], acknowledged: set[str], timeout_s: float
) -> tuple[AuditReport, float]:
    """Audit until clean or ``timeout_s``; the last report and the seconds it took."""
    t0 = time.monotonic()
    while True:
        try:
            report = audit(c.redis_url, roots, check_hosts=True, acknowledged=acknowledged)
        except redis.RedisError:
            report = AuditReport(inconsistent=["store unreachable"])
        if report.clean and not report.states.get("pending") and not report.states.get("releasing"):
            return report, time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            return report, time.monotonic() - t0
        time.sleep(0.5)


def reconnected(stub: scheduler_pb2_grpc.SchedulerStub, rid: str, timeout_s: float) -> float:
    """Seconds until a scheduler reads the store and places (a VF: there is room) again."""
    t0 = time.monotonic()
    rng = random.Random(rid)
    while True:
        try:
            stub.ListPlacements(scheduler_pb2.ListPlacementsRequest(), timeout=10)
            answer = stub.Place(
                scheduler_pb2.PlaceRequest(request=request(rid, rng, "vf")), timeout=10
            )
            stub.Release(
                scheduler_pb2.ReleaseRequest(placement_id=answer.placement.placement_id),
                timeout=10,
            )
            return time.monotonic() - t0
        except grpc.RpcError as err:
            print(f"  {rid} +{time.monotonic() - t0:.2f}s: {err.code().name} {err.details()}")
            if time.monotonic() - t0 > timeout_s:
                raise AssertionError(f"no Place through a scheduler after restart: {err}") from err
            time.sleep(0.2)


@pytest.mark.timeout(240)
def test_acknowledged_placements_survive_a_valkey_kill_and_the_cluster_converges(
    cluster: tuple[LocalCluster, list[str]],
) -> None:
    c, addresses = cluster
    roots = {h: c.workdir / "hosts" / h for h in HOSTS}
    clients = Clients([c.channel(a) for a in addresses])
    clients.start()
    try:
        time.sleep(6)  # load builds up
        killed_at = time.monotonic()
        c.kill_valkey()
        # Releases in flight now may or may not have happened: keep them apart.
        clients.allow_release.clear()
        survive = clients.must_survive(killed_at)
        time.sleep(2)  # clients hammer a dead store
        c.restart_valkey()
        restarted_at = time.monotonic()
        # Acknowledged placements are all there, straight from the AOF.
        client = redis.Redis.from_url(c.redis_url)
        try:
            view = read_store(client)
        finally:
            client.close()
        states = {pid: d.states.get(pid) for d in view.hosts.values() for pid in d.payloads}
        at_restart = Counter(states.values())
        missing = sorted(p for p in survive if p not in states)
        assert not missing, f"acknowledged before the kill, gone after: {missing}"
        assert all(states[p] == "ready" for p in survive), {p: states[p] for p in survive}
        # Both replicas reconnect by themselves and place again.
        reconnect_s = [reconnected(stub, f"after-{i}", 20) for i, stub in enumerate(clients.stubs)]
        time.sleep(3)  # more load on the restarted store
    finally:
        clients.join()
    for name in ("scheduler-0", "scheduler-1"):
        assert c.processes[name].poll() is None, f"{name} died with the store"
    held = clients.held()
    # Converged within CONVERGE_S of the restart: stranded PENDING/RELEASING
    # placements reaped, store and hosts agreeing.
    report, _ = wait_clean(c, roots, held, CONVERGE_S - (time.monotonic() - restarted_at))
    converge_s = time.monotonic() - restarted_at
    print(
        f"survived {len(survive)} acknowledged placements; states at restart "
        f"{dict(at_restart)}; reconnect {[round(s, 2) for s in reconnect_s]} s; "
        f"clean {converge_s:.1f} s after the restart; "
        f"codes {dict(clients.codes)}; {report.text()}"
    )
    assert report.clean and converge_s <= CONVERGE_S, report.text()
    assert not report.states.get("pending") and not report.states.get("releasing"), report.states
    # Release everything still held; nothing may be left anywhere.
    channel = c.channel(addresses[0])
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    try:
        for p in stub.ListPlacements(scheduler_pb2.ListPlacementsRequest(), timeout=10).placements:
            stub.Release(scheduler_pb2.ReleaseRequest(placement_id=p.placement_id), timeout=30)
    finally:
        channel.close()
    # A release the kill cut between freeing its host and forgetting its
    # request record (another slot) leaves the record; the full sweep
    # forgets it.
    deadline = time.monotonic() + 20
    while not (final := audit(c.redis_url, roots, final=True)).clean:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert final.clean, final.text()
