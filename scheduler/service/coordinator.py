"""From request to device: validate, plan on a snapshot, commit, prepare, confirm.

The coordinator is the scheduler's use-case layer. It plans on the replica's
live model of the cluster (:mod:`scheduler.service.cluster_model`, brought up
to date from the store's change feed before each plan), asks the pure core for
a plan, commits the plan with the store's atomic generation-checked applier
(Nomad's optimistic workers with one serial verifier, here the Lua script),
and only then asks the agent to carry it out: reserve (PENDING) -> agent
Prepare -> READY. Losing a commit race means planning again on fresher state,
a bounded number of times.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import redis.exceptions

from scheduler.core import guards
from scheduler.core.engine.batch import BatchSettings, solve_batch
from scheduler.core.engine.fastpath import Engine
from scheduler.core.engine.policies import Policy, TesseraPolicy
from scheduler.core.identity import (
    PlacementId,
    RequestId,
    TenantName,
    iommu_group_slot,
)
from scheduler.core.plan import Plan, Unschedulable
from scheduler.core.request import PlacementRequest
from scheduler.core.snapshot import ClusterSnapshot, HostState, with_reservation
from scheduler.core.validation import (
    MAX_IDENT,
    MAX_TEXT,
    FieldViolation,
    InvalidRequestError,
    shown,
    validate_address,
    validate_identifier,
    validate_lookup,
    validate_text,
)
from scheduler.service.agent_gateway import AgentCallError, AgentGateway
from scheduler.service.cluster_model import LiveCluster
from scheduler.service.convert import (
    FAILED,
    PENDING,
    READY,
    RELEASING,
    parsed_request,
    parsed_requests,
    placement_from_plan,
    request_digest,
    with_state,
)
from scheduler.service.errors import (
    ContentionError,
    HostBusyError,
    HostNotFoundError,
    HostOperationError,
    NoCapacityError,
    PlacementBusyError,
    PlacementNotFoundError,
    RequestIdReusedError,
    SchedulerError,
)
from scheduler.service.inventory_check import check_inventory, inventory_violations
from scheduler.store import schema
from scheduler.store.redis_store import (
    ClaimOutcome,
    CommitOutcome,
    CommitResult,
    ForgetOutcome,
    HostRecord,
    RedisStateStore,
    StoreError,
)
from tessera.v1 import inventory_pb2, placement_pb2, scheduler_pb2

log = logging.getLogger(__name__)

#: Commit attempts before giving up with ABORTED. Each lost race means
#: another placement landed on the chosen host; replanning sees it.
MAX_COMMIT_ATTEMPTS = 16

#: Pauses between attempts to confirm a prepared placement READY while the
#: store is unreachable (about 6 s in all: a Valkey restart or failover).
READY_RETRY_DELAYS_S = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)

#: Claims of one request id before giving up: only a release racing the
#: claim (the placement vanished between claim and read) makes another.
MAX_CLAIM_ATTEMPTS = 3


#: PlaceBatch's solver limits: a frontend waits on the call.
DEFAULT_BATCH_SETTINGS = BatchSettings(time_limit_s=5.0, workers=4)

#: Releases a drain runs at once: the agent tears down placements on
#: different devices side by side, and a host with hundreds of VF placements
#: should not take hundreds of round trips one after the other.
DRAIN_CONCURRENCY = 8


def _request_key(msg: placement_pb2.PlacementRequest) -> str:
    """The store's name of a request's id: its tenant's (see ``schema.tenant_request``)."""
    return schema.tenant_request(msg.tenant, msg.request_id)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _claimant() -> str:
    """A unique name for one call's claim on its request id."""
    return f"call-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Leases:
    """Heartbeat cadence and how long a silent host stays schedulable."""

    heartbeat_interval_s: int = 5
    lease_s: int = 20


