"""Concurrency end to end: two scheduler replicas on one Valkey, eight fake hosts.

Sixteen client threads, each alternating between the two replicas, run place
-> verify READY (on the host tree too) -> release cycles over whole GPUs, VFs,
mdevs and MIG partitions until ``PLACEMENTS`` placements have been made and
released. Whole GPUs are asked for more than the eight the pool has, so
RESOURCE_EXHAUSTED and ABORTED answers happen; they are counted and retried
with the same request id. An independent auditor (``auditor.py``) reads the
store atomically all along (double allocations, inconsistencies, lost
acknowledged placements, leaked slots) and, every ``AUDIT_EVERY`` operations,
pauses the clients between RPCs and compares every host tree with the store.
At the end, with everything released, it must find nothing at all.

``TESSERA_CONCURRENCY_PLACEMENTS`` overrides the count (default 2,000, the
figure the acceptance asks for: six to eight minutes on a two-core CI
machine); ``bench/concurrency.py`` runs the same driver and writes
``bench/out/concurrency.json``.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tessera.scheduler.local_cluster import LocalCluster
from tessera.scheduler.store import schema
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

from .auditor import AuditReport, audit, connect, read_host

#: Placements made and released by the test (env override for the full run).
PLACEMENTS = int(os.environ.get("TESSERA_CONCURRENCY_PLACEMENTS", "2000"))
CLIENTS = 16
AUDIT_EVERY = 200

#: host id -> (fixture, GPUs in MIG mode, labels).
HOSTS: dict[str, tuple[str, tuple[str, ...], dict[str, str]]] = {
    **{f"ws-{i}": ("gpu-workstation", (), {"pool": "ws"}) for i in range(4)},
    "vgpu-0": ("vgpu", (), {"pool": "vgpu"}),
    "vgpu-1": ("vgpu", (), {"pool": "vgpu"}),
    "nic-0": ("sriov-nic", (), {"pool": "nic"}),
    "virt-0": ("virt-2s", ("0000:4b:00.0",), {"pool": "virt"}),
}

GPU = placement_pb2.DEVICE_KIND_GPU
NIC = placement_pb2.DEVICE_KIND_NIC
RETRIED = {
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
#: Weights of the request kinds of each cycle.
MIX = (("whole", 0.40), ("vf", 0.25), ("mdev", 0.20), ("mig", 0.15))


def start_cluster(
    workdir: Path, replicas: int = 2, redis_url: str = ""
) -> tuple[LocalCluster, list[str]]:
    """A Valkey, ``replicas`` schedulers on it and the agents of ``HOSTS``.

    Args:
        workdir: the cluster's working directory.
        replicas: how many schedulers.
        redis_url: a store already running (a Redis Cluster's
            ``redis+cluster://`` URL); empty starts the embedded Valkey.
    """
    cluster = LocalCluster(workdir)
    try:
        if redis_url:
            cluster.redis_url = redis_url
        else:
            cluster.start_valkey()
        addresses = [cluster.start_scheduler(f"scheduler-{i}") for i in range(replicas)]
        for host_id, (fixture, mig, labels) in HOSTS.items():
            cluster.start_agent(host_id, cluster.build_fake_host(fixture, host_id, mig), labels)
        cluster.wait_for_hosts(set(HOSTS), timeout_s=60)
    except BaseException:
        cluster.stop()
        raise
    return cluster, addresses


def host_roots(cluster: LocalCluster) -> dict[str, Path]:
    """Host id -> fake host tree of every host of ``HOSTS``."""
    return {h: cluster.workdir / "hosts" / h for h in HOSTS}


def make_request(
    kind: str, request_id: str, tenant: str, rng: random.Random
) -> placement_pb2.PlacementRequest:
    """One placement request of a kind of ``MIX``."""
    if kind == "whole":
        claim = placement_pb2.Claim(
            name="gpu", kind=GPU, count=rng.choice((1, 2, 2)),
            forms=[placement_pb2.DEVICE_FORM_WHOLE_DEVICE],
        )  # fmt: skip
        selector = {"pool": "ws"}
    elif kind == "vf":
        claim = placement_pb2.Claim(
            name="vf", kind=NIC, count=rng.choice((1, 2)), forms=[placement_pb2.DEVICE_FORM_VF],
            min_isolation=placement_pb2.ISOLATION_SHARED,
        )  # fmt: skip
        selector = {}
    elif kind == "mdev":
        claim = placement_pb2.Claim(
            name="vgpu", kind=GPU, count=1, forms=[placement_pb2.DEVICE_FORM_MDEV],
            mdev_types=["nvidia-63"], min_isolation=placement_pb2.ISOLATION_SHARED,
        )  # fmt: skip
        selector = {}
    else:
        claim = placement_pb2.Claim(
            name="slice", kind=GPU, count=1, forms=[placement_pb2.DEVICE_FORM_MIG],
            mig_profiles=[rng.choice(("1g.10gb", "1g.10gb", "3g.40gb"))],
            min_isolation=placement_pb2.ISOLATION_PARTITIONED,
        )  # fmt: skip
        selector = {}
    return placement_pb2.PlacementRequest(
        request_id=request_id, tenant=tenant, claims=[claim], host_selector=selector
    )


def verify_on_host(root: Path, placement: placement_pb2.Placement) -> list[str]:
    """What of a READY placement the host tree does not show carried out."""
    facts = read_host(root)
    problems = []
    for a in placement.allocations:
        kind = a.WhichOneof("slot")
        if kind == "whole_device":
            for address in {a.whole_device.address, *a.whole_device.group_endpoints}:
                if address not in facts.vfio_devices:
                    problems.append(f"{address} not on vfio")
        elif kind == "vf":
            if a.vf.vf_address not in facts.vfio_devices:
                problems.append(f"VF {a.vf.vf_address} not on vfio")
        elif kind == "mdev":
            if a.mdev.uuid not in facts.mdevs:
                problems.append(f"mdev {a.mdev.uuid} missing")
        elif kind == "mig":
            spans = {(s, z) for s, z, _ in facts.gpu_instances.get(a.mig.gpu_address, [])}
            if (a.mig.placement.start, a.mig.placement.size) not in spans:
                problems.append(f"GPU instance {a.mig.gpu_address}@{a.mig.placement.start} missing")
    return [f"{placement.placement_id}: {p}" for p in problems]


def pct(samples: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of samples, in ms."""
    ordered = sorted(samples)
    return (
        round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2) if ordered else 0.0
    )


