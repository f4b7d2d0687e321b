"""What a batch's requests are worth: priority rank times GPU-equivalents, above quality."""

from __future__ import annotations

from fractions import Fraction

from tessera.scheduler.core.engine.batch import BatchSettings, solve_batch
from tessera.scheduler.core.engine.batch_value import (
    GPU_UNITS,
    MAX_TOTAL,
    gpu_equivalents,
    gpu_equivalents_of,
    learn_gpu_units,
    priority_ranks,
    request_values,
    value_quantum,
)
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.identity import HostId, RequestId, TenantName
from tessera.scheduler.core.request import (
    Claim,
    DeviceForm,
    DeviceKind,
    Isolation,
    PlacementRequest,
)
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState

from .checker_topologies import mixed
from .topologies import dgx, workstation


def request(rid: str, *claims: Claim, priority: int = 0) -> PlacementRequest:
    return PlacementRequest(RequestId(rid), TenantName(f"t-{rid}"), claims, priority=priority)


def gpus(n: int) -> Claim:
    return Claim("gpu", DeviceKind.GPU, n)


def mig(profile: str) -> Claim:
    return Claim(
        "gpu", DeviceKind.GPU, 1, forms=frozenset({DeviceForm.MIG}),
        mig_profiles=frozenset({profile}), min_isolation=Isolation.SHARED,
    )  # fmt: skip


def vgpu(mdev_type: str) -> Claim:
    return Claim(
        "gpu", DeviceKind.GPU, 1, forms=frozenset({DeviceForm.MDEV}),
        mdev_types=frozenset({mdev_type}), min_isolation=Isolation.SHARED,
    )  # fmt: skip


def mixed_fleet() -> ClusterSnapshot:
    return ClusterSnapshot(hosts={HostId("m"): HostState(mixed("m"), 0)})


def test_a_request_is_worth_the_least_gpu_share_any_of_its_forms_takes() -> None:
    units = learn_gpu_units(mixed_fleet(), Engine().hardware_and_occupancy)
    assert gpu_equivalents(request("whole", gpus(2)), units) == 2
    assert gpu_equivalents(request("mig", mig("1g.10gb")), units) == Fraction(1, 7)
    assert gpu_equivalents(request("mig", mig("3g.40gb")), units) == Fraction(3, 7)
    assert gpu_equivalents(request("vgpu", vgpu("nvidia-1")), units) == Fraction(1, 4)
    # Whole or MIG: the slice, not the GPU a placement might spend on it.
    either = Claim(
        "gpu", DeviceKind.GPU, 1, forms=frozenset({DeviceForm.WHOLE_DEVICE, DeviceForm.MIG}),
        min_isolation=Isolation.SHARED,
    )  # fmt: skip
    assert gpu_equivalents(request("either", either), units) == Fraction(1, 7)
    nic = request("nic", Claim("nic", DeviceKind.NIC, 2))
    assert gpu_equivalents(nic, units) == 0


def test_values_rank_priorities_then_weigh_gpus_and_each_request_counts() -> None:
    units = learn_gpu_units(mixed_fleet(), Engine().hardware_and_occupancy)
    batch = [
        request("eight", gpus(8)),
        request("one", gpus(1)),
        request("nic", Claim("nic", DeviceKind.NIC, 1)),
        request("urgent", gpus(1), priority=2**31 - 1),
        request("lowest", gpus(1), priority=-(2**31)),
    ]
    assert priority_ranks(r.priority for r in batch) == {-(2**31): 1, 0: 2, 2**31 - 1: 3}
    quantum = value_quantum(len(batch))
    eight, one, nic, urgent, lowest = request_values(batch, gpu_equivalents_of(batch, units))
    assert all(v % quantum == 0 for v in (eight, one, nic, urgent, lowest))
    assert (eight, one, nic) == (
        quantum * 2 * (8 * GPU_UNITS + 1),
        quantum * 2 * (GPU_UNITS + 1),
        quantum * 2 * 2,  # the request's unit and the NIC's
    )
    # Eight small requests are worth one eight times as large, and their own units.
    assert 8 * one - eight == 7 * quantum * 2
    assert urgent == 3 * one // 2 and lowest == one // 2
    # Priorities a client chose at the ends of int32 rank like any others.
    assert sum((eight, one, nic, urgent, lowest)) < MAX_TOTAL


