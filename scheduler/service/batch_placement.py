"""Batches and gangs: requests placed jointly by one CP-SAT solve, gangs all or nothing.

The batch is planned on one snapshot; its plans are then committed through
the plan applier, hosts side by side and each host's plans one by one, each
expecting the versions its predecessors' commits on the same host leave. A
plan whose commit loses a race is placed again alone; a gang with a member
that could not be placed is released whole.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tessera.scheduler.core.engine.batch import BatchSettings, solve_batch
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.identity import HostId, PlacementId, RequestId
from tessera.scheduler.core.plan import Plan
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState, with_reservation
from tessera.scheduler.core.validation import MAX_IDENT, shown
from tessera.scheduler.service.convert import Submitted
from tessera.scheduler.service.errors import SchedulerError
from tessera.scheduler.service.model_refresh import ModelRefresh
from tessera.scheduler.service.plan_applier import PlanApplier
from tessera.scheduler.service.request_claims import RequestClaims, new_claimant
from tessera.scheduler.service.request_placement import RequestPlacer
from tessera.scheduler.store.redis_store import CommitOutcome, HostRecord
from tessera.v1 import placement_pb2, scheduler_pb2

log = logging.getLogger(__name__)

#: PlaceBatch's solver limits: a frontend waits on the call.
DEFAULT_BATCH_SETTINGS = BatchSettings(time_limit_s=5.0, workers=4)

#: Requests looked up, and hosts committed on, at once.
BATCH_CONCURRENCY = 64

#: Releases a placement by its id (a gang member placed before its gang broke).
Release = Callable[[str], Awaitable[placement_pb2.Placement]]


class BatchPlacer:
    """Places batches of requests jointly, gangs all or nothing.

    Args:
        refresh: the live model's shared refreshes (the batch's snapshot).
        claims: the request-id claims.
        placer: places one request alone (a plan that lost its race).
        applier: commits the batch's plans and has hosts carry them out.
        release: releases a placement by id (a broken gang's members).
        engine: the placement engine.
        settings: CP-SAT limits.
    """

    def __init__(
        self,
        *,
        refresh: ModelRefresh,
        claims: RequestClaims,
        placer: RequestPlacer,
        applier: PlanApplier,
        release: Release,
        engine: Engine,
        settings: BatchSettings = DEFAULT_BATCH_SETTINGS,
    ) -> None:
        self._refresh = refresh
        self._claims = claims
        self._placer = placer
        self._applier = applier
        self._release = release
        self._engine = engine
        self._settings = settings

    async def place(
        self, batch: list[Submitted], all_or_nothing: bool
    ) -> tuple[list[placement_pb2.Placement], list[scheduler_pb2.Unplaced]]:
        """Place requests jointly (one CP-SAT batch), then commit and prepare each.

        Requests that share a ``gang`` (every request, with ``all_or_nothing``)
        are placed all or nothing: if one member fails to commit or prepare,
        the members already placed are released. A plan whose commit loses a
        race (the cluster moved since the snapshot) is placed again alone.
        Requests already placed (same request_id) get their placement back.

        Args:
            batch: the requests, converted (ids distinct).
            all_or_nothing: the whole batch is one gang.

        Returns:
            The placements, and the requests not placed with why, each in
            the batch's order.
        """
        placed: dict[str, placement_pb2.Placement] = {}
        failures: dict[str, list[str]] = {}
        todo: list[int] = []
        gate = asyncio.Semaphore(BATCH_CONCURRENCY)

        async def look_up(i: int, sub: Submitted) -> None:
            async with gate:
                try:
                    existing = await self._claims.existing(sub)
                except SchedulerError as err:
                    failures[sub.request.request_id] = [str(err)]
                    return
            if existing is not None:
                placed[sub.request.request_id] = existing
            else:
                todo.append(i)

        await asyncio.gather(*(look_up(i, sub) for i, sub in enumerate(batch)))
        todo.sort()
        gang_of = {
            sub.request.request_id: ("all-or-nothing" if all_or_nothing else sub.gang)
            for sub in batch
            if all_or_nothing or sub.gang
        }
        snapshot, records = await self._refresh.snapshot()
        result = solve_batch(
            self._engine, snapshot, [batch[i].request for i in todo], self._settings, gang_of
        )
        log.info(
            "batch of %d: %s, %d placed (%.3g GPU-equivalents), objective %d (bound %d, "
            "greedy %d), %.2fs%s",
            len(todo), result.status, len(result.plans), float(result.gpu_equivalents),
            result.objective, result.bound, result.greedy_objective, result.wall_s,
            "" if result.solved else ", no model",
        )  # fmt: skip
        index = {sub.request.request_id: i for i, sub in enumerate(batch)}
        for rid, refusal in result.unplaced.items():
            failures[rid] = [refusal.summary, *refusal.reasons()]
        broken_gangs = {gang_of[RequestId(r)] for r in failures if RequestId(r) in gang_of}
        by_host: dict[str, list[tuple[RequestId, Plan]]] = {}
        for rid, plan in result.plans.items():
            by_host.setdefault(plan.host_id, []).append((rid, plan))

        async def commit_on(host_id: str, plans: list[tuple[RequestId, Plan]]) -> None:
            """The host's plans in order, each expecting what its predecessors' commits left.

            Once one of them did not commit as planned, a foreign commit can
            reach the versions a later plan expects with other contents: the
            host's remaining requests are planned afresh instead.
            """
            # The host's state as the batch's commits so far leave it.
            predicted = snapshot.hosts[HostId(host_id)]
            replan = False
            for rid, plan in plans:
                if crashed:
                    return  # another host's commit failed past recovery: stop here too
                sub = batch[index[rid]]
                if gang_of.get(rid) in broken_gangs:
                    why = f"gang {shown(gang_of[rid], MAX_IDENT)} could not be placed whole"
                    failures[rid] = [why]
                    replan = True
                    continue
                try:
                    if replan:
                        placed[rid] = await self._placer.place(sub)
                        continue
                    placed[rid], as_planned = await self._commit_planned(
                        sub, plan, predicted, records.get(host_id)
                    )
                    if as_planned:
                        predicted = with_reservation(
                            ClusterSnapshot(hosts={plan.host_id: predicted}),
                            plan.host_id,
                            plan.slots,
                            PlacementId(placed[rid].placement_id),
                            sub.request.tenant,
                        ).hosts[plan.host_id]
                    else:
                        replan = True
                except SchedulerError as err:
                    failures[rid] = [str(err)]
                    replan = True
                    if rid in gang_of:
                        broken_gangs.add(gang_of[rid])

        async def gated(host_id: str, plans: list[tuple[RequestId, Plan]]) -> None:
            async with gate:
                try:
                    await commit_on(host_id, plans)
                except Exception as err:  # the store failed: the call fails, all hosts stop
                    crashed.append(err)

        # Hosts side by side (their commits share pipelines), each host's
        # plans one after the other.
        crashed: list[Exception] = []
        await asyncio.gather(*(gated(h, plans) for h, plans in by_host.items()))
        if crashed:
            raise crashed[0]
        for placed_id in list(placed):
            gang = gang_of.get(RequestId(placed_id))
            if gang is None or gang not in broken_gangs:
                continue
            placement = placed.pop(placed_id)
            why = f"gang {shown(gang, MAX_IDENT)} could not be placed whole"
            try:
                await self._release(placement.placement_id)
                failures[placed_id] = [f"{why}; released"]
            except SchedulerError as err:
                failures[placed_id] = [f"{why}; release failed: {err}"]
        ids = [sub.request.request_id for sub in batch]
        unplaced = [
            scheduler_pb2.Unplaced(request_id=rid, reasons=failures[rid])
            for rid in ids
            if rid in failures
        ]
        return [placed[rid] for rid in ids if rid in placed], unplaced

    async def _commit_planned(
        self, sub: Submitted, plan: Plan, state: HostState, record: HostRecord | None
    ) -> tuple[placement_pb2.Placement, bool]:
        """Commit a batch plan and prepare it; on a lost race, place the request alone.

        Returns:
            The placement, and whether it was committed as planned.
        """
        claimant = new_claimant()
        existing = await self._claims.claim(sub, claimant)
        if existing is not None:
            # Another call placed it, perhaps elsewhere: this host's later
            # plans cannot assume the generation this plan would have left.
            return existing, False
        if record is not None:
            commit, placement = await self._applier.commit(sub, plan, claimant, state)
            if commit.outcome is CommitOutcome.COMMITTED:
                return await self._applier.prepare(placement, record), True
            log.debug(
                "batch plan for %s lost its commit: %s", sub.request.request_id, commit.detail
            )
        return await self._placer.place_claimed(sub, claimant), False
