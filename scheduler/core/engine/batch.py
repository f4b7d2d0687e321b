"""Batches and gangs: one CP-SAT model over pruned candidates.

Placing requests one at a time lets an early request take what a later one
needed (a GPU and NIC pair under one switch, the only slice-0 MIG placement, a
whole host for a gang). A batch is solved jointly instead:

1. **Greedy seed.** The fast path places the requests in priority order on an
   evolving snapshot, gangs all or nothing. This is a valid solution, and the
   fallback when the solver finds nothing better in its time.
2. **Candidates.** Each request gets up to ``hosts_per_request`` complete host
   fits against the batch's starting state (the fast path's best hosts,
   spread so identical requests do not all crowd the same few hosts), plus
   its greedy fit. Interchangeable slots stay collapsed in pools: a column
   says "2 VFs of PF x", not which two.
3. **Model.** A boolean per column; at most one per request; gangs all or
   nothing. Columns share capacity through resources (an IOMMU group, a PF's
   free VFs, an mdev parent's share, MIG memory slices, compute slices and
   instance limits), devices through modes (one device, one use), and tenants
   through exclusivity domains.
4. **Objective.** Each placed request's value (:mod:`batch_value`: its
   priority rank times its GPU-equivalents), then placement quality from
   the engine's scorers, through a value larger than any total of quality.
   The greedy solution is the hint. When the greedy
   already places every request the columns can place, each in its best
   column (or within the settings' quality gap of it), no model is built.
5. **Concretization.** Chosen columns become plans host by host on an
   evolving snapshot, so VF indexes and mdev UUIDs are distinct and each
   plan expects the generation the previous commit leaves.

The solver is a pure function of its inputs and settings: no I/O, seeded,
and deterministic with one worker.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction

from ortools.sat.python import cp_model

from tessera.scheduler.core.engine.batch_bound import capacity_bound
from tessera.scheduler.core.engine.batch_value import (
    QUALITY_RANGE,
    gpu_equivalents_of,
    learn_gpu_units,
    request_values,
)
from tessera.scheduler.core.engine.fastpath import (
    Engine,
    HostFit,
    build_plan,
    fit_key,
    unschedulable,
)
from tessera.scheduler.core.engine.framework import Pick, Rejections
from tessera.scheduler.core.engine.plugins import free_vfs
from tessera.scheduler.core.host import HostView, domain_instance
from tessera.scheduler.core.identity import HostId, PciAddress, PlacementId, RequestId, TenantName
from tessera.scheduler.core.mig_geometry import DEFAULT_INSTANCE_LIMITS
from tessera.scheduler.core.occupancy import DOMAINS, mdev_free
from tessera.scheduler.core.plan import Plan, Rejection, Unschedulable
from tessera.scheduler.core.request import DeviceForm, ExclusivityDomain, PlacementRequest
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState, reserved, with_reservation

#: Named reasons of requests a batch leaves unplaced.
REASON_OUTCOMPETED = "outcompeted"
REASON_GANG_INCOMPLETE = "gang-incomplete"

#: Columns per request and host for a request with a required affinity
#: (see :meth:`Engine.alternatives`): every legal GPU+NIC pair of an 8-GPU
#: host is eight; the bound keeps a pathological host's columns few.
ASSIGNMENTS_PER_HOST = 64

#: CP-SAT refuses a model whose objective coefficients add up past 2**62:
#: beyond this (a margin below), the greedy seed stands without a model.
MAX_OBJECTIVE = 1 << 61

#: The finest unit an mdev parent's share is counted in (1/scale of the
#: parent), so that share sums stay far inside CP-SAT's 64-bit integers.
MAX_SHARE_SCALE = 1 << 30


@dataclass(frozen=True)
class BatchSettings:
    """How hard to try.

    Attributes:
        time_limit_s: the solver's wall-clock limit.
        workers: CP-SAT search workers; 1 is deterministic.
        seed: CP-SAT's random seed.
        hosts_per_request: candidate host fits per request.
        use_solver: False stops after the greedy seed (sequential placing).
        quality_gap: the share of placement quality the batch may leave
            unproven: the solver stops within it of its bound, and no model
            is built when the greedy seed is within it of the column bound
            (every request the columns can place placed, each in a column
            nearly as good as its best). Never trades a placed request:
            within the gap of the optimum, no solution places less
            value (see :func:`batch_value.request_values`). The column bound ignores
            capacity, so a greedy seed is often 2-9% below it; solved with
            no gap, the same batches gained at most 0.03% on the seed
            (BENCHMARKS.md (g)), for a model that costs more than the seed.
    """

    time_limit_s: float = 10.0
    workers: int = 8
    seed: int = 0
    hosts_per_request: int = 6
    use_solver: bool = True
    quality_gap: float = 0.1


@dataclass(frozen=True)
class BatchResult:
    """What a batch got.

    Attributes:
        plans: per placed request, its plan, in commit order.
        unplaced: per request left out, why.
        objective: the objective of the returned solution.
        bound: an upper bound on the objective of any placement of these
            requests: the lesser of each request in its best column and the
            capacity bound (:mod:`scheduler.core.engine.batch_bound`); not
            the solver's, which holds for its columns only. The greedy
            objective when the solver is off.
        greedy_objective: the objective of the greedy seed.
        status: "OPTIMAL" (by the solver, or without it when the greedy seed
            reaches the bound of each request in its best column),
            "FEASIBLE", or "GREEDY" when the seed stands (within the quality
            gap of the column bound, or the solver found nothing better).
        columns: candidate columns in the model.
        wall_s: time spent, candidates and solving included.
        solved: whether a model was built and solved (not when the greedy
            seed was within the quality gap of the column bound).
        model_bound: the solver's bound over its columns where a model ran
            (what its status is proven against), else 0.
        gpu_equivalents: the GPUs the placed requests take at least
            (:func:`scheduler.core.engine.batch_value.gpu_equivalents`).
    """

    plans: Mapping[RequestId, Plan]
    unplaced: Mapping[RequestId, Unschedulable]
    objective: int
    bound: int
    greedy_objective: int
    status: str
    columns: int = 0
    wall_s: float = 0.0
    solved: bool = False
    model_bound: int = 0
    gpu_equivalents: Fraction = Fraction(0)


@dataclass
class _Batch:
    """One batch being solved: its inputs and the columns built so far."""

    engine: Engine
    snapshot: ClusterSnapshot
    requests: Sequence[PlacementRequest]
    gang_of: Mapping[RequestId, str]
    gangs: Mapping[str, list[int]]
    started: float
    #: Per request, its GPU-equivalents.
    gpus: Sequence[Fraction]
    columns: list[_Column] = field(default_factory=list)
    #: (column, pick index) -> the MIG placement the model chose.
    mig_placements: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Column:
    request: int
    fit: HostFit
    from_greedy: bool = False


def _gangs(
    requests: Sequence[PlacementRequest], gang_of: Mapping[RequestId, str]
) -> dict[str, list[int]]:
    gangs: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        name = gang_of.get(r.request_id, "")
        if name:
            gangs[name].append(i)
    return dict(gangs)


def _greedy(
    batch: _Batch, order: Sequence[int]
) -> tuple[dict[int, HostFit], dict[int, Unschedulable], dict[int, Plan]]:
    """Place in order on an evolving snapshot; gangs all or nothing.

    Returns:
        Per placed request its fit and its plan (in the order placed), and
        per refused request why.
    """
    engine, requests, gangs, gang_of = batch.engine, batch.requests, batch.gangs, batch.gang_of
    snapshot = batch.snapshot
    fits: dict[int, HostFit] = {}
    plans: dict[int, Plan] = {}
    refused: dict[int, Unschedulable] = {}
    done: set[int] = set()
    # The greedy only ever adds reservations, and what fits nowhere fits
    # nowhere once more is taken (the engine's never-fits argument): a
    # request alike one refused earlier is refused for the same reasons,
    # without walking the cluster again (on a full cluster each walk judged
    # every host).
    refused_alike: dict[tuple[object, ...], Unschedulable] = {}
    current = snapshot
    for i in order:
        if i in done:
            continue
        gang = gang_of.get(requests[i].request_id, "")
        alike = fit_key(requests[i])
        if not gang and alike in refused_alike:
            refused[i] = refused_alike[alike]
            done.add(i)
            continue
        members = [m for m in order if m in gangs[gang]] if gang else [i]
        trial = current
        placed: dict[int, HostFit] = {}
        planned: dict[int, Plan] = {}
        failed: Unschedulable | None = None
        for m in members:
            request = requests[m]
            found, rejections = engine.candidates(trial, request, engine.feasible_hosts)
            if not found:
                failed = unschedulable(len(trial.hosts), request, rejections)
                break
            best = min(found, key=lambda f: (-f.score, f.state.view.host_id))
            placed[m] = best
            plan = planned[m] = build_plan(best, request)
            trial = with_reservation(
                trial, plan.host_id, plan.slots, _pseudo_id(request), request.tenant
            )
        done.update(members)
        if failed is None:
            fits.update(placed)
            plans.update(planned)
            current = trial
        elif not gang:
            refused[i] = refused_alike[alike] = failed
        else:
            for m in members:
                refused[m] = Unschedulable(
                    f"gang {gang!r} cannot be placed whole: {failed.summary}",
                    (*failed.rejections, Rejection("batch", REASON_GANG_INCOMPLETE, 1, gang)),
                )
    return fits, refused, plans


def _pseudo_id(request: PlacementRequest) -> PlacementId:
    # Placements planned offline have no id yet; the request id stands in.
    return PlacementId(f"planned:{request.request_id}")


def _quality(columns: Sequence[_Column]) -> list[int]:
    if not columns:
        return []
    scores = [c.fit.score for c in columns]
    low, high = min(scores), max(scores)
    span = max(1, high - low)
    return [round((s - low) * QUALITY_RANGE / span) for s in scores]


def _column_bound(
    columns: Sequence[_Column], weights: Sequence[int], quality: Sequence[int]
) -> tuple[int, int, dict[int, int]]:
    """An upper bound on the model's objective: each request in its best column.

    Capacity, modes and exclusivity can only take from it, and a gang's
    members count as if placed whole.

    Returns:
        The weights of the requests some column places, the sum of their
        best columns' quality, and per such request that best quality (what
        the capacity bound values each request at, with its weight).
    """
    best: dict[int, int] = {}
    for c, col in enumerate(columns):
        if quality[c] > best.get(col.request, -1):
            best[col.request] = quality[c]
    return sum(weights[i] for i in best), sum(best.values()), best


class _Resources:
    """Capacity shared by columns, keyed by name; consumption per column."""

    def __init__(self) -> None:
        self.capacity: dict[tuple[object, ...], int] = {}
        self.use: dict[tuple[object, ...], list[tuple[int, int]]] = defaultdict(list)
        # MIG placements are chosen by the model, not fixed by the column: a
        # column fitted alone would take the placement best for it alone, and
        # columns sharing a GPU would collide where a joint choice fits all.
        # (column, pick index, host, GPU, placements free at the start)
        self.mig_choices: list[tuple[int, int, HostId, str, tuple[tuple[int, int], ...]]] = []

    def add(self, key: tuple[object, ...], cap: int, column: int, amount: int) -> None:
        self.capacity.setdefault(key, cap)
        self.use[key].append((column, amount))


def _consume(
    engine: Engine,
    snapshot: ClusterSnapshot,
    column: int,
    col: _Column,
    res: _Resources,
    *,
    share: tuple[int, int] = (0, 0),
) -> None:
    """Record what one column takes, against the batch's starting state.

    ``share`` is the column's request's host CPU (milli) and memory (MiB).
    """
    fit = col.fit
    host = fit.state.view.host_id
    # Greedy columns were fitted on an evolved state; capacity is measured on
    # the starting state of the same host, which every column shares.
    base = snapshot.hosts[host]
    occ = engine.occupancy(base)
    view = base.view
    per_pool: dict[tuple[object, ...], int] = defaultdict(int)
    # Host CPU and memory beside the devices: columns on one host share what
    # it has left, as its devices' pools are shared.
    cpu, memory = share
    if cpu:
        per_pool[("host-cpu", host)] += cpu
        res.capacity.setdefault(("host-cpu", host), view.cpu_milli - occ.cpu_used)
    if memory:
        per_pool[("host-memory", host)] += memory
        res.capacity.setdefault(("host-memory", host), view.memory_mib - occ.memory_used)
    for k, pick in enumerate(fit.picks):
        option = pick.option
        device = option.device.address
        if option.form is DeviceForm.WHOLE_DEVICE:
            res.add(("group", host, option.group), 1, column, 1)
        elif option.form is DeviceForm.VF:
            # The same count the fast path offers (host-used VFs left out).
            free = len(free_vfs(view, occ, device)[0])
            per_pool[("vf", host, device)] += 1
            res.capacity.setdefault(("vf", host, device), free)
        elif option.form is DeviceForm.MDEV:
            parent = view.mdev_parents[device]
            used = occ.mdev_used.get(device, {})
            pending = occ.mdev_pending.get(device, {})
            per_pool[("mdev-type", host, device, option.variant)] += 1
            res.capacity.setdefault(
                ("mdev-type", host, device, option.variant),
                mdev_free(parent, option.variant, used, pending),
            )
            # Shares in units of 1/scale of the parent: exact with the lcm of
            # the types' limits, which real parents keep small (vGPU types
            # allow 1 to 24 instances, shared/reference/mdev_types.json). Limits
            # from a malformed report could make it overflow the solver's
            # 64-bit coefficients; then a coarser scale with each instance's
            # share rounded up keeps the parent from being overfilled.
            scale = min(
                math.lcm(*(max(1, t.max_instances) for t in parent.types.values())),
                MAX_SHARE_SCALE,
            )
            fill = sum(
                (
                    Fraction(n, max(1, parent.types[t].max_instances))
                    for t, n in used.items()
                    if t in parent.types
                ),
                Fraction(0),
            )
            per_pool[("mdev-share", host, device)] += -(
                -scale // max(1, parent.types[option.variant].max_instances)
            )
            res.capacity.setdefault(("mdev-share", host, device), math.floor((1 - fill) * scale))
        else:
            layout = occ.mig_layouts[device]
            gpu = view.gpus[device]
            profile = next(p for p in gpu.mig_profiles if p.name == option.variant)
            open_placements = tuple(p for p in profile.placements if layout.memory_free(p))
            res.mig_choices.append((column, k, host, device, open_placements))
            per_pool[("mig-compute", host, device)] += profile.slices
            res.capacity.setdefault(("mig-compute", host, device), layout.free_compute)
            limit = DEFAULT_INSTANCE_LIMITS.get(profile.profile_id)
            if limit is not None:
                per_pool[("mig-limit", host, device, profile.profile_id)] += 1
                res.capacity.setdefault(
                    ("mig-limit", host, device, profile.profile_id),
                    limit - layout.counts.get(profile.profile_id, 0),
                )
    for key, amount in per_pool.items():
        res.use[key].append((column, amount))


def solve_batch(
    engine: Engine,
    snapshot: ClusterSnapshot,
    requests: Sequence[PlacementRequest],
    settings: BatchSettings = BatchSettings(),
    gang_of: Mapping[RequestId, str] | None = None,
) -> BatchResult:
    """Place a batch of requests jointly.

    Args:
        engine: the engine whose plugins filter and score.
        snapshot: the cluster before the batch.
        requests: validated requests with distinct request ids.
        settings: solver limits.
        gang_of: request id -> gang name; members of a gang are placed all
            or nothing.

    Returns:
        Plans for the placed requests, reasons for the others, and the
        objective against the solver's bound.
    """
    started = time.perf_counter()
    # What learns from demand sees a batch's requests as it sees single ones
    # (once each: a batch plan that loses its commit is placed again alone).
    for request in requests:
        engine.observe(request)
    gang_of = dict(gang_of or {})
    gangs = _gangs(requests, gang_of)

    # Requests are worth their priority rank times their GPU-equivalents
    # (batch_value). The seed takes them by priority, then, in a joint
    # batch, largest first, as first fit decreasing packs bins: small
    # requests placed first scatter over the hosts and leave no host whole
    # for an 8-GPU request, whose GPUs are worth as much as theirs. Without
    # the solver the batch is sequential placement, in the order given.
    units = learn_gpu_units(snapshot, engine.hardware_and_occupancy, requests)
    gpus = gpu_equivalents_of(requests, units)
    weights = request_values(requests, gpus)
    sequential = sorted(range(len(requests)), key=lambda i: (-requests[i].priority, i))
    # Stable: among equal priority and value, still in the order given.
    order = (
        sorted(sequential, key=lambda i: (-requests[i].priority, -weights[i]))
        if settings.use_solver
        else sequential
    )
    batch = _Batch(engine, snapshot, requests, gang_of, gangs, started, gpus)
    greedy, refused, greedy_plans = _greedy(batch, order)
    if refused and sequential != order:
        # Largest first can lose to the order requests came in: a large
        # request's best column takes the device a small one needed, where
        # placed after the small one it would have gone beside it (the
        # model only has each request's columns on the starting state, so
        # it cannot find that pair either). A batch must never place less
        # than placing one by one does: when the seed left something out,
        # the one-by-one order is tried too, and the seed worth more stands.
        # (Without the solver the two orders are one.)
        other = _greedy(batch, sequential)
        if sum(weights[i] for i in other[0]) > sum(weights[i] for i in greedy):
            greedy, refused, greedy_plans = other

    # Candidate columns against the starting state.
    columns = batch.columns
    reasons: dict[int, Unschedulable] = {}
    load: dict[HostId, int] = defaultdict(int)
    # Alike requests (the same fit key) get the same fits: worked out once.
    fits_of: dict[tuple[object, ...], tuple[list[HostFit], Rejections]] = {}
    others_of: dict[tuple[tuple[object, ...], HostId], list[HostFit]] = {}
    if settings.use_solver:
        for i in order:
            request = requests[i]
            alike = fit_key(request)
            if alike not in fits_of:
                fits_of[alike] = engine.candidates(
                    snapshot, request, settings.hosts_per_request * 4
                )
            fits, rejections = fits_of[alike]
            # Spread: hosts already holding many columns come after fresh ones.
            found = sorted(
                fits, key=lambda f: (load[f.state.view.host_id], -f.score, f.state.view.host_id)
            )
            for fit in found[: settings.hosts_per_request]:
                host = fit.state.view.host_id
                load[host] += 1
                columns.append(_Column(i, fit))
                if not refused or not any(a.required for a in request.affinities):
                    continue
                # A host's one best fit is every alike request's column there:
                # seven GPU+NIC same-switch requests on one HGX host shared
                # one pair, and the model could not move one of them onto the
                # pair under another switch that stayed free (it refused it
                # as outcompeted). With a required affinity only few
                # assignments are legal, so each legal one is a column. Only
                # when the greedy left something out: with everything placed
                # no column can place more.
                others = others_of.get((alike, host))
                if others is None:
                    others = others_of[(alike, host)] = engine.alternatives(
                        fit.state, request, ASSIGNMENTS_PER_HOST
                    )
                columns.extend(_Column(i, other) for other in others if other.picks != fit.picks)
            if not found:
                reasons[i] = unschedulable(len(snapshot.hosts), request, rejections)
    greedy_columns = {}
    for i, fit in greedy.items():
        greedy_columns[i] = len(columns)
        columns.append(_Column(i, fit, from_greedy=True))

    quality = _quality(columns)
    greedy_objective = sum(weights[i] + quality[greedy_columns[i]] for i in greedy)

    def greedy_stands(bound: int, status: str = "GREEDY", solved: bool = False) -> BatchResult:
        # Without gangs the greedy placed in the order plans are made in, on
        # the same evolving snapshot: its plans are those, already made. A
        # request it refused that has a column fits the cluster as the batch
        # found it: the batch's own requests took its room (outcompeted),
        # whatever the greedy saw once they had.
        fitted = {col.request for col in columns if not col.from_greedy}
        return _finish(
            batch, [greedy_columns[i] for i in greedy],
            {i: why for i, why in refused.items() if i not in fitted},
            objective=greedy_objective, bound=bound,
            greedy_objective=greedy_objective, status=status,
            made=None if gangs else greedy_plans, solved=solved,
        )  # fmt: skip

    if not settings.use_solver or not columns:
        return greedy_stands(greedy_objective)
    placeable, best_quality, best_of = _column_bound(columns, weights, quality)
    relaxed = placeable + best_quality
    # Less than one request's weight (quality sums stay below it).
    slack = math.floor(min(1.0, max(0.0, settings.quality_gap)) * best_quality)
    if greedy_objective < relaxed - slack:
        # Capacity binds where columns do not: requests that each fit
        # somewhere may not all fit at once. Worked out only here, where a
        # model would otherwise be built (a roomy cluster's seed meets the
        # column bound and stands without it). Both bounds hold for any
        # placement of the batch, not only for the model's columns.
        relaxed = min(
            relaxed,
            capacity_bound(
                snapshot,
                engine.hardware_and_occupancy,
                requests,
                {i: weights[i] + q for i, q in best_of.items()},
                units,
            ),
        )
    if greedy_objective >= relaxed:
        # Every request the columns can place is placed, each in its best
        # column (large batches on roomy clusters), or the capacity bound
        # is met: no placement scores more, so the greedy is optimal
        # without building a model.
        return greedy_stands(relaxed, "OPTIMAL")
    if greedy_objective >= relaxed - slack:
        return greedy_stands(relaxed)

    model = cp_model.CpModel()
    x = [model.new_bool_var(f"x{c}") for c in range(len(columns))]
    by_request: dict[int, list[int]] = defaultdict(list)
    for c, col in enumerate(columns):
        by_request[col.request].append(c)
    placed = {}
    for i, cs in by_request.items():
        model.add_at_most_one(x[c] for c in cs)
        placed[i] = sum(x[c] for c in cs)
    for members in gangs.values():
        gang_var = model.new_bool_var("gang")
        for m in members:
            model.add(placed.get(m, 0) == gang_var)

    res = _Resources()
    for c, col in enumerate(columns):
        request = requests[col.request]
        _consume(engine, snapshot, c, col, res, share=(request.cpu_milli, request.memory_mib))
    for key, uses in res.use.items():
        model.add(sum(amount * x[c] for c, amount in uses) <= max(0, res.capacity[key]))
    mig_vars = _add_mig_placements(model, x, columns, res)

    _add_modes(model, x, columns)
    _add_exclusivity(model, x, columns, requests)

    coefficients = [weights[col.request] + quality[c] for c, col in enumerate(columns)]
    if sum(coefficients) > MAX_OBJECTIVE:
        # CP-SAT would refuse the model (MODEL_INVALID). Values stay within
        # batch_value.MAX_TOTAL, which the default settings' columns per
        # request keep far below this; only settings with many more columns
        # per request reach it. The seed stands, said so by its status.
        return greedy_stands(relaxed)
    model.maximize(sum(coef * x[c] for c, coef in enumerate(coefficients)))
    for c in range(len(columns)):
        model.add_hint(x[c], 1 if columns[c].from_greedy else 0)
    for (c, k), choices in mig_vars.items():
        pick = columns[c].fit.picks[k]
        for start, _, var in choices:
            model.add_hint(var, 1 if columns[c].from_greedy and start == pick.mig_start else 0)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = settings.time_limit_s
    solver.parameters.num_workers = settings.workers
    solver.parameters.random_seed = settings.seed
    solver.parameters.absolute_gap_limit = slack
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return greedy_stands(relaxed, solved=True)
    objective = round(solver.objective_value)
    # The solver's bound holds for its columns only (a placement elsewhere
    # may score more): the batch reports the bound for any placement.
    model_bound = round(solver.best_objective_bound)
    bound = relaxed
    if objective < greedy_objective:
        # The hint should make this impossible; keep the better one regardless.
        return greedy_stands(relaxed, solved=True)
    chosen = [c for c in range(len(columns)) if solver.value(x[c])]
    for (c, k), choices in mig_vars.items():
        for start, size, var in choices:
            if solver.value(var):
                batch.mig_placements[(c, k)] = (start, size)
    return _finish(
        batch, chosen, reasons, objective=objective, bound=bound,
        greedy_objective=greedy_objective, status=proven_status(status, objective, model_bound),
        solved=True, model_bound=model_bound,
    )  # fmt: skip


def proven_status(status: cp_model.CpSolverStatus, objective: int, bound: int) -> str:
    """What a solve proved: OPTIMAL only when its bound meets its objective.

    CP-SAT reports OPTIMAL as soon as it is within the absolute gap it was
    allowed (``BatchSettings.quality_gap``): that is a solution, not a proof.
    """
    return "OPTIMAL" if status == cp_model.OPTIMAL and bound <= objective else "FEASIBLE"


def _claimed(view: HostView, pick: Pick) -> tuple[PciAddress, ...]:
    """The devices a pick takes: a whole device's every group endpoint, else its device."""
    if pick.option.form is DeviceForm.WHOLE_DEVICE and pick.option.group is not None:
        return view.group_endpoints(pick.option.group) or (pick.option.device.address,)
    return (pick.option.device.address,)


