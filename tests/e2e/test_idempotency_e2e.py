"""Idempotency end to end: a request_id places once, however often it is sent.

Real processes: one Valkey, two scheduler replicas, agents on fake hosts. The
same request sent twice in a row, concurrently to both replicas, and retried
after a response the client never got (a deadline shorter than the call) must
leave exactly one placement in the store, one allocation on the host, and give
the same placement every time, the one GetPlacement finds by request id.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from tessera.scheduler.local_cluster import LocalCluster
from tessera.scheduler.store import schema
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

from .auditor import audit, read_host, read_store

HOSTS = {"ws": "gpu-workstation", "vg": "vgpu", "nic": "sriov-nic"}
GPU = placement_pb2.DEVICE_KIND_GPU


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, list[str]]]:
    with LocalCluster(tmp_path_factory.mktemp("idempotency")) as c:
        c.start_valkey()
        addresses = [c.start_scheduler(f"scheduler-{i}") for i in range(2)]
        for host_id, fixture in HOSTS.items():
            c.start_agent(host_id, c.build_fake_host(fixture, host_id), {"name": host_id})
        c.wait_for_hosts(set(HOSTS))
        yield c, addresses


@pytest.fixture
def stubs(
    cluster: tuple[LocalCluster, list[str]],
) -> Iterator[list[scheduler_pb2_grpc.SchedulerStub]]:
    channels = [cluster[0].channel(a) for a in cluster[1]]
    yield [scheduler_pb2_grpc.SchedulerStub(ch) for ch in channels]
    for ch in channels:
        ch.close()


def roots(c: LocalCluster) -> dict[str, Path]:
    return {h: c.workdir / "hosts" / h for h in HOSTS}


def request(rid: str, kind: str) -> placement_pb2.PlacementRequest:
    if kind == "whole":
        claim = placement_pb2.Claim(
            name="gpu", kind=GPU, count=1, forms=[placement_pb2.DEVICE_FORM_WHOLE_DEVICE]
        )
        host = "ws"
    elif kind == "mdev":
        claim = placement_pb2.Claim(
            name="vgpu", kind=GPU, count=1, forms=[placement_pb2.DEVICE_FORM_MDEV],
            mdev_types=["nvidia-63"], min_isolation=placement_pb2.ISOLATION_SHARED,
        )  # fmt: skip
        host = "vg"
    else:
        claim = placement_pb2.Claim(
            name="vf", kind=placement_pb2.DEVICE_KIND_NIC, count=1,
            forms=[placement_pb2.DEVICE_FORM_VF], min_isolation=placement_pb2.ISOLATION_SHARED,
        )  # fmt: skip
        host = "nic"
    return placement_pb2.PlacementRequest(
        request_id=rid, tenant="acme", claims=[claim], host_selector={"name": host}
    )


def place_until_ready(
    stub: scheduler_pb2_grpc.SchedulerStub,
    req: placement_pb2.PlacementRequest,
    timeout_s: float = 60,
    codes: list[str] | None = None,
) -> placement_pb2.Placement:
    """Place, retrying ABORTED (the same request is being prepared) until READY."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            answer = stub.Place(scheduler_pb2.PlaceRequest(request=req), timeout=30)
            placement: placement_pb2.Placement = answer.placement
            return placement
        except grpc.RpcError as err:
            if codes is not None:
                codes.append(err.code().name)
            retry = err.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)
            if not retry or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def release(stub: scheduler_pb2_grpc.SchedulerStub, placement_id: str) -> None:
    stub.Release(scheduler_pb2.ReleaseRequest(placement_id=placement_id), timeout=60)


def assert_exactly_one(c: LocalCluster, rid: str, placement: placement_pb2.Placement) -> None:
    """One placement for ``rid`` in the store, owning its slots; one on the host."""
    stored_rid = schema.tenant_request(placement.tenant, rid)  # request ids are per tenant
    client = redis.Redis.from_url(c.redis_url)
    try:
        view = read_store(client)
        indexed = client.hget(schema.request(stored_rid), schema.F_PLACEMENT_ID)
    finally:
        client.close()
    mine = [
        (h, pid) for h, d in view.hosts.items() for pid, r in d.requests.items() if r == stored_rid
    ]
    assert mine == [(placement.host_id, placement.placement_id)]
    assert indexed == placement.placement_id.encode()
    every = [(h, pid) for h, d in view.hosts.items() for pid in d.payloads]
    assert every == mine, f"other placements left: {every}"
    data = view.hosts[placement.host_id]
    owned = sorted(s for s, owner in data.alloc.items() if owner == placement.placement_id)
    assert owned and sorted(data.alloc) == owned
    facts = read_host(c.workdir / "hosts" / placement.host_id)
    (a,) = placement.allocations
    kind = a.WhichOneof("slot")
    if kind == "whole_device":
        assert set(facts.vfio_devices) == {a.whole_device.address, *a.whole_device.group_endpoints}
    elif kind == "vf":
        assert set(facts.vfio_devices) == {a.vf.vf_address}
    else:
        assert facts.mdevs == {a.mdev.uuid} and not facts.vfio_devices
    for h in HOSTS.keys() - {placement.host_id}:
        other = read_host(c.workdir / "hosts" / h)
        assert not other.vfio_devices and not other.mdevs, h
    report = audit(c.redis_url, roots(c), check_hosts=True, acknowledged=[placement.placement_id])
    assert report.clean, report.text()


