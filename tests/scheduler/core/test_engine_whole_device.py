"""Whole-device passthrough placement by the engine, as the spec states it."""

from __future__ import annotations

from dataclasses import replace

from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.engine.plugins import (
    REASON_GROUP_ALLOCATED,
    REASON_GROUP_HOLDS_HOST_DEVICE,
    REASON_IN_USE_BY_HOST,
    REASON_LABELS_MISMATCH,
    REASON_LEASE_EXPIRED,
    REASON_NOT_MIGRATABLE,
    REASON_TOPOLOGY,
)
from tessera.scheduler.core.identity import IommuGroupNumber, PciAddress, RequestId, TenantName
from tessera.scheduler.core.plan import Plan, Unschedulable, WholeDeviceAssignment
from tessera.scheduler.core.request import (
    Affinity,
    AffinityScope,
    Claim,
    DeviceKind,
    NumaPolicy,
    PlacementRequest,
)
from tessera.scheduler.core.snapshot import ClusterSnapshot

from .topologies import dgx, snapshot, workstation


def whole(plan: Plan) -> list[WholeDeviceAssignment]:
    """The plan's assignments, which are all whole devices here."""
    out = [a for a in plan.assignments if isinstance(a, WholeDeviceAssignment)]
    assert len(out) == len(plan.assignments)
    return out


def schedule(snap: ClusterSnapshot, req: PlacementRequest) -> Plan | Unschedulable:
    # explain=True: every host is fitted, so rejection counts cover the cluster.
    return Engine().schedule(snap, req, explain=True)


def request(*claims: Claim, **kw: object) -> PlacementRequest:
    return PlacementRequest(
        request_id=RequestId("r1"),
        tenant=TenantName("acme"),
        claims=claims,
        **kw,  # type: ignore[arg-type]
    )


def gpus(n: int, name: str = "gpu", **kw: object) -> Claim:
    return Claim(name=name, kind=DeviceKind.GPU, count=n, **kw)  # type: ignore[arg-type]


def test_a_gpu_comes_with_every_endpoint_of_its_iommu_group() -> None:
    plan = schedule(snapshot(workstation()), request(gpus(1)))
    assert isinstance(plan, Plan)
    (a,) = whole(plan)
    assert a.address == "0000:01:00.0"
    assert a.group_endpoints == ("0000:01:00.0", "0000:01:00.1")
    assert a.vfio_path == "/dev/vfio/1"
    assert plan.slots == ("iommu-group:1",)
    assert plan.expected_alloc_generation == 7


def test_a_group_already_allocated_is_never_offered_again() -> None:
    plan = schedule(snapshot(workstation(), taken={"ws": [1]}), request(gpus(1)))
    assert isinstance(plan, Plan)
    assert whole(plan)[0].address == "0000:02:00.0"


def test_the_last_gpu_taken_leaves_a_refusal_that_says_why() -> None:
    result = schedule(snapshot(workstation(), taken={"ws": [1, 2]}), request(gpus(1)))
    assert isinstance(result, Unschedulable)
    assert "capacity/iommu-group-allocated" in result.summary
    assert any(r.reason == REASON_GROUP_ALLOCATED and r.count == 2 for r in result.rejections)


def test_a_group_that_also_holds_a_host_device_is_never_offered() -> None:
    ws = workstation()
    nvme = replace(
        ws.functions[PciAddress("0000:01:00.1")],
        address=PciAddress("0000:01:01.0"),
        class_code=0x010802,
    )
    groups = dict(ws.iommu_groups)
    groups[IommuGroupNumber(1)] = replace(
        groups[IommuGroupNumber(1)], members=(*groups[IommuGroupNumber(1)].members, nvme.address)
    )
    host = replace(ws, functions={**ws.functions, nvme.address: nvme}, iommu_groups=groups)
    plan = schedule(snapshot(host), request(gpus(1)))
    assert isinstance(plan, Plan)
    assert whole(plan)[0].address == "0000:02:00.0"
    refused = schedule(snapshot(host, taken={"ws": [2]}), request(gpus(1)))
    assert isinstance(refused, Unschedulable)
    assert REASON_GROUP_HOLDS_HOST_DEVICE in {r.reason for r in refused.rejections}


