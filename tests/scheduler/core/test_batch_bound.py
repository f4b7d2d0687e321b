"""When a batch builds no model: the greedy seed measured against a true bound.

Each request's best candidate column, capacity aside, bounds what any
solution of the batch model scores. A greedy seed that places every request
some column can place, each within the settings' quality gap of its best
column, stands without a model; one that places less never does, however
large the gap, and the objective always stays within the reported bound.
"""

from __future__ import annotations

from ortools.sat.python import cp_model

from tessera.scheduler.core.engine.batch import BatchSettings, proven_status, solve_batch
from tessera.scheduler.core.engine.batch_bound import capacity_bound
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.identity import HostId, RequestId, TenantName
from tessera.scheduler.core.request import Claim, DeviceKind, PlacementRequest
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState

from .topologies import dgx, snapshot


def gpus(rid: str, count: int, tenant: str = "t", priority: int = 1) -> PlacementRequest:
    return PlacementRequest(
        RequestId(rid), TenantName(tenant), (Claim("gpu", DeviceKind.GPU, count),),
        priority=priority,
    )  # fmt: skip


def two_dgx() -> ClusterSnapshot:
    return ClusterSnapshot(hosts={HostId(h): HostState(dgx(h), 0) for h in ("a", "b")})


def test_a_greedy_seed_in_every_requests_best_column_is_optimal_without_a_model() -> None:
    requests = [gpus(f"r{i}", 1, tenant=f"t{i}") for i in range(3)]
    result = solve_batch(Engine(), two_dgx(), requests, BatchSettings(workers=1))
    assert len(result.plans) == 3
    assert result.status == "OPTIMAL" and not result.solved
    assert result.objective == result.bound == result.greedy_objective


def test_with_no_gap_allowed_a_seed_short_of_the_bound_goes_to_the_solver() -> None:
    # Host a has one GPU taken, so best fit ranks it first for every request:
    # eight requests' best columns are there, where seven GPUs are free.
    start = snapshot(dgx("a"), dgx("b"), taken={"a": [11]})
    requests = [gpus(f"r{i}", 1, tenant=f"t{i}") for i in range(8)]
    exact = solve_batch(Engine(), start, requests, BatchSettings(workers=1, quality_gap=0))
    assert exact.solved and exact.status == "OPTIMAL"
    assert exact.greedy_objective <= exact.objective == exact.model_bound <= exact.bound
    loose = solve_batch(Engine(), start, requests, BatchSettings(workers=1, quality_gap=1))
    assert not loose.solved and loose.status == "GREEDY"
    assert loose.objective == loose.greedy_objective < loose.bound
    assert len(loose.plans) == len(exact.plans) == 8


def test_no_quality_gap_keeps_a_greedy_seed_that_places_less() -> None:
    """The seed goes by priority: "pair" takes a GPU of host a and the second
    8-GPU gang member finds no whole host, so the seed places one request. The
    model places the gang, worth more: sixteen GPUs at a rank below one."""
    requests = [
        gpus("pair", 1, tenant="t1", priority=2),
        gpus("g1", 8, tenant="t2"),
        gpus("g2", 8, tenant="t2"),
    ]
    gang = {RequestId("g1"): "train", RequestId("g2"): "train"}
    for gap in (0.0, 0.05, 1.0):
        result = solve_batch(
            Engine(), two_dgx(), requests, BatchSettings(workers=1, quality_gap=gap), gang
        )
        assert result.solved, gap
        assert set(result.plans) == {"g1", "g2"}, gap
        assert result.objective > result.greedy_objective
        assert result.objective <= result.bound
        # Stopped within the gap is not proven optimal, whatever CP-SAT calls it.
        proven = result.model_bound == result.objective
        assert result.status == ("OPTIMAL" if proven else "FEASIBLE")


def test_requests_alike_one_refused_are_refused_for_the_same_reasons() -> None:
    """Refused once, refused again: the seed only adds reservations, so an alike
    request later in the batch fits nowhere either (and is not walked again)."""
    requests = [gpus(f"big{i}", 9, tenant="t") for i in range(3)] + [gpus("one", 1, tenant="t")]
    result = solve_batch(Engine(), two_dgx(), requests, BatchSettings(workers=1))
    assert set(result.plans) == {"one"}
    reasons = {result.unplaced[RequestId(f"big{i}")] for i in range(3)}
    assert len(reasons) == 1
    (refusal,) = reasons
    assert "capacity" in refusal.summary


def test_a_solve_stopped_within_the_gap_is_not_called_optimal() -> None:
    assert proven_status(cp_model.OPTIMAL, 1312, 1312) == "OPTIMAL"
    # CP-SAT's OPTIMAL within an absolute gap of 300: objective 1312, bound 1597.
    assert proven_status(cp_model.OPTIMAL, 1312, 1597) == "FEASIBLE"
    assert proven_status(cp_model.FEASIBLE, 1312, 1312) == "FEASIBLE"


def test_a_contended_batch_is_bounded_by_capacity_not_by_its_columns() -> None:
    """More one-GPU requests than GPUs: each fits somewhere, not all at once.

    The column bound counts every request; capacity counts the GPUs. The
    greedy fills every GPU, which the capacity bound proves optimal: no
    model is built.
    """
    snap = two_dgx()
    free = sum(len(s.view.whole_devices(DeviceKind.GPU)) for s in snap.hosts.values())
    requests = [gpus(f"r{i}", 1, tenant=f"t{i}") for i in range(free + 5)]
    result = solve_batch(Engine(), snap, requests, BatchSettings(workers=1))
    assert len(result.plans) == free
    assert result.status == "OPTIMAL" and not result.solved
    assert result.bound == result.objective
    outcompeted = {r.reasons()[0] for r in result.unplaced.values()} if result.unplaced else set()
    assert all("outcompeted" in why for why in outcompeted)


def test_the_capacity_bound_is_exact_for_weights_past_float_precision() -> None:
    """Priorities span int32: weights of a large batch pass 2**53, where floats drop units."""
    snap = two_dgx()
    engine = Engine()
    requests = [gpus(f"r{i}", 1, priority=p) for i, p in enumerate((-(2**31), 2**31 - 1, 0))]
    values = {0: 2**53 + 1, 1: 3 * 2**53 + 1, 2: 2**54 + 7}
    bound = capacity_bound(snap, engine.hardware_and_occupancy, requests, values)
    assert bound == sum(values.values())  # every request fits: nothing may be lost