def summary(samples: list[float]) -> dict[str, float]:
    """n, p50, p99, mean and max of latencies in seconds, as ms."""
    return {
        "n": len(samples),
        "p50_ms": pct(samples, 0.50),
        "p99_ms": pct(samples, 0.99),
        "mean_ms": round(1000 * statistics.fmean(samples), 2) if samples else 0.0,
        "max_ms": round(1000 * max(samples), 2) if samples else 0.0,
    }


@dataclass
class LoadResult:
    """Counts and timings of one load run."""

    placements: int = 0
    released: int = 0
    wall_s: float = 0.0
    place_s: list[float] = field(default_factory=list)
    place_by_kind: dict[str, list[float]] = field(default_factory=dict)
    place_until_ready_s: list[float] = field(default_factory=list)
    release_s: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    verify_failures: list[str] = field(default_factory=list)
    audits: list[AuditReport] = field(default_factory=list)
    paused_audits: list[AuditReport] = field(default_factory=list)
    final: AuditReport | None = None

    def to_json(self) -> dict[str, Any]:
        """The figures as bench/out JSON."""
        final = self.final
        return {
            "placements": self.placements,
            "released": self.released,
            "clients": CLIENTS,
            "replicas": 2,
            "hosts": {h: f for h, (f, _, _) in HOSTS.items()},
            "wall_s": round(self.wall_s, 2),
            "placements_per_s": round(self.placements / self.wall_s, 2) if self.wall_s else 0.0,
            "place_latency": summary(self.place_s),
            "place_until_ready_latency": summary(self.place_until_ready_s),
            "release_latency": summary(self.release_s),
            "place_latency_by_kind": {k: summary(v) for k, v in sorted(self.place_by_kind.items())},
            "codes": dict(sorted(self.codes.items())),
            "kinds": dict(sorted(self.kinds.items())),
            "unexpected": self.unexpected[:20],
            "verify_failures": self.verify_failures[:20],
            "audits": {
                "live_store_audits": len(self.audits),
                "paused_host_audits": len(self.paused_audits),
                "findings_live": sum(sum(a.counts().values()) for a in self.audits),
                "findings_paused": sum(sum(a.counts().values()) for a in self.paused_audits),
                "final": final.counts() if final else None,
                "findings": sorted(
                    {
                        f"{name}: {item}"
                        for a in [*self.audits, *self.paused_audits]
                        for name in a.counts()
                        for item in getattr(a, name)
                    }
                )[:30],
            },
        }