def test_a_device_the_host_uses_is_never_offered() -> None:
    ws = workstation()
    gpu0 = PciAddress("0000:01:00.0")
    host = replace(
        ws, functions={**ws.functions, gpu0: replace(ws.functions[gpu0], host_use="boot display")}
    )
    plan = schedule(snapshot(host), request(gpus(1)))
    assert isinstance(plan, Plan) and whole(plan)[0].address == "0000:02:00.0"
    refused = schedule(snapshot(host), request(gpus(2)))
    assert isinstance(refused, Unschedulable)
    assert REASON_IN_USE_BY_HOST in {r.reason for r in refused.rejections}


def test_passthrough_is_never_offered_to_a_migratable_claim() -> None:
    result = schedule(snapshot(workstation()), request(gpus(1, migratable=True)))
    assert isinstance(result, Unschedulable)
    assert {r.reason for r in result.rejections} == {REASON_NOT_MIGRATABLE}


def test_single_numa_node_keeps_both_gpus_on_one_node() -> None:
    plan = schedule(snapshot(dgx()), request(gpus(2), numa_policy=NumaPolicy.SINGLE_NUMA_NODE))
    assert isinstance(plan, Plan)
    assert len({a.numa_node for a in whole(plan)}) == 1


def test_single_numa_node_refuses_rather_than_spreading() -> None:
    # One free GPU left on each NUMA node: two GPUs exist but never on one node.
    taken = {"dgx": [11, 13, 15, 17]}
    req = request(gpus(2), numa_policy=NumaPolicy.SINGLE_NUMA_NODE)
    result = schedule(snapshot(dgx(), taken=taken), req)
    assert isinstance(result, Unschedulable)
    assert any(r.reason == REASON_TOPOLOGY for r in result.rejections)
    spread = schedule(snapshot(dgx(), taken=taken), request(gpus(2)))
    assert isinstance(spread, Plan)


def test_socket_policy_keeps_gpus_within_one_socket() -> None:
    # NUMA 3 and 1 share a socket (distance 12); 7 and 5 the other.
    taken = {"dgx": [11, 13, 15]}  # leaves 0f (node 3), 4e (node 1), 90 (node 7), b7, bd
    plan = schedule(snapshot(dgx(), taken=taken), request(gpus(3), numa_policy=NumaPolicy.SOCKET))
    assert isinstance(plan, Plan)
    nodes = {a.numa_node for a in whole(plan)}
    assert nodes <= {4, 5, 6, 7} or nodes <= {0, 1, 2, 3}


def test_required_same_switch_affinity_pairs_gpus_under_one_switch() -> None:
    req = request(
        gpus(1, "a"),
        gpus(1, "b"),
        affinities=(Affinity("a", "b", AffinityScope.SAME_SWITCH, required=True),),
    )
    plan = schedule(snapshot(dgx(), taken={"dgx": [12]}), req)
    assert isinstance(plan, Plan)
    a, b = whole(plan)
    assert a.address[5:7] != b.address[5:7]
    # 07 and 0f share the first switch, but 0f is taken: the pair moves to 47/4e.
    assert {a.address, b.address} == {"0000:47:00.0", "0000:4e:00.0"}


def test_host_selector_and_expired_leases_filter_hosts() -> None:
    snap = snapshot(workstation("ws"), dgx("dgx"), expired={"dgx"})
    result = schedule(snap, request(gpus(1), host_selector={"role": "training"}))
    assert isinstance(result, Unschedulable)
    reasons = {r.reason for r in result.rejections}
    assert reasons == {REASON_LABELS_MISMATCH, REASON_LEASE_EXPIRED}


def test_best_fit_prefers_the_fuller_host() -> None:
    snap = snapshot(workstation("ws"), dgx("dgx"))
    plan = schedule(snap, request(gpus(1)))
    assert isinstance(plan, Plan)
    assert plan.host_id == "ws"
