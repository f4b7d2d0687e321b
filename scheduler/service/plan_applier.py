"""The plan applier: commit a plan, have its host carry it out, confirm, undo, release.

Commit -> agent Prepare -> confirm READY is the one path by which a plan
becomes a placement, and Release (teardown on the host, then the slots
freed) the one path by which it leaves. The commit is the store's atomic,
version-checked applier (Nomad's optimistic workers with one serial verifier,
here the Lua script); while it is in flight the live model assumes it, so
this replica's next plans leave its slots alone. Every state change is a
move of :mod:`scheduler.core.lifecycle`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import redis.exceptions

from tessera.scheduler.core import guards
from tessera.scheduler.core.identity import PlacementId
from tessera.scheduler.core.lifecycle import FAILED, PENDING, READY, RELEASED, RELEASING, move
from tessera.scheduler.core.plan import Plan
from tessera.scheduler.core.snapshot import HostState
from tessera.scheduler.service import event_log
from tessera.scheduler.service.agent_gateway import AgentCallError, AgentGateway
from tessera.scheduler.service.cluster_model import LiveCluster
from tessera.scheduler.service.convert import Submitted, as_prepared, placement_from_plan
from tessera.scheduler.service.errors import (
    ContentionError,
    HostOperationError,
    PlacementBusyError,
    PlacementNotFoundError,
)
from tessera.scheduler.service.placement_moves import PlacementMoves
from tessera.scheduler.service.request_claims import request_key
from tessera.scheduler.store import schema
from tessera.scheduler.store.redis_store import (
    CommitOutcome,
    CommitResult,
    HostRecord,
    RedisStateStore,
)
from tessera.v1 import placement_pb2

log = logging.getLogger(__name__)

#: Pauses between attempts to confirm a prepared placement READY while the
#: store is unreachable (about 6 s in all: a Valkey restart or failover).
READY_RETRY_DELAYS_S = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)

#: Commits and releases whose end is remembered for plans made before it.
#: A plan that assumed one already forgotten is not committed (it replans).
ENDED_KEPT = 65_536

# The lifecycle moves this room makes (each checked against the table on import).
_CONFIRM = move(PENDING, to=READY)
_UNDO = move(PENDING, to=RELEASED)
_QUARANTINE_UNDONE = move(PENDING, to=FAILED)
_BEGIN_RELEASE = move(READY, FAILED, to=RELEASING)
_FINISH_RELEASE = move(RELEASING, to=RELEASED)
_QUARANTINE_TEARDOWN = move(RELEASING, to=FAILED)


@dataclass(frozen=True)
class _Flight:
    """A commit or release in flight: the guard versions it bumps, and whether it landed."""

    bumps: tuple[str, ...]
    landed: asyncio.Future[bool]
    release: bool = False


class PlanApplier:
    """Commits plans as placements, carries them out on their hosts, and releases them.

    Args:
        store: the Redis state store.
        agents: reaches agents to carry placements out.
        model: the replica's live model (assumes commits in flight).
        moves: makes lifecycle moves in the store.
        clock_ms: current time in ms.
    """

    def __init__(
        self,
        store: RedisStateStore,
        agents: AgentGateway,
        model: LiveCluster,
        moves: PlacementMoves,
        clock_ms: Callable[[], int],
    ) -> None:
        self._store = store
        self._agents = agents
        self._model = model
        self._moves = moves
        self._clock_ms = clock_ms
        # Commit outcomes so far (COMMITTED, CONFLICT, ...): the conflict
        # rate shows how often replicas (or this one) planned on moved state.
        self.commit_outcomes: Counter[str] = Counter()
        # Per host, this replica's commits and releases in flight, by name.
        self._in_flight: dict[str, dict[PlacementId, _Flight]] = {}
        # How the latest of them ended (landed, and the versions they bump),
        # oldest first: plans made before they ended count on them.
        self._ended: dict[PlacementId, tuple[bool, tuple[str, ...]]] = {}

    async def commit(
        self, submitted: Submitted, plan: Plan, claimant: str, state: HostState
    ) -> tuple[CommitResult, placement_pb2.Placement]:
        """Reserve a plan's slots as a new PENDING placement (the atomic applier).

        The commit checks the versions, as ``state`` (the state the plan was
        made on) has them, of what the plan depends on: the devices it takes
        slots of, the host's epoch and exclusive holds, and its tenants when
        the request holds a domain exclusively. While the commit is in
        flight the model assumes it, so this replica's next plans leave its
        slots alone.

        Args:
            submitted: the request, claimed by ``claimant``.
            plan: where it goes.
            claimant: this call's claim on the request id.
            state: the host's state the plan was made on.

        Returns:
            The store's answer, and the placement as committed (if it was).
        """
        request = submitted.request
        placement = placement_from_plan(
            plan,
            placement_id=PlacementId(schema.placement_id(uuid.uuid4().hex[:16], plan.host_id)),
            request=request,
            now_ms=self._clock_ms(),
        )
        placement_id = PlacementId(placement.placement_id)
        expect = guards.expected(
            state.view, state.versions, plan.slots, exclusive=submitted.exclusive
        )
        bumps = guards.changed_by(state.view, plan.slots)
        # The plan saw this replica's commits then in flight on the host as
        # landed (the model assumes them, versions included): it goes after
        # those whose versions it expects, so the store sees them in that
        # order, and expects less of those that do not land.
        # Releases in flight that the plan did not see go first too: one that
        # lands only frees capacity, so the plan holds after it as well, and
        # it expects the versions the release leaves.
        # Assumptions the plan's state includes whose commit or release has
        # already answered (the plan was made before an await, as a batch's
        # are) count as they ended: one that did not land is expected less;
        # one whose end is no longer known makes the plan unusable.
        flights = self._in_flight.get(plan.host_id, {})
        seen = set(state.planned)
        for name in seen - flights.keys():
            ended = self._ended.get(name)
            if ended is None:
                self.commit_outcomes[CommitOutcome.CONFLICT.name] += 1
                return (
                    CommitResult(
                        CommitOutcome.CONFLICT,
                        placement_id,
                        f"the plan assumed {name}, whose commit or release ended too long ago",
                    ),
                    placement,
                )
            _correct(expect, ended[1], assumed=True, landed=ended[0])
        ahead = [
            (name in seen, flight)
            for name, flight in flights.items()
            if (name in seen or flight.release) and not expect.keys().isdisjoint(flight.bumps)
        ]
        self._take_off(plan.host_id, placement_id, bumps)
        self._model.assume(plan.host_id, plan.slots, placement_id, request.tenant)
        committed = 0
        try:
            for assumed, before in ahead:
                landed = await asyncio.shield(before.landed)
                _correct(expect, before.bumps, assumed=assumed, landed=landed)
            commit = await self._commit_or_undo(
                placement,
                self._store.commit_reservation(
                    host_id=plan.host_id,
                    guards=expect,
                    bumps=bumps,
                    slots=list(plan.slots),
                    placement_id=placement.placement_id,
                    placement=placement.SerializeToString(),
                    request_id=request_key(submitted),
                    claimant=claimant,
                    tenant=request.tenant,
                ),
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
            self._land(plan.host_id, placement_id, committed > 0)
        return commit, placement

    def _take_off(
        self, host_id: str, name: PlacementId, bumps: tuple[str, ...], *, release: bool = False
    ) -> None:
        """A commit or release of this replica is about to be sent on the host."""
        flight = _Flight(bumps, asyncio.get_running_loop().create_future(), release)
        self._in_flight.setdefault(host_id, {})[name] = flight

    def _land(self, host_id: str, name: PlacementId, landed: bool) -> None:
        """It answered: the commits waiting on it go."""
        flights = self._in_flight.get(host_id, {})
        flight = flights.pop(name, None)
        if flight is not None:
            flight.landed.set_result(landed)
            if len(self._ended) >= ENDED_KEPT:
                del self._ended[next(iter(self._ended))]
            self._ended[name] = (landed, flight.bumps)
        if not flights:
            self._in_flight.pop(host_id, None)

    async def _free(self, host_id: str, placement: placement_pb2.Placement) -> None:
        """Free a torn-down placement's slots in the store (RELEASING -> RELEASED).

        While the release is in flight the model assumes the versions it
        bumps (its slots stay held there), and commits planned meanwhile on
        one of its devices are sent after it, as they are after this
        replica's commits: otherwise every plan made on a device being freed
        lost its commit race to the release.
        """
        placement_id = PlacementId(placement.placement_id)
        assumed = self._model.assume_release(host_id, placement_id)
        # Nor does it overtake a commit already under way on those devices:
        # that commit expects the versions from before the release.
        under_way = [
            flight
            for flight in self._in_flight.get(host_id, {}).values()
            if assumed is not None and not flight.release and set(flight.bumps) & set(assumed[1])
        ]
        if assumed is not None:
            self._take_off(host_id, *assumed, release=True)
        generation = 0
        try:
            for flight in under_way:
                await asyncio.shield(flight.landed)
            generation = await self._store.release(
                host_id,
                placement_id,
                from_states=_FINISH_RELEASE.from_states,
                request=_request_of(placement),
            )
        finally:
            if assumed is not None:
                self._model.settle(host_id, assumed[0], generation)
                self._land(host_id, assumed[0], generation > 0)
        if generation:
            event_log.placement_released(placement)

    async def _commit_or_undo(
        self,
        placement: placement_pb2.Placement,
        commit: Coroutine[Any, Any, CommitResult],
    ) -> CommitResult:
        """Run a commit to its end even if the caller goes away meanwhile, and then undo it.

        A client whose deadline passes while its commit is in flight cancels
        the call; the script may still land. Left alone, the reservation would
        stay PENDING, with no Prepare coming, until the reaper: every retry of
        the request answered "still being prepared" for minutes. So the commit
        is shielded, and a landed one of a cancelled call is released at once
        (nothing was prepared on the host yet).
        """
        task = asyncio.ensure_future(commit)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.shield(self._undo_landed(task, placement))
            raise

    async def _undo_landed(
        self, task: asyncio.Future[CommitResult], placement: placement_pb2.Placement
    ) -> None:
        """Release the reservation a cancelled call's commit made, if it made one."""
        try:
            result = await task
        except Exception:  # the commit failed: the claim stays for the next caller
            log.debug("commit of cancelled %s failed", placement.placement_id, exc_info=True)
            return
        if result.outcome is CommitOutcome.COMMITTED and await self._store.release(
            placement.host_id,
            placement.placement_id,
            from_states=_UNDO.from_states,
            request=_request_of(placement),
        ):
            event_log.placement_undone(
                placement, "the caller went away before its host was asked", failed=False
            )

    async def prepare(
        self, placement: placement_pb2.Placement, record: HostRecord
    ) -> placement_pb2.Placement:
        """Have the host carry a committed placement out, then confirm it READY.

        Raises:
            HostOperationError: the agent failed; the reservation was undone
                (or quarantined, if even the undo failed).
            ContentionError: the reservation vanished while the host
                carried it out; the host side was undone.
        """
        try:
            prepared = as_prepared(
                placement, await self._agents.prepare(record.agent_address, placement)
            )
        except AgentCallError as err:
            await asyncio.shield(self._abandon(placement, record, err.message, failed=True))
            raise HostOperationError(
                f"host {record.host_id} could not carry the placement out ({err.message}); "
                "the reservation was released"
            ) from err
        except BaseException:
            # Cancelled (the client went away) or a bug: never leave the
            # reservation PENDING for ever. Shielded so the cleanup itself
            # survives the cancellation.
            await asyncio.shield(
                self._abandon(placement, record, "the request was cancelled", failed=False)
            )
            raise
        ok, ready = await self._confirm_ready(prepared)
        if not ok:
            # Someone removed the reservation while the host carried it out
            # (an operator clearing state): undo the host side, do not answer
            # READY for slots the store no longer holds.
            await asyncio.shield(
                self._abandon(placement, record, "reservation vanished", failed=True)
            )
            raise ContentionError(
                f"placement {ready.placement_id} was removed while being prepared; retry"
            )
        event_log.placement_ready(ready)
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
                return await self._moves.apply(prepared, _CONFIRM, "ready")
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                log.warning(
                    "store unreachable confirming %s READY; retrying in %.1f s",
                    prepared.placement_id,
                    delay,
                )
                await asyncio.sleep(delay)
        return await self._moves.apply(prepared, _CONFIRM, "ready")

    async def _abandon(
        self, placement: placement_pb2.Placement, record: HostRecord, cause: str, *, failed: bool
    ) -> None:
        """Undo a reservation whose Prepare failed or was cancelled.

        The agent rolls back its own half-done work, but a timed-out call may
        still have finished on the host: Unprepare (idempotent) first, and only
        free the slots once the host confirms. If even that fails the slots
        stay taken by a FAILED placement: quarantined, never back in the pool.

        Args:
            placement: the reservation.
            record: its host.
            cause: why it is undone.
            failed: the host or the store failed it (logged as a warning),
                rather than its caller going away.
        """
        try:
            await self._agents.unprepare(record.agent_address, placement)
        except AgentCallError as err:
            await self._moves.apply(
                placement,
                _QUARANTINE_UNDONE,
                f"prepare failed ({cause}) and teardown failed ({err.message}); "
                "slots quarantined until an operator releases them",
            )
            return
        if await self._store.release(
            record.host_id,
            placement.placement_id,
            from_states=_UNDO.from_states,
            request=_request_of(placement),
        ):
            event_log.placement_undone(placement, cause, failed=failed)

    async def release(self, placement: placement_pb2.Placement) -> placement_pb2.Placement:
        """Tear a placement down on its host, then free its slots.

        Only a READY or FAILED placement can be released: one still being
        prepared is refused (retry), so a release can never free slots that a
        Prepare in flight is about to bind.

        Raises:
            PlacementNotFoundError: it is gone.
            PlacementBusyError: it is being prepared or released right now.
            HostOperationError: its host is not registered, or teardown
                failed; the placement is then FAILED and its slots stay
                quarantined.
        """
        host_id = placement.host_id
        # Where the agent listens, as the model last read it (a registration
        # that moves it goes on the feed); a host it does not hold is read.
        known = self._model.record(host_id)
        agent_address = (
            known.agent_address if known is not None else await self._store.agent_address(host_id)
        )
        if agent_address is None:
            raise HostOperationError(f"host {host_id} is not registered")
        ok, releasing = await self._moves.apply(placement, _BEGIN_RELEASE, "tearing down")
        if not ok:
            state = await self._store.placement_state(host_id, releasing.placement_id)
            if state is None:
                raise PlacementNotFoundError(f"placement {releasing.placement_id} is gone")
            raise PlacementBusyError(
                f"placement {releasing.placement_id} is {state}; release it once it is ready"
            )
        try:
            await self._unprepare(agent_address, releasing)
        except AgentCallError as err:
            await self._moves.apply(
                releasing,
                _QUARANTINE_TEARDOWN,
                f"teardown failed: {err.message}; slots quarantined",
            )
            raise HostOperationError(
                f"host {host_id} could not tear placement {releasing.placement_id} "
                f"down ({err.message}); its devices stay out of the pool"
            ) from err
        await self._free(host_id, releasing)
        releasing.message = "released"
        return releasing

    async def _unprepare(self, address: str, placement: placement_pb2.Placement) -> None:
        """Unprepare at ``address``; failing, once more where the store says the agent is.

        The model's address may be a registration behind (the agent moved
        since the feed was last read): a failure there is not yet a failed
        teardown.
        """
        try:
            await self._agents.unprepare(address, placement)
        except AgentCallError:
            current = await self._store.agent_address(placement.host_id)
            if current is None or current == address:
                raise
            await self._agents.unprepare(current, placement)


def _request_of(placement: placement_pb2.Placement) -> str:
    """The placement's request id as the store names it."""
    return schema.tenant_request(placement.tenant, placement.request_id)


def _correct(
    expect: dict[str, int], bumps: tuple[str, ...], *, assumed: bool, landed: bool
) -> None:
    """Expect of ``bumps`` what the store has after a commit or release of this replica.

    Assumed by the plan and did not land: the store does not have its
    versions; not assumed and landed: the store has them too.
    """
    if assumed == landed:
        return
    for guard in bumps:
        if guard in expect:
            expect[guard] += 1 if landed else -1