def assert_all_released(c: LocalCluster) -> None:
    report = audit(c.redis_url, roots(c), final=True)
    assert report.clean, report.text()


@pytest.mark.parametrize("kind", ["whole", "vf", "mdev"])
def test_the_same_request_id_twice_in_a_row_places_once(
    cluster: tuple[LocalCluster, list[str]],
    stubs: list[scheduler_pb2_grpc.SchedulerStub],
    kind: str,
) -> None:
    c, _ = cluster
    req = request(f"seq-{kind}", kind)
    first = place_until_ready(stubs[0], req)
    assert first.state == placement_pb2.PLACEMENT_STATE_READY
    again = place_until_ready(stubs[1], req)  # the other replica
    assert again.placement_id == first.placement_id
    assert list(again.allocations) == list(first.allocations)
    assert_exactly_one(c, req.request_id, first)
    release(stubs[0], first.placement_id)
    assert_all_released(c)


def race(
    stubs: list[scheduler_pb2_grpc.SchedulerStub], req: placement_pb2.PlacementRequest
) -> tuple[dict[int, placement_pb2.Placement | Exception], list[str]]:
    """Send ``req`` to both replicas at once, each retrying until READY."""
    barrier = threading.Barrier(2)
    answers: dict[int, placement_pb2.Placement | Exception] = {}
    codes: list[str] = []

    def racer(i: int) -> None:
        barrier.wait()
        try:
            answers[i] = place_until_ready(stubs[i], req, codes=codes)
        except Exception as err:
            answers[i] = err

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers, codes


@pytest.mark.parametrize("kind", ["whole", "vf", "mdev"])
def test_the_same_request_id_concurrently_to_two_replicas_places_once(
    cluster: tuple[LocalCluster, list[str]],
    stubs: list[scheduler_pb2_grpc.SchedulerStub],
    kind: str,
) -> None:
    c, _ = cluster
    for round_ in range(5):
        req = request(f"conc-{kind}-{round_}", kind)
        answers, codes = race(stubs, req)
        placed = [a for a in answers.values() if isinstance(a, placement_pb2.Placement)]
        assert len(placed) == 2, answers
        assert placed[0].placement_id == placed[1].placement_id, codes
        assert all(p.state == placement_pb2.PLACEMENT_STATE_READY for p in placed)
        # Only "being prepared, retry" answers are allowed on the way.
        assert set(codes) <= {"ABORTED"}, codes
        assert_exactly_one(c, req.request_id, placed[0])
        release(stubs[round_ % 2], placed[0].placement_id)
        assert_all_released(c)


@pytest.mark.parametrize("deadline_ms", [1, 5, 20, 60, 150, 400])
def test_a_retry_after_a_lost_response_gets_the_one_placement(
    cluster: tuple[LocalCluster, list[str]],
    stubs: list[scheduler_pb2_grpc.SchedulerStub],
    deadline_ms: int,
) -> None:
    c, _ = cluster
    req = request(f"lost-{deadline_ms}", "whole")
    codes: list[str] = []
    try:
        # The client gives up before the answer comes; the server may have
        # committed, or even prepared, the placement by then.
        stubs[0].Place(scheduler_pb2.PlaceRequest(request=req), timeout=deadline_ms / 1000)
        codes.append("OK")
    except grpc.RpcError as err:
        codes.append(err.code().name)
    assert codes[0] in ("OK", "DEADLINE_EXCEEDED"), codes
    # What the first call left behind the moment the client gave up.
    client = redis.Redis.from_url(c.redis_url)
    try:
        left = client.hget(schema.request(req.request_id), schema.F_PLACEMENT_ID)
    finally:
        client.close()
    placement = place_until_ready(stubs[1], req, timeout_s=60, codes=codes)
    went_on = isinstance(left, bytes) and left.decode() == placement.placement_id
    print(f"deadline {deadline_ms} ms: {codes}; first call's placement kept: {went_on}")
    assert placement.state == placement_pb2.PLACEMENT_STATE_READY
    again = place_until_ready(stubs[0], req)
    assert again.placement_id == placement.placement_id
    found = stubs[0].GetPlacement(
        scheduler_pb2.GetPlacementRequest(request_id=req.request_id, tenant=req.tenant), timeout=10
    )
    assert found.placement_id == placement.placement_id
    assert list(found.allocations) == list(placement.allocations)
    assert found.state == placement_pb2.PLACEMENT_STATE_READY
    assert_exactly_one(c, req.request_id, placement)
    release(stubs[1], placement.placement_id)
    assert_all_released(c)