def test_a_claim_that_would_take_vfs_too_is_worth_its_gpus() -> None:
    """A VF's share of its GPU is not modelled; the claim's other forms are."""
    units = learn_gpu_units(mixed_fleet(), Engine().hardware_and_occupancy)
    either = Claim(
        "gpu", DeviceKind.GPU, 2, forms=frozenset({DeviceForm.WHOLE_DEVICE, DeviceForm.VF}),
        min_isolation=Isolation.SHARED,
    )  # fmt: skip
    assert gpu_equivalents(request("either", either), units) == 2
    # Only VFs: worth its count in device units, as a NIC's VFs are.
    vfs = Claim(
        "gpu", DeviceKind.GPU, 3, forms=frozenset({DeviceForm.VF}), min_isolation=Isolation.SHARED
    )
    assert gpu_equivalents(request("vfs", vfs), units) == 0
    quantum = value_quantum(1)
    only_vfs = [request("vfs", vfs)]
    assert request_values(only_vfs, gpu_equivalents_of(only_vfs, units)) == [quantum * (1 + 3)]


def test_a_higher_priority_request_that_would_take_vfs_too_is_not_outcompeted() -> None:
    """Two GPUs: a priority-10 request for both (whole or VF) against a
    priority-0 request for one. Valued at nothing for accepting VFs, the
    first lost to the second; it is worth twice as much, at twice the rank."""
    snap = ClusterSnapshot(hosts={HostId("ws"): HostState(workstation("ws"), 0)})
    both = Claim(
        "gpu", DeviceKind.GPU, 2, forms=frozenset({DeviceForm.WHOLE_DEVICE, DeviceForm.VF}),
        min_isolation=Isolation.SHARED,
    )  # fmt: skip
    batch = [request("urgent", both, priority=10), request("small", gpus(1))]
    result = solve_batch(Engine(), snap, batch, BatchSettings(workers=1))
    assert set(result.plans) == {"urgent"}
    assert result.gpu_equivalents == 2


def test_values_that_would_overflow_the_solver_fall_back_to_ranks() -> None:
    units = learn_gpu_units(mixed_fleet(), Engine().hardware_and_occupancy)
    huge = [request(f"r{i}", *(gpus(64) for _ in range(32)), priority=i) for i in range(2000)]
    values = request_values(huge, gpu_equivalents_of(huge, units))
    quantum = value_quantum(len(huge))
    assert values == [quantum * (i + 1) for i in range(2000)]
    assert sum(values) < MAX_TOTAL


def test_a_batch_spends_its_gpus_on_the_requests_that_fill_them() -> None:
    """Sixteen GPUs; nine 1-GPU requests come before two 8-GPU ones. Counting
    requests, the singles spread over both hosts and no 8-GPU request finds a
    whole host: nine GPUs used. Valued by GPU-equivalents, all sixteen are."""
    snap = ClusterSnapshot(hosts={HostId(h): HostState(dgx(h), 0) for h in ("a", "b")})
    batch = [request(f"one{i}", gpus(1)) for i in range(9)]
    batch += [request(f"eight{i}", gpus(8)) for i in range(2)]
    result = solve_batch(Engine(), snap, batch, BatchSettings(workers=1))
    assert result.gpu_equivalents == 16
    assert {"eight0", "eight1"} & set(result.plans)
    assert result.objective <= result.bound


def test_a_batch_of_whole_devices_needs_no_units_and_does_not_walk_the_cluster() -> None:
    engine = Engine()
    whole = [request("whole", gpus(2)), request("nic", Claim("nic", DeviceKind.NIC, 1))]
    assert learn_gpu_units(mixed_fleet(), engine.hardware_and_occupancy, whole).mig_slices == {}
    sliced = [*whole, request("mig", mig("1g.10gb"))]
    assert learn_gpu_units(mixed_fleet(), engine.hardware_and_occupancy, sliced).mig_slices