def _add_mig_placements(
    model: cp_model.CpModel,
    x: Sequence[cp_model.IntVar],
    columns: Sequence[_Column],
    res: _Resources,
) -> dict[tuple[int, int], list[tuple[int, int, cp_model.IntVar]]]:
    """A placement choice per MIG unit of a chosen column; memory slices never overlap."""
    on_slice: dict[tuple[HostId, str, int], list[cp_model.IntVar]] = defaultdict(list)
    out: dict[tuple[int, int], list[tuple[int, int, cp_model.IntVar]]] = {}
    for c, k, host, gpu, free in res.mig_choices:
        choices = []
        for start, size in free:
            var = model.new_bool_var(f"mig{c}.{k}@{start}")
            choices.append((start, size, var))
            for s in range(start, start + size):
                on_slice[(host, gpu, s)].append(var)
        # Exactly one placement if the column is chosen, none otherwise.
        model.add(sum(v for _, _, v in choices) == x[c])
        out[(c, k)] = choices
    for vars_ in on_slice.values():
        model.add_at_most_one(vars_)
    return out


def _add_modes(
    model: cp_model.CpModel, x: Sequence[cp_model.IntVar], columns: Sequence[_Column]
) -> None:
    """One device, one use: columns using a device in different modes exclude each other.

    A VF column uses its PF's every VF function in VF mode: chosen columns
    never put VFs of a PF and mdevs on its VFs (or a whole group holding one
    of its VFs) side by side in one batch, whose concretization draws VF
    indexes lowest first.
    """
    modes: dict[tuple[HostId, str], dict[object, list[int]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for c, col in enumerate(columns):
        view = col.fit.state.view
        for pick in col.fit.picks:
            mode: object = pick.option.form
            parent = view.mdev_parents.get(pick.option.device.address)
            if pick.option.form is DeviceForm.MDEV and parent is not None and parent.single_type:
                # One type at a time on such a parent: each type is its own mode.
                mode = (pick.option.form, pick.option.variant)
            claimed = _claimed(view, pick)
            pf = view.sriov_pfs.get(pick.option.device.address)
            if pick.option.form is DeviceForm.VF and pf is not None:
                # A column says "n VFs of a PF", not which: any of its VF
                # functions may be drawn, so none of them may be an mdev
                # parent (SR-IOV vGPU) or in a whole group of another column.
                claimed = (*claimed, *(vf.address for vf in pf.vfs))
            for address in claimed:
                modes[(view.host_id, address)][mode].append(c)
    for by_form in modes.values():
        if len(by_form) < 2:
            continue
        ys = []
        for cs in by_form.values():
            y = model.new_bool_var("mode")
            for c in cs:
                model.add_implication(x[c], y)
            ys.append(y)
        model.add_at_most_one(ys)


def _add_exclusivity(
    model: cp_model.CpModel,
    x: Sequence[cp_model.IntVar],
    columns: Sequence[_Column],
    requests: Sequence[PlacementRequest],
) -> None:
    """No other tenant inside a domain instance a chosen column holds exclusively."""
    touching: dict[tuple[HostId, ExclusivityDomain, str], dict[TenantName, list[int]]] = (
        defaultdict(lambda: defaultdict(list))
    )
    holds: list[tuple[int, tuple[HostId, ExclusivityDomain, str]]] = []
    for c, col in enumerate(columns):
        request = requests[col.request]
        view = col.fit.state.view
        for pick in col.fit.picks:
            for address in _claimed(view, pick):
                device = view.functions[address]
                for domain in DOMAINS:
                    key = (view.host_id, domain, domain_instance(view, device, domain))
                    touching[key][request.tenant].append(c)
                    if domain is request.exclusivity and address == pick.option.device.address:
                        holds.append((c, key))
    present: dict[tuple[tuple[HostId, ExclusivityDomain, str], TenantName], cp_model.IntVar] = {}
    for c, key in holds:
        tenant = requests[columns[c].request].tenant
        for other, cs in touching[key].items():
            if other == tenant:
                continue
            var = present.get((key, other))
            if var is None:
                var = model.new_bool_var("present")
                for o in cs:
                    model.add_implication(x[o], var)
                present[(key, other)] = var
            model.add_bool_or([x[c].negated(), var.negated()])


def _finish(
    batch: _Batch,
    chosen: Sequence[int],
    unplaced: Mapping[int, Unschedulable],
    *,
    objective: int,
    bound: int,
    greedy_objective: int,
    status: str,
    made: Mapping[int, Plan] | None = None,
    solved: bool = False,
    model_bound: int = 0,
) -> BatchResult:
    """Concretize chosen columns host by host and say why the rest are out.

    Args:
        batch: the batch.
        chosen: the columns placed.
        unplaced: why requests left out were refused, where known.
        objective: the chosen solution's objective.
        bound: the bound on any placement of the batch (see BatchResult).
        greedy_objective: the greedy seed's objective.
        status: how the solution was found.
        made: per request, its plan made already in the order below on the
            same evolving snapshot (the greedy's, where it stands): taken
            as it is.
        solved: whether a model was solved.
        model_bound: the solver's bound over its columns, where it ran.
    """
    requests, columns, gangs, gang_of = batch.requests, batch.columns, batch.gangs, batch.gang_of
    # The hosts as the plans so far leave them: only those, not a snapshot
    # of the whole cluster per plan.
    current: dict[HostId, HostState] = {}
    plans: dict[RequestId, Plan] = {}
    if made is not None:
        plans = {requests[i].request_id: plan for i, plan in made.items()}
    order = (
        sorted(chosen, key=lambda c: (-requests[columns[c].request].priority, columns[c].request))
        if made is None
        else []
    )
    for c in order:
        col = columns[c]
        request = requests[col.request]
        host = col.fit.state.view.host_id
        state = current[host] if host in current else batch.snapshot.hosts[host]
        # The same picks on the host as the batch left it so far: VF indexes
        # and mdev UUIDs are drawn afresh, distinct from earlier plans.
        picks = tuple(
            replace(pick, mig_start=where[0], mig_size=where[1])
            if (where := batch.mig_placements.get((c, k))) is not None
            else pick
            for k, pick in enumerate(col.fit.picks)
        )
        plan = build_plan(HostFit(state, picks, col.fit.score, col.fit.reasons), request)
        plans[request.request_id] = plan
        current[host] = reserved(state, plan.slots, _pseudo_id(request), request.tenant)
    out: dict[RequestId, Unschedulable] = {}
    for i, request in enumerate(requests):
        if request.request_id in plans:
            continue
        if i in unplaced:
            out[request.request_id] = unplaced[i]
            continue
        gang = gang_of.get(request.request_id, "")
        if gang:
            out[request.request_id] = Unschedulable(
                f"gang {gang!r} cannot be placed whole",
                (Rejection("batch", REASON_GANG_INCOMPLETE, len(gangs[gang]), gang),),
            )
        else:
            out[request.request_id] = Unschedulable(
                "its candidate hosts went to requests of the batch worth more "
                "(priority rank x GPU-equivalents) or packing better",
                (Rejection("batch", REASON_OUTCOMPETED, 1, request.request_id),),
            )
    return BatchResult(
        plans=plans,
        unplaced=out,
        objective=objective,
        bound=max(bound, objective),
        greedy_objective=greedy_objective,
        status=status,
        columns=len(columns),
        wall_s=time.perf_counter() - batch.started,
        solved=solved,
        model_bound=model_bound,
        gpu_equivalents=sum(
            (g for r, g in zip(requests, batch.gpus, strict=True) if r.request_id in plans),
            Fraction(0),
        ),
    )