class PlacementCoordinator:
    """Places, releases and looks up placements.

    Args:
        store: the Redis state store.
        agents: reaches agents to carry placements out.
        leases: heartbeat settings.
        clock_ms: current time in ms (injectable for lease tests).
        engine: the placement engine (its host index is reused across calls).
        batch_settings: CP-SAT limits for PlaceBatch.
        policy: how Place chooses (default Tessera's engine); the baselines
            of :mod:`scheduler.core.engine.policies` are there for comparing
            on the same service. PlaceBatch and Explain always use the engine.
    """

    def __init__(
        self,
        store: RedisStateStore,
        agents: AgentGateway,
        leases: Leases = Leases(),
        clock_ms: Callable[[], int] = _now_ms,
        *,
        engine: Engine | None = None,
        batch_settings: BatchSettings = DEFAULT_BATCH_SETTINGS,
        policy: Policy | None = None,
    ) -> None:
        self._store = store
        self._agents = agents
        self._leases = leases
        self._clock_ms = clock_ms
        # The cluster as this replica plans on it, followed through the feed.
        self._model = LiveCluster(store, clock_ms)
        self._engine = engine if engine is not None else Engine()
        self._policy: Policy = policy if policy is not None else TesseraPolicy(engine=self._engine)
        self._batch_settings = batch_settings
        # Shared refreshes of the model (see refreshed): the round callers
        # join, and the task running rounds while any caller waits.
        self._next_read: asyncio.Future[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        # Commit outcomes so far (COMMITTED, CONFLICT, ...): the conflict
        # rate shows how often replicas (or this one) planned on moved state.
        self.commit_outcomes: Counter[str] = Counter()

    @property
    def leases(self) -> Leases:
        """Heartbeat settings handed to agents."""
        return self._leases

    @property
    def model(self) -> LiveCluster:
        """The replica's live model of the cluster."""
        return self._model

    # -- snapshot ---------------------------------------------------------

    async def snapshot(self) -> tuple[ClusterSnapshot, dict[str, HostRecord]]:
        """The model, brought up to date after this call began, as an immutable snapshot.

        Returns:
            The snapshot, and every host's record as last read (inventories
            left out).
        """
        await self.refreshed()
        return self._model.frozen(), self._model.records()

    async def refreshed(self) -> None:
        """Bring the model up to what the store held at some point after this call began.

        Concurrent calls share refreshes: a caller arriving while one is in
        flight waits for the next, which starts as soon as that one ends and
        serves everyone who came meanwhile. Each caller thus plans on the
        store as it was after it asked (a replan after a lost commit sees the
        winner), and a replica under load reads the feed once per round of
        callers instead of once per caller.
        """
        loop = asyncio.get_running_loop()
        if self._next_read is None or self._next_read.get_loop() is not loop:
            self._next_read = loop.create_future()
        if self._reader is None or self._reader.done() or self._reader.get_loop() is not loop:
            self._reader = loop.create_task(self._read_rounds())
        # Shielded: a caller that gives up must not cancel its round for the others.
        await asyncio.shield(self._next_read)

    async def _read_rounds(self) -> None:
        """Serve the waiting callers one refresh at a time until none wait."""
        try:
            while self._next_read is not None:
                round_, self._next_read = self._next_read, None
                try:
                    await self._model.refresh()
                except asyncio.CancelledError:
                    # Shutting down: nobody waits for ever on a round that
                    # will not be read.
                    round_.cancel()
                    if self._next_read is not None:
                        self._next_read.cancel()
                        self._next_read = None
                    raise
                except Exception as err:  # every waiter of the round gets it
                    round_.set_exception(err)
                    # Nobody may be waiting any more (all cancelled): mark it
                    # seen, so asyncio does not log it as never retrieved.
                    round_.exception()
                else:
                    round_.set_result(None)
        finally:
            self._reader = None

    # -- placing ----------------------------------------------------------

    async def _existing(
        self, msg: placement_pb2.PlacementRequest, digest: str
    ) -> placement_pb2.Placement | None:
        """The placement this request id already made, if any (a read, no claim)."""
        found = await self._store.placement_for_request(_request_key(msg))
        if found is None:
            return None
        placement_id, stored_digest = found
        self._check_digest(msg, digest, stored_digest)
        return await self._answer(msg, placement_id)

    @staticmethod
    def _check_digest(msg: placement_pb2.PlacementRequest, digest: str, stored: str) -> None:
        if stored != digest:
            # Not which placement it made: the first caller may be another
            # tenant, and its placement id names the host it runs on.
            raise RequestIdReusedError(
                f"request_id {shown(msg.request_id, MAX_IDENT)} was already used for a "
                "different request; choose a new request_id"
            )

    async def _answer(
        self, msg: placement_pb2.PlacementRequest, placement_id: str
    ) -> placement_pb2.Placement | None:
        """What a repeated request is told: the placement its first call made."""
        stored = await self._store.get_placement(placement_id)
        if stored is None:
            return None
        placement = placement_pb2.Placement.FromString(stored[1])
        state = await self._store.placement_state(stored[0], placement_id)
        if state == PENDING:
            # Another call with this request_id is carrying it out right now.
            raise PlacementBusyError(
                f"request {shown(msg.request_id, MAX_IDENT)} is still being prepared on host "
                f"{placement.host_id} (placement {placement_id}); retry shortly"
            )
        if state == FAILED:
            raise HostOperationError(
                f"request {shown(msg.request_id, MAX_IDENT)} failed on host {placement.host_id}: "
                f"{placement.message}"
            )
        return placement

    async def _claim(
        self, msg: placement_pb2.PlacementRequest, digest: str, claimant: str
    ) -> placement_pb2.Placement | None:
        """Take the request id for this call (step 1 of the commit protocol).

        Returns:
            None when this call holds the claim and must place the request;
            the first call's placement when the request was placed already.

        Raises:
            RequestIdReusedError: the id belongs to another request.
            PlacementBusyError: another call is placing it right now.
        """
        for _ in range(MAX_CLAIM_ATTEMPTS):
            claim = await self._store.claim_request(_request_key(msg), digest, claimant)
            self._check_digest(msg, digest, claim.digest)
            if claim.outcome is ClaimOutcome.CLAIMED:
                return None
            if claim.outcome is ClaimOutcome.BUSY:
                raise PlacementBusyError(
                    f"request {shown(msg.request_id, MAX_IDENT)} is being placed by another "
                    "call; retry shortly"
                )
            answer = await self._answer(msg, claim.placement_id)
            if answer is not None:
                return answer
            # Released between the claim and the read: claim it afresh.
        raise ContentionError(
            f"request {shown(msg.request_id, MAX_IDENT)} kept changing under its claim; retry"
        )

    async def explain(self, msg: placement_pb2.PlacementRequest) -> Plan | Unschedulable:
        """Dry run: the plan the request would get now, or why it cannot be placed."""
        request = parsed_request(msg)
        await self.refreshed()
        return self._engine.schedule(self._model.live(), request, explain=True)

    async def place(
        self, msg: placement_pb2.PlacementRequest, prefix: str = ""
    ) -> placement_pb2.Placement:
        """Place one request and have its host carry it out.

        Idempotent on request_id: a retry gets the placement the first call made.

        Args:
            msg: the request.
            prefix: prepended to field paths in errors ("requests[2]." in a batch).

        Raises:
            InvalidRequestError: the request is malformed (nothing is written).
            RequestIdReusedError: the request_id belongs to another request.
            NoCapacityError: no host can take it.
            ContentionError: every commit lost a race.
            HostOperationError: the agent failed; the reservation is released.
        """
        request = parsed_request(msg, prefix)
        digest = request_digest(msg)
        claimant = _claimant()
        existing = await self._claim(msg, digest, claimant)
        if existing is not None:
            return existing
        return await self._place_claimed(msg, request, digest, claimant)

    async def _place_claimed(
        self,
        msg: placement_pb2.PlacementRequest,
        request: PlacementRequest,
        digest: str,
        claimant: str,
    ) -> placement_pb2.Placement:
        """Plan and commit a request this call has claimed, replanning on lost races."""
        try:
            for attempt in range(MAX_COMMIT_ATTEMPTS):
                await self.refreshed()
                # Planned without yielding: the live model cannot move under it.
                live = self._model.live()
                result = self._policy.place(live, request)
                if isinstance(result, Unschedulable):
                    raise NoCapacityError(result.summary, result.reasons())
                record = self._model.record(result.host_id)
                if record is None:  # the engine only plans on hosts the model holds
                    raise StoreError(f"host {result.host_id} planned on but not in the model")
                state = live.hosts[result.host_id]
                commit, placement = await self._commit(msg, result, claimant, state)
                if commit.outcome is CommitOutcome.COMMITTED:
                    return await self._prepare(placement, record)
                if commit.outcome is CommitOutcome.CONFLICT:
                    # The model is behind the store on this host (or the
                    # store lost it): read it again before the next plan.
                    self._model.mark_stale(result.host_id)
                if commit.outcome is CommitOutcome.LOST:
                    # This call stalled past its claim's deadline and another
                    # took the request over: answer as it does, or claim again.
                    existing = await self._claim(msg, digest, claimant)
                    if existing is not None:
                        return existing
                log.debug("commit attempt %d lost: %s", attempt + 1, commit.detail)
                # Back off a little so racing replicas do not replan in lockstep.
                await asyncio.sleep(0.002 * (attempt + 1))
            raise ContentionError(
                f"the cluster changed under {MAX_COMMIT_ATTEMPTS} commit attempts; "
                "retry the request"
            )
        except (NoCapacityError, ContentionError):
            # Every commit of this call answered, and none landed: the id is
            # free for a retry now rather than once the claim expires. After
            # any other error a commit may have landed; the claim stays for
            # the next caller or the housekeeper to resolve.
            await self._store.abandon_claim(_request_key(msg), claimant)
            raise

    async def place_batch(
        self, msgs: list[placement_pb2.PlacementRequest], all_or_nothing: bool
    ) -> tuple[list[placement_pb2.Placement], list[scheduler_pb2.Unplaced]]:
        """Place requests jointly (one CP-SAT batch), then commit and prepare each.

        Requests that share a ``gang`` (every request, with ``all_or_nothing``)
        are placed all or nothing: if one member fails to commit or prepare,
        the members already placed are released. A plan whose commit loses a
        race (the cluster moved since the snapshot) is placed again alone.
        Requests already placed (same request_id) get their placement back.

        Raises:
            InvalidRequestError: any request is malformed; nothing is placed.
        """
        requests = parsed_requests(msgs)
        placed: dict[str, placement_pb2.Placement] = {}
        failures: dict[str, list[str]] = {}
        todo: list[int] = []
        for i, msg in enumerate(msgs):
            try:
                existing = await self._existing(msg, request_digest(msg))
            except SchedulerError as err:
                failures[msg.request_id] = [str(err)]
                continue
            if existing is not None:
                placed[msg.request_id] = existing
            else:
                todo.append(i)
        gang_of = {
            RequestId(m.request_id): ("all-or-nothing" if all_or_nothing else m.gang)
            for m in msgs
            if all_or_nothing or m.gang
        }
        snapshot, _ = await self.snapshot()
        # Each host's state as the batch's commits so far leave it: the next
        # plan on the host expects the versions they bumped.
        predicted = dict(snapshot.hosts)
        result = solve_batch(
            self._engine, snapshot, [requests[i] for i in todo], self._batch_settings, gang_of
        )
        log.info(
            "batch of %d: %s, objective %d (bound %d, greedy %d), %.2fs",
            len(todo), result.status, result.objective, result.bound,
            result.greedy_objective, result.wall_s,
        )  # fmt: skip
        index = {m.request_id: i for i, m in enumerate(msgs)}
        for rid, refusal in result.unplaced.items():
            failures[rid] = [refusal.summary, *refusal.reasons()]
        broken_gangs = {gang_of[RequestId(r)] for r in failures if RequestId(r) in gang_of}
        # Plans on one host expect the generations their predecessors' commits
        # leave. Once one of them did not commit as planned, a foreign commit
        # can reach the generation a later plan expects with other contents:
        # the host's remaining requests are planned afresh instead.
        replan: set[str] = set()
        for rid, plan in result.plans.items():
            msg = msgs[index[rid]]
            prefix = f"requests[{index[rid]}]."
            if gang_of.get(rid) in broken_gangs:
                failures[rid] = [f"gang {shown(gang_of[rid], MAX_IDENT)} could not be placed whole"]
                replan.add(plan.host_id)
                continue
            try:
                if plan.host_id in replan:
                    placed[rid] = await self.place(msg, prefix)
                else:
                    placed[rid], as_planned = await self._commit_planned(
                        msg, plan, prefix, predicted[plan.host_id]
                    )
                    if as_planned:
                        predicted[plan.host_id] = with_reservation(
                            ClusterSnapshot(hosts={plan.host_id: predicted[plan.host_id]}),
                            plan.host_id,
                            plan.slots,
                            PlacementId(placed[rid].placement_id),
                            TenantName(msg.tenant),
                        ).hosts[plan.host_id]
                    else:
                        replan.add(plan.host_id)
            except SchedulerError as err:
                failures[rid] = [str(err)]
                replan.add(plan.host_id)
                if rid in gang_of:
                    broken_gangs.add(gang_of[rid])
        for placed_id in list(placed):
            gang = gang_of.get(RequestId(placed_id))
            if gang is None or gang not in broken_gangs:
                continue
            placement = placed.pop(placed_id)
            why = f"gang {shown(gang, MAX_IDENT)} could not be placed whole"
            try:
                await self.release(placement.placement_id, "")
                failures[placed_id] = [f"{why}; released"]
            except SchedulerError as err:
                failures[placed_id] = [f"{why}; release failed: {err}"]
        unplaced = [
            scheduler_pb2.Unplaced(request_id=m.request_id, reasons=failures[m.request_id])
            for m in msgs
            if m.request_id in failures
        ]
        return [placed[m.request_id] for m in msgs if m.request_id in placed], unplaced

    async def _commit_planned(
        self, msg: placement_pb2.PlacementRequest, plan: Plan, prefix: str, state: HostState
    ) -> tuple[placement_pb2.Placement, bool]:
        """Commit a batch plan and prepare it; on a lost race, place the request alone.

        Returns:
            The placement, and whether it was committed as planned.
        """
        digest = request_digest(msg)
        claimant = _claimant()
        existing = await self._claim(msg, digest, claimant)
        if existing is not None:
            # Another call placed it, perhaps elsewhere: this host's later
            # plans cannot assume the generation this plan would have left.
            return existing, False
        record = await self._store.get_host(plan.host_id)
        if record is not None:
            commit, placement = await self._commit(msg, plan, claimant, state)
            if commit.outcome is CommitOutcome.COMMITTED:
                return await self._prepare(placement, record), True
            log.debug("batch plan for %s lost its commit: %s", msg.request_id, commit.detail)
        request = parsed_request(msg, prefix)
        return await self._place_claimed(msg, request, digest, claimant), False

    async def _commit(
        self,
        msg: placement_pb2.PlacementRequest,
        plan: Plan,
        claimant: str,
        state: HostState,
    ) -> tuple[CommitResult, placement_pb2.Placement]:
        """Reserve a plan's slots as a new PENDING placement (the atomic applier).

        The commit checks the versions, as ``state`` (the state the plan was
        made on) has them, of what the plan depends on: the devices it takes
        slots of, the host's epoch and exclusive holds, and its tenants when
        the request holds a domain exclusively. While the commit is in
        flight the model assumes it, so this replica's next plans leave its
        slots alone.
        """
        placement = placement_from_plan(
            plan,
            placement_id=PlacementId(schema.placement_id(uuid.uuid4().hex[:16], plan.host_id)),
            request=msg,
            now_ms=self._clock_ms(),
        )
        placement_id = PlacementId(placement.placement_id)
        tenant = TenantName(msg.tenant)
        keys = guards.guards(
            state.view,
            plan.slots,
            exclusive=msg.exclusivity != placement_pb2.EXCLUSIVITY_DOMAIN_NONE,
        )
        self._model.assume(plan.host_id, plan.slots, placement_id, tenant)
        committed = 0
        try:
            commit = await self._store.commit_reservation(
                host_id=plan.host_id,
                guards={key: state.versions.get(key, 0) for key in keys},
                bumps=guards.changed_by(state.view, plan.slots),
                slots=list(plan.slots),
                placement_id=placement.placement_id,
                placement=placement.SerializeToString(),
                request_id=_request_key(msg),
                claimant=claimant,
                tenant=msg.tenant,
            )
            self.commit_outcomes[commit.outcome.name] += 1
            if commit.outcome is CommitOutcome.COMMITTED:
                committed = commit.alloc_generation
        finally:
            # Committed: the model takes it as the store now holds it (or
            # keeps assuming it until the feed brings it). Otherwise, or on
            # an error, the assumption goes: an error's commit may have
            # landed, and the feed will say so.
            self._model.settle(plan.host_id, placement_id, committed)
        return commit, placement

    async def _transition(
        self,
        placement: placement_pb2.Placement,
        state: str,
        message: str,
        from_states: list[str],
    ) -> tuple[bool, placement_pb2.Placement]:
        """Move a placement to another lifecycle state, compare-and-set in the store.

        Returns:
            Whether the store took it (the placement was in one of
            ``from_states``), and the placement as it would now read.
        """
        moved = with_state(placement, state, message, self._clock_ms())
        ok = await self._store.update_placement(
            moved.host_id,
            moved.placement_id,
            moved.SerializeToString(),
            state=state,
            from_states=from_states,
        )
        return ok, moved

    async def _prepare(
        self, placement: placement_pb2.Placement, record: HostRecord
    ) -> placement_pb2.Placement:
        try:
            prepared = await self._agents.prepare(record.agent_address, placement)
        except AgentCallError as err:
            await asyncio.shield(self._abandon(placement, record, err.message))
            raise HostOperationError(
                f"host {record.host_id} could not carry the placement out ({err.message}); "
                "the reservation was released"
            ) from err
        except BaseException:
            # Cancelled (the client went away) or a bug: never leave the
            # reservation PENDING for ever. Shielded so the cleanup itself
            # survives the cancellation.
            await asyncio.shield(self._abandon(placement, record, "the request was cancelled"))
            raise
        ok, ready = await self._confirm_ready(prepared)
        if not ok:
            # Someone removed the reservation while the host carried it out
            # (an operator clearing state): undo the host side, do not answer
            # READY for slots the store no longer holds.
            await asyncio.shield(self._abandon(placement, record, "reservation vanished"))
            raise ContentionError(
                f"placement {ready.placement_id} was removed while being prepared; retry"
            )
        return ready

    async def _confirm_ready(
        self, prepared: placement_pb2.Placement
    ) -> tuple[bool, placement_pb2.Placement]:
        """PENDING -> READY once the host carried the placement out.

        The devices are bound by now: a store that blinks (a failover, a
        restart) must not leave them PENDING until the reaper tears them down,
        so the compare-and-set is retried for a few seconds. It stays
        PENDING only if the store stays away longer; the client then gets
        UNAVAILABLE, and a retry with the same request id is answered once the
        store is back (or the reaper frees it).
        """
        for delay in READY_RETRY_DELAYS_S:
            try:
                return await self._transition(prepared, READY, "ready", [PENDING])
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                log.warning(
                    "store unreachable confirming %s READY; retrying in %.1f s",
                    prepared.placement_id,
                    delay,
                )
                await asyncio.sleep(delay)
        return await self._transition(prepared, READY, "ready", [PENDING])

    async def _abandon(
        self, placement: placement_pb2.Placement, record: HostRecord, cause: str
    ) -> None:
        """Undo a reservation whose Prepare failed or was cancelled.

        The agent rolls back its own half-done work, but a timed-out call may
        still have finished on the host: Unprepare (idempotent) first, and only
        free the slots once the host confirms. If even that fails the slots
        stay taken by a FAILED placement: quarantined, never back in the pool.
        """
        try:
            await self._agents.unprepare(record.agent_address, placement)
        except AgentCallError as err:
            await self._transition(
                placement,
                FAILED,
                f"prepare failed ({cause}) and teardown failed ({err.message}); "
                "slots quarantined until an operator releases them",
                [PENDING],
            )
            return
        await self._store.release(record.host_id, placement.placement_id, from_states=[PENDING])

    # -- lookups and release ------------------------------------------------

    async def get(
        self, placement_id: str, request_id: str, tenant: str = ""
    ) -> placement_pb2.Placement:
        """A placement by its id or by the request id (of ``tenant``) that made it.

        Raises:
            InvalidRequestError: an id no placement could have (too long, odd
                characters): refused before it reaches a key or a message; a
                request id without its tenant.
            PlacementNotFoundError: there is none.
        """
        violations = validate_lookup(
            placement_id=placement_id, request_id=request_id, tenant=tenant
        )
        if request_id and not placement_id and not tenant and not violations:
            violations.append(
                FieldViolation("tenant", "is required with request_id (request ids are per tenant)")
            )
        if violations:
            raise InvalidRequestError(violations)
        if not placement_id and request_id:
            found = await self._store.placement_for_request(
                schema.tenant_request(tenant, request_id)
            )
            placement_id = found[0] if found else ""
        stored = await self._store.get_placement(placement_id) if placement_id else None
        if stored is None:
            what = (
                f"placement_id {shown(placement_id)}"
                if placement_id
                else f"request {shown(request_id)}"
            )
            raise PlacementNotFoundError(f"no placement for {what}")
        return placement_pb2.Placement.FromString(stored[1])

    async def list_placements(
        self, tenant: str = "", host_id: str = ""
    ) -> list[placement_pb2.Placement]:
        """Placements, optionally of one tenant or host.

        Raises:
            InvalidRequestError: the tenant or host id is not an id.
        """
        if violations := validate_lookup(tenant=tenant, host_id=host_id):
            raise InvalidRequestError(violations)
        rows = await self._store.list_placements(host_id or None)
        out = [placement_pb2.Placement.FromString(payload) for _, payload in rows]
        return [p for p in out if not tenant or p.tenant == tenant]

    async def release(
        self, placement_id: str, request_id: str, tenant: str = ""
    ) -> placement_pb2.Placement:
        """Tear a placement down on its host, then free its slots.

        Only a READY or FAILED placement can be released: one still being
        prepared is refused (retry), so a release can never free slots that a
        Prepare in flight is about to bind.

        Raises:
            InvalidRequestError: an id no placement could have.
            PlacementNotFoundError: there is none.
            PlacementBusyError: it is being prepared or released right now.
            HostOperationError: teardown failed; the placement is FAILED and
                its slots stay quarantined.
        """
        placement = await self.get(placement_id, request_id, tenant)
        record = await self._store.get_host(placement.host_id)
        if record is None:
            raise HostOperationError(f"host {placement.host_id} is not registered")
        ok, releasing = await self._transition(
            placement, RELEASING, "tearing down", [READY, FAILED]
        )
        if not ok:
            state = await self._store.placement_state(record.host_id, releasing.placement_id)
            if state is None:
                raise PlacementNotFoundError(f"placement {releasing.placement_id} is gone")
            raise PlacementBusyError(
                f"placement {releasing.placement_id} is {state}; release it once it is ready"
            )
        try:
            await self._agents.unprepare(record.agent_address, releasing)
        except AgentCallError as err:
            await self._transition(
                releasing, FAILED, f"teardown failed: {err.message}; slots quarantined", [RELEASING]
            )
            raise HostOperationError(
                f"host {record.host_id} could not tear placement {releasing.placement_id} "
                f"down ({err.message}); its devices stay out of the pool"
            ) from err
        await self._store.release(record.host_id, releasing.placement_id, from_states=[RELEASING])
        releasing.message = "released"
        return releasing

    async def hosts(self) -> list[scheduler_pb2.HostSummary]:
        """Every registered host with its lease, cordon and allocation state, read now.

        Read from the store, not the model: heartbeat ages are not on the feed.
        """
        stored = await self._store.snapshot(self._model.known())
        now = self._clock_ms()
        return [
            self._summary(self._model.state_of(record), record, now)
            for _, record in sorted(stored.hosts.items())
        ]

    def _summary(
        self, state: HostState, record: HostRecord, now_ms: int
    ) -> scheduler_pb2.HostSummary:
        """One host as operators see it: lease, cordon, allocations, MIG capacity."""
        view = state.view
        assignable = {
            f.iommu_group
            for f in view.functions.values()
            if f.kind is not None and not f.is_vf and f.iommu_group is not None
        }
        allocated = sum(1 for g in assignable if iommu_group_slot(g) in state.allocations)
        return scheduler_pb2.HostSummary(
            host_id=record.host_id,
            agent_address=record.agent_address,
            boot_id=record.boot_id,
            inventory_generation=record.inventory_generation,
            heartbeat_age_ms=now_ms - record.last_heartbeat_ms,
            schedulable=state.schedulable,
            assignable_groups=len(assignable),
            allocated_groups=allocated,
            labels=dict(view.labels),
            mig=[
                scheduler_pb2.MigCapacity(
                    gpu_address=address, free=free, fragmentation=fragmentation
                )
                for address, free, fragmentation in self._engine.mig_capacity(state)
            ],
            cordoned=record.cordoned,
            cordon_reason=record.cordon_reason,
            cordoned_by=record.cordoned_by,
            cordoned_unix_ms=record.cordoned_ms,
        )

    # -- host administration ------------------------------------------------

    @staticmethod
    def _check_host_admin(host_id: str, reason: str = "") -> None:
        """Refuse a host id that cannot name a host, or an over-long reason."""
        violations = validate_identifier(host_id, "host_id")
        violations += validate_text(reason, "reason", MAX_TEXT)
        if violations:
            raise InvalidRequestError(violations)

    async def host_summary(self, host_id: str) -> scheduler_pb2.HostSummary:
        """One registered host as ListHosts shows it, read now.

        Raises:
            InvalidRequestError: the id cannot name a host.
            HostNotFoundError: no host is registered under it.
        """
        self._check_host_admin(host_id)
        record = await self._store.get_host(host_id)
        if record is None:
            raise HostNotFoundError(f"host {host_id} is not registered")
        now = self._clock_ms()
        return self._summary(self._model.state_of(record), record, now)

    async def cordon(self, host_id: str, reason: str, by: str) -> scheduler_pb2.HostSummary:
        """Take a host out of scheduling; its placements stay and can be released.

        The cordon outlives re-registrations and heartbeats of the host's
        agent: only :meth:`uncordon` lifts it. Cordoning a cordoned host
        replaces its reason.

        Args:
            host_id: the host.
            reason: why, shown by ListHosts.
            by: who asked (the caller's identity).

        Raises:
            InvalidRequestError: a malformed id or an over-long reason.
            HostNotFoundError: no host is registered under that id.
        """
        self._check_host_admin(host_id, reason)
        if not await self._store.cordon_host(
            host_id, reason=reason, by=by, now_ms=self._clock_ms()
        ):
            raise HostNotFoundError(f"host {host_id} is not registered")
        log.info("host %s cordoned by %s: %s", host_id, by, reason or "(no reason given)")
        return await self.host_summary(host_id)

    async def uncordon(self, host_id: str, by: str) -> scheduler_pb2.HostSummary:
        """Let new placements land on a cordoned host again (idempotent).

        Args:
            host_id: the host.
            by: who asked.

        Raises:
            InvalidRequestError: the id cannot name a host.
            HostNotFoundError: no host is registered under that id.
        """
        self._check_host_admin(host_id)
        if not await self._store.uncordon_host(host_id):
            raise HostNotFoundError(f"host {host_id} is not registered")
        log.info("host %s uncordoned by %s", host_id, by)
        return await self.host_summary(host_id)

    async def drain(
        self, host_id: str, reason: str, by: str
    ) -> tuple[
        scheduler_pb2.HostSummary, list[placement_pb2.Placement], list[scheduler_pb2.DrainFailure]
    ]:
        """Cordon a host, then release every placement on it through :meth:`release`.

        The cordon comes first, so nothing new lands while the host empties;
        a host cordoned already keeps its cordon (reason, who, when). Each
        release tears the placement down on the host before freeing its
        slots, exactly as a client's Release does. A placement being prepared
        or released right now, or whose teardown fails (it stays FAILED with
        its slots quarantined), is reported instead; draining again later
        picks it up.

        Args:
            host_id: the host.
            reason: the cordon's reason if the host is not cordoned yet
                (empty: "drained").
            by: who asked.

        Returns:
            The host as the drain left it, the placements released and the
            ones still there with why, each in placement id order.

        Raises:
            InvalidRequestError: a malformed id or an over-long reason.
            HostNotFoundError: no host is registered under that id.
        """
        self._check_host_admin(host_id, reason)
        if not await self._store.cordon_host(
            host_id, reason=reason or "drained", by=by, now_ms=self._clock_ms(), keep=True
        ):
            raise HostNotFoundError(f"host {host_id} is not registered")
        placements = [
            placement_pb2.Placement.FromString(payload)
            for _, payload in await self._store.list_placements(host_id)
        ]
        released: list[placement_pb2.Placement] = []
        failed: list[scheduler_pb2.DrainFailure] = []
        gate = asyncio.Semaphore(DRAIN_CONCURRENCY)

        async def release_one(placement: placement_pb2.Placement) -> None:
            async with gate:
                try:
                    released.append(await self.release(placement.placement_id, ""))
                except PlacementNotFoundError:
                    # Released by someone else meanwhile: off the host all the same.
                    placement.message = "already released"
                    released.append(placement)
                except SchedulerError as err:
                    failed.append(
                        scheduler_pb2.DrainFailure(
                            placement_id=placement.placement_id, reason=str(err)
                        )
                    )

        await asyncio.gather(*(release_one(p) for p in placements))
        released.sort(key=lambda p: p.placement_id)
        failed.sort(key=lambda f: f.placement_id)
        log.info(
            "host %s drained by %s: %d released, %d left",
            host_id, by, len(released), len(failed),
        )  # fmt: skip
        return await self.host_summary(host_id), released, failed

    async def forget(self, host_id: str, force: bool, by: str) -> list[str]:
        """Remove a host and every key of it from the store.

        Only a host without placements, in any state, is forgotten (drain it
        first), unless ``force``: its placements are then dropped from the
        store with their request ids, without a teardown on the host. An
        agent still running finds its heartbeat refused and registers the host
        again, as a new host (uncordoned, nothing allocated); the reconciler
        then tears down what the host holds that the store no longer knows.

        Args:
            host_id: the host.
            force: drop its placements with it.
            by: who asked.

        Returns:
            The placement ids dropped (empty unless forced).

        Raises:
            InvalidRequestError: the id cannot name a host.
            HostNotFoundError: the store holds nothing of that host.
            HostBusyError: it holds placements and ``force`` is off.
        """
        self._check_host_admin(host_id)
        result = await self._store.forget_host(host_id, force=force)
        if result.outcome is ForgetOutcome.NOT_FOUND:
            raise HostNotFoundError(f"host {host_id} is not registered")
        if result.outcome is ForgetOutcome.BUSY:
            held = [f"{pid} ({state})" for pid, state in sorted(result.placements.items())]
            more = f" and {len(held) - 5} more" if len(held) > 5 else ""
            raise HostBusyError(
                f"host {host_id} holds {len(held)} placement(s): {', '.join(held[:5])}{more}; "
                "drain it first (or forget it with force, which does not tear them down)"
            )
        # This replica's parsed copy of the host goes too: a host registering
        # under the id again is a new one.
        self._model.forget(host_id)
        dropped = sorted(result.placements)
        log.warning(
            "host %s forgotten by %s%s",
            host_id, by, f"; dropped placements {dropped}" if dropped else "",
        )  # fmt: skip
        return dropped

    # -- registry -----------------------------------------------------------

    async def fence(self) -> int:
        """The newest fencing token of the background jobs, told to agents (0: none yet)."""
        return await self._store.current_fence(schema.BACKGROUND_JOB)

    async def register(self, inventory: inventory_pb2.HostInventory, agent_address: str) -> bool:
        """Record a host's report; False if it is older than the stored one.

        Raises:
            InvalidRequestError: the inventory is malformed, out of bounds or
                inconsistent (see :mod:`scheduler.service.inventory_check`);
                nothing was read from or written to the store.
        """
        check_inventory(inventory)
        if violations := validate_address(agent_address, "agent_address"):
            raise InvalidRequestError(violations)
        before = await self._store.get_host(inventory.host_id)
        accepted = await self._store.upsert_host(
            inventory.host_id,
            inventory.SerializeToString(),
            inventory_generation=inventory.generation,
            boot_id=inventory.boot_id,
            agent_address=agent_address,
            now_ms=self._clock_ms(),
        )
        if accepted and before is not None and before.boot_id != inventory.boot_id:
            await self._fail_after_reboot(inventory.host_id)
        return accepted

    async def _fail_after_reboot(self, host_id: str) -> None:
        """Mark every live placement of a rebooted host FAILED, keeping its slots.

        A reboot resets every device and loses what tenants had open; IOMMU
        group numbers may change too. The placements are therefore no longer
        true, but their slots stay quarantined until each is released, so
        nothing is handed out on the strength of a stale group number.
        """
        for _, payload in await self._store.list_placements(host_id):
            placement = placement_pb2.Placement.FromString(payload)
            await self._transition(
                placement,
                FAILED,
                "host rebooted: its devices were reset; release this placement",
                [PENDING, READY, RELEASING],
            )

    async def heartbeat(
        self, host_id: str, boot_id: str, inventory: inventory_pb2.HostInventory | None
    ) -> bool:
        """Renew a host's lease (and take a changed inventory).

        Returns:
            False when the scheduler does not know this host or boot: the
            agent must register again.

        Raises:
            InvalidRequestError: a malformed host id, or an inventory that
                is not this host's or that Register would refuse; nothing was
                read from or written to the store.
        """
        violations = validate_identifier(host_id, "host_id")
        more = 0
        if inventory is not None:
            found, more = inventory_violations(inventory)
            violations += found
        if inventory is not None and (inventory.host_id, inventory.boot_id) != (host_id, boot_id):
            violations.append(
                FieldViolation(
                    "inventory",
                    f"reports host {shown(inventory.host_id)} boot {shown(inventory.boot_id)}, "
                    f"the heartbeat is for host {shown(host_id)} boot {shown(boot_id)}",
                )
            )
        if violations:
            raise InvalidRequestError(violations, more)
        now = self._clock_ms()
        if inventory is not None:
            record = await self._store.get_host(host_id)
            if record is None or record.boot_id != boot_id:
                return False
            await self._store.upsert_host(
                host_id,
                inventory.SerializeToString(),
                inventory_generation=inventory.generation,
                boot_id=boot_id,
                agent_address=record.agent_address,
                now_ms=now,
            )
            return True
        return await self._store.touch_host(host_id, boot_id, now)