class Load:
    """The client threads, the pause gate and the auditor thread of one run.

    Args:
        redis_url: the store, for the auditor.
        addresses: the scheduler replicas.
        roots: host id -> fake host tree.
        target: placements to make and release.
        clients: client threads.
        audit_every: operations between paused host audits.
        seed: seeds each client's choices.
    """

    def __init__(
        self,
        redis_url: str,
        channels: list[grpc.Channel],
        roots: dict[str, Path],
        target: int,
        *,
        clients: int = CLIENTS,
        audit_every: int = AUDIT_EVERY,
        seed: int = 7,
    ) -> None:
        self.redis_url = redis_url
        self.channels = channels
        self.stubs = [scheduler_pb2_grpc.SchedulerStub(c) for c in self.channels]
        self.roots = roots
        self.target = target
        self.clients = clients
        self.audit_every = audit_every
        self.seed = seed
        self.result = LoadResult()
        self.lock = threading.Lock()
        self.started = 0
        self.ops = 0
        self.acked: set[str] = set()
        self.releasing: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.idle = threading.Condition(self.lock)
        self.active = 0
        self.done = threading.Event()
        self.baseline = {h: read_host(r).numvfs for h, r in roots.items()}

    # -- pause gate: audits with hosts run when no RPC is in flight ---------------

    def _enter(self) -> None:
        while True:
            self.gate.wait()
            with self.lock:
                if self.gate.is_set():
                    self.active += 1
                    return

    def _exit(self) -> None:
        with self.lock:
            self.active -= 1
            self.ops += 1
            self.idle.notify_all()

    def _call(self, stub_index: int, method: str, request: Any) -> tuple[Any, float]:
        stub = self.stubs[stub_index % len(self.stubs)]
        self._enter()
        try:
            t0 = time.perf_counter()
            answer = getattr(stub, method)(request, timeout=60)
            return answer, time.perf_counter() - t0
        finally:
            self._exit()

    # -- clients -----------------------------------------------------------------

    def _place(
        self, rng: random.Random, turn: list[int], req: placement_pb2.PlacementRequest, kind: str
    ) -> placement_pb2.Placement:
        t0 = time.perf_counter()
        deadline = time.monotonic() + 120
        while True:
            turn[0] += 1
            try:
                answer, took = self._call(turn[0], "Place", scheduler_pb2.PlaceRequest(request=req))
            except grpc.RpcError as err:
                code = err.code()
                with self.lock:
                    self.result.codes[f"place/{code.name}"] += 1
                if code not in RETRIED or time.monotonic() > deadline:
                    raise AssertionError(
                        f"Place {req.request_id}: {code.name} {err.details()}"
                    ) from err
                time.sleep(rng.uniform(0.005, 0.05))
                continue
            with self.lock:
                self.result.codes["place/OK"] += 1
                self.result.place_s.append(took)
                self.result.place_by_kind.setdefault(kind, []).append(took)
                self.result.place_until_ready_s.append(time.perf_counter() - t0)
            placement: placement_pb2.Placement = answer.placement
            return placement

    def _release(self, rng: random.Random, turn: list[int], placement_id: str) -> None:
        uncertain = False
        deadline = time.monotonic() + 120
        while True:
            turn[0] += 1
            try:
                _, took = self._call(
                    turn[0], "Release", scheduler_pb2.ReleaseRequest(placement_id=placement_id)
                )
            except grpc.RpcError as err:
                code = err.code()
                with self.lock:
                    self.result.codes[f"release/{code.name}"] += 1
                if code == grpc.StatusCode.NOT_FOUND and uncertain:
                    return  # an earlier attempt went through
                if code not in RETRIED or time.monotonic() > deadline:
                    raise AssertionError(
                        f"Release {placement_id}: {code.name} {err.details()}"
                    ) from err
                uncertain = uncertain or code in (
                    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE
                )  # fmt: skip
                time.sleep(rng.uniform(0.005, 0.05))
                continue
            with self.lock:
                self.result.codes["release/OK"] += 1
                self.result.release_s.append(took)
            return

    def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        turn = [index]  # alternates between the replicas, call by call
        cycle = 0
        while True:
            with self.lock:
                if self.started >= self.target:
                    return
                self.started += 1
            cycle += 1
            kind = rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
            req = make_request(kind, f"c{index}-{cycle}", f"tenant-{index % 4}", rng)
            placement = self._place(rng, turn, req, kind)
            problems = []
            if placement.state != placement_pb2.PLACEMENT_STATE_READY:
                problems.append(f"{placement.placement_id}: state {placement.state}")
            problems += verify_on_host(self.roots[placement.host_id], placement)
            with self.lock:
                self.acked.add(placement.placement_id)
                self.result.placements += 1
                self.result.kinds[kind] += 1
                self.result.verify_failures.extend(problems)
            time.sleep(rng.uniform(0, 0.05))  # hold it a moment
            with self.lock:
                self.acked.discard(placement.placement_id)
                self.releasing.add(placement.placement_id)
            self._release(rng, turn, placement.placement_id)
            with self.lock:
                self.result.released += 1

    def _guarded(self, index: int) -> None:
        try:
            self._client(index)
        except BaseException as err:
            with self.lock:
                self.result.unexpected.append(f"client {index}: {err}")

    # -- auditor -------------------------------------------------------------------

    def _audit(self, *, hosts: bool) -> AuditReport:
        with self.lock:
            acked = set(self.acked)
            self.releasing.clear()

        def released_meanwhile() -> set[str]:
            with self.lock:
                return set(self.releasing)

        return audit(
            self.redis_url,
            self.roots,
            check_hosts=hosts,
            acknowledged=acked,
            release_started=released_meanwhile,
            baseline_numvfs=self.baseline,
        )

    def _paused_audit(self) -> AuditReport:
        self.gate.clear()
        try:
            with self.idle:
                self.idle.wait_for(lambda: self.active == 0)
            return self._audit(hosts=True)
        finally:
            self.gate.set()

    def _auditor(self) -> None:
        next_pause = self.audit_every
        while not self.done.wait(0.25):
            try:
                if self.ops >= next_pause:
                    next_pause += self.audit_every
                    self.result.paused_audits.append(self._paused_audit())
                else:
                    self.result.audits.append(self._audit(hosts=False))
            except Exception as err:
                with self.lock:
                    self.result.unexpected.append(f"auditor: {err!r}")

    def run(self) -> LoadResult:
        """Run every client to the target, then audit the released cluster."""
        clients = [threading.Thread(target=self._guarded, args=(i,)) for i in range(self.clients)]
        auditor = threading.Thread(target=self._auditor)
        t0 = time.perf_counter()
        for t in clients:
            t.start()
        auditor.start()
        for t in clients:
            t.join()
        self.result.wall_s = time.perf_counter() - t0
        self.done.set()
        auditor.join()
        self.result.final = audit(
            self.redis_url, self.roots, final=True, baseline_numvfs=self.baseline
        )
        for channel in self.channels:
            channel.close()
        return self.result


def report(result: LoadResult) -> str:
    """A short human report of one run."""
    j = result.to_json()
    return (
        f"{j['placements']} placements in {j['wall_s']} s = {j['placements_per_s']}/s; "
        f"Place p50 {j['place_latency']['p50_ms']} ms p99 {j['place_latency']['p99_ms']} ms; "
        f"Release p50 {j['release_latency']['p50_ms']} ms p99 {j['release_latency']['p99_ms']} ms; "
        f"codes {j['codes']}; audits {j['audits']}"
    )


def run_and_check(
    c: LocalCluster, addresses: list[str], placements: int, json_name: str
) -> LoadResult:
    """Run the load to ``placements`` and require what every concurrency run must show.

    Clean audits all along and at the end, every placement made and released,
    and real contention (more whole-GPU demand than the pool holds). The
    result is also written to ``json_name`` in the cluster's workdir.
    """
    load = Load(c.redis_url, [c.channel(a) for a in addresses], host_roots(c), placements)
    result = load.run()
    summary_text = report(result)
    print(summary_text)
    (c.workdir / json_name).write_text(json.dumps(result.to_json(), indent=2))
    assert_clean(result)
    assert result.placements == result.released == placements
    assert result.codes["place/RESOURCE_EXHAUSTED"] > 0, summary_text
    assert len(result.paused_audits) >= max(1, placements // AUDIT_EVERY)
    return result


def assert_clean(result: LoadResult) -> None:
    """Everything the auditor and the clients saw must be clean."""
    assert not result.unexpected, result.unexpected[:10]
    assert not result.verify_failures, result.verify_failures[:10]
    for a in [*result.audits, *result.paused_audits]:
        assert a.clean, a.text()
    assert result.final is not None
    assert result.final.clean, result.final.text()
    assert result.final.hosts_checked and result.final.placements == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, list[str]]]:
    c, addresses = start_cluster(tmp_path_factory.mktemp("concurrency"))
    with c:
        yield c, addresses


@pytest.mark.timeout(1200)
def test_concurrent_clients_on_two_replicas_never_double_allocate(
    cluster: tuple[LocalCluster, list[str]],
) -> None:
    c, addresses = cluster
    result = run_and_check(c, addresses, PLACEMENTS, "concurrency.json")
    if PLACEMENTS >= 2000:
        out = Path(__file__).resolve().parents[2] / "bench" / "out"
        out.mkdir(exist_ok=True)
        (out / "concurrency.json").write_text(json.dumps(result.to_json(), indent=2))


def test_the_auditor_finds_what_it_must(cluster: tuple[LocalCluster, list[str]]) -> None:
    """Faults injected into the store and a host tree are each reported."""
    check_auditor_finds_faults(*cluster)


def check_auditor_finds_faults(c: LocalCluster, addresses: list[str]) -> None:
    """Inject faults into the store and a host tree; the auditor reports each.

    Args:
        c: a started cluster with every placement released.
        addresses: its scheduler replicas.
    """
    roots = host_roots(c)
    assert audit(c.redis_url, roots, final=True).clean
    channel = c.channel(addresses[0])
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    client = connect(c.redis_url)
    req = make_request("whole", "auditor-probe", "acme", random.Random(1))
    req.claims[0].count = 1
    try:
        placed = stub.Place(scheduler_pb2.PlaceRequest(request=req), timeout=60).placement
        pid, h = placed.placement_id, placed.host_id
        (slot,) = json.loads(client.hget(schema.placement_slots(h), pid) or b"[]")
        assert audit(c.redis_url, roots, check_hosts=True, acknowledged=[pid]).clean

        # An alloc entry whose placement does not exist: a leaked slot.
        client.hset(schema.alloc(h), "iommu-group:999", "pl-ghost")
        found = audit(c.redis_url, roots)
        assert any("pl-ghost" in f for f in found.leaked_slots), found.text()
        client.hdel(schema.alloc(h), "iommu-group:999")

        # A second placement listing the same slot and group: a double allocation.
        twin = "pl-twin"
        payload = placement_pb2.Placement()
        payload.CopyFrom(placed)
        payload.placement_id = twin
        client.hset(schema.placements(h), twin, payload.SerializeToString())
        client.hset(schema.placement_slots(h), twin, json.dumps([slot]))
        client.hset(schema.placement_states(h), twin, "ready")
        found = audit(c.redis_url, roots)
        assert any(f"slot {slot} listed by {twin}" in f for f in found.double_allocations)
        assert any("held by" in f and twin in f for f in found.double_allocations), found.text()
        for key in (schema.placements(h), schema.placement_slots(h), schema.placement_states(h)):
            client.hdel(key, twin)

        # The store forgets an acknowledged placement the host still carries out:
        # lost, and its devices leaked on the host.
        keys = [
            schema.placements(h), schema.placement_slots(h), schema.placement_requests(h),
            schema.placement_states(h), schema.placement_tenants(h),
        ]  # fmt: skip
        saved = {k: client.hget(k, pid) for k in keys}
        owner = client.hget(schema.alloc(h), slot)
        for k in keys:
            client.hdel(k, pid)
        client.hdel(schema.alloc(h), slot)
        found = audit(c.redis_url, roots, check_hosts=True, acknowledged=[pid])
        for k, v in saved.items():
            assert v is not None
            client.hset(k, pid, v)
        assert owner is not None
        client.hset(schema.alloc(h), slot, owner)
        assert any(pid in f for f in found.lost_acknowledged), found.text()
        assert any("bound to vfio" in f for f in found.leaked_on_host), found.text()
        assert audit(c.redis_url, roots, check_hosts=True, acknowledged=[pid]).clean

        # An mdev on a host that no placement made.
        stray = (
            roots["vgpu-0"]
            / "sys"
            / "bus"
            / "mdev"
            / "devices"
            / "1b0c1f53-0000-4000-8000-00000000dead"
        )
        stray.mkdir(parents=True)
        try:
            found = audit(c.redis_url, roots, check_hosts=True)
            assert any(stray.name in f for f in found.leaked_on_host), found.text()
        finally:
            stray.rmdir()
        stub.Release(scheduler_pb2.ReleaseRequest(placement_id=pid), timeout=60)
    finally:
        client.close()
        channel.close()
    final = audit(c.redis_url, roots, final=True)
    assert final.clean, final.text()
