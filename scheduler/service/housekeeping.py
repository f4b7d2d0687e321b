"""Background jobs: reap stuck placements, reconcile hosts with the store.

Placing needs no leader: every replica plans and commits optimistically. The
jobs here must run once, though, or two replicas would tear the same
placement down twice or race a re-prepare against a release. So one replica
at a time runs them, under a lease in Redis with a fencing token (Martin
Kleppmann's fencing, as Chubby's sequencers): each term gets a larger token,
every store write of the job carries it and is refused once a newer term
began, and agents refuse calls with a token lower than the highest they saw.

Each round, the leader:

* **expires the leases** of hosts silent for longer than the lease (an event
  on the change feed, so replicas stop planning on them);
* **reaps** placements stuck in a transient state: PENDING longer than any
  Prepare can take (the replica that committed it died before the agent
  answered) is torn down on the host and released; RELEASING likewise is
  finished. A host that cannot tear down leaves the placement FAILED with
  its slots held (quarantine), never back in the pool;
* **reconciles** hosts whose agent (re)registered since the last round, and
  every host now and then: Redis holds the desired state, the host the actual.
  A placement the host holds that the store does not know (released or reaped
  while the agent was away) is torn down; a READY placement the host lost is
  prepared again, or marked FAILED if that fails;
* on each full sweep, **settles request records**: claims whose caller died
  between claiming a request id and finalizing its commit, and records a
  release could not forget (the store went away between its two steps);
* **forgets dead hosts** (Nomad's node GC, ``node_gc_threshold``): a host
  whose lease has been expired longer than ``forget_dead_after_s`` and that
  holds no placement leaves the store, as an operator's forget without force
  would remove it. A host holding a placement, in any state, is never
  forgotten here: it stays listed, lease expired, until someone drains or
  forgets it. Should its agent come back, it registers the host again, as new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tessera.scheduler.core.lifecycle import (
    FAILED,
    PENDING,
    READY,
    RELEASED,
    RELEASING,
    Move,
    PlacementState,
    move,
)
from tessera.scheduler.service import event_log
from tessera.scheduler.service.agent_gateway import AgentCallError, HousekeepingGateway
from tessera.scheduler.service.convert import as_prepared
from tessera.scheduler.service.placement_moves import PlacementMoves
from tessera.scheduler.store import schema
from tessera.scheduler.store.redis_store import (
    Fence,
    FencedOutError,
    ForgetOutcome,
    HostRecord,
    RedisStateStore,
)
from tessera.security.audit import AuditLog
from tessera.v1 import placement_pb2

log = logging.getLogger(__name__)

#: The job's name in the store (lease and fence keys).
JOB = schema.BACKGROUND_JOB

# The lifecycle moves the jobs make (each checked against the table on import).
# The reaper finishes a placement stuck PENDING or RELEASING, by the state it
# was found in; one it cannot tear down is quarantined from that state.
_REAP: Mapping[PlacementState, Move] = {
    PENDING: move(PENDING, to=RELEASED),
    RELEASING: move(RELEASING, to=RELEASED),
}
_QUARANTINE_STUCK: Mapping[PlacementState, Move] = {
    PENDING: move(PENDING, to=FAILED),
    RELEASING: move(RELEASING, to=FAILED),
}
# The reconciler claims a READY placement its host lost, prepares it again,
# and confirms it READY, or quarantines it.
_CLAIM_LOST = move(READY, to=PENDING)
_CONFIRM_REPREPARED = move(PENDING, to=READY)
_QUARANTINE_LOST = move(PENDING, to=FAILED)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class HousekeepingSettings:
    """Cadence and patience of the background jobs.

    Attributes:
        interval_s: seconds between rounds; the lease lasts three rounds
            (at least 10 s) and is renewed before each host's work.
        pending_after_s: a PENDING placement untouched this long is reaped;
            longer than the agent Prepare deadline, so a live Place call has
            always given up first.
        releasing_after_s: likewise for RELEASING.
        full_sweep_s: every host is reconciled, and the request records
            are swept, at least this often.
        lease_s: a host silent this long has its lease marked expired (an
            event on the change feed: replicas stop planning on it).
        forget_dead_after_s: a host whose lease has been expired this long
            (its last heartbeat older than ``lease_s`` plus this: the store
            keeps no time of expiry) and that holds no placement is
            forgotten, each round; 0 (or less): never. Nomad's
            ``node_gc_threshold``, whose default this is too (24 h).
    """

    interval_s: float = 5.0
    pending_after_s: float = 90.0
    releasing_after_s: float = 90.0
    full_sweep_s: float = 300.0
    lease_s: float = 20.0
    forget_dead_after_s: float = 86_400.0


@dataclass
class RoundReport:
    """What one round did, for logs and tests."""

    leader: bool = False
    token: int = 0
    reaped: int = 0
    finished_releases: int = 0
    quarantined: int = 0
    orphans_torn_down: int = 0
    reprepared: int = 0
    hosts_reconciled: int = 0
    claims_resolved: int = 0
    records_forgotten: int = 0
    leases_expired: int = 0
    dead_hosts_forgotten: int = 0


class Housekeeper:
    """Runs the background jobs when this replica holds their lease.

    Args:
        store: the state store.
        agents: reaches agents, with fencing.
        settings: cadence.
        owner: this replica's name in the lease (unique per process).
        clock_ms: current time in ms (injectable for tests).
        audit: where a record of each placement the job reaps, tears down or
            prepares again, and of each dead host it forgets, goes.
    """

    def __init__(
        self,
        store: RedisStateStore,
        agents: HousekeepingGateway,
        settings: HousekeepingSettings | None = None,
        *,
        owner: str = "",
        clock_ms: Callable[[], int] = _now_ms,
        audit: AuditLog | None = None,
    ) -> None:
        self._store = store
        # What the job does to tenants' placements is audited like an API call.
        self._audit = audit or AuditLog(None, "scheduler")
        self._agents = agents
        self._settings = settings or HousekeepingSettings()
        self.owner = owner or f"replica-{uuid.uuid4().hex[:12]}"
        self._clock_ms = clock_ms
        self._moves = PlacementMoves(store, clock_ms)
        # host -> (boot, agent address, inventory generation) last reconciled.
        self._reconciled: dict[str, tuple[str, str, int]] = {}
        self._last_sweep_ms = 0

    @property
    def _ttl_ms(self) -> int:
        # Three rounds, and never under 10 s: one agent call of a round may
        # take seconds, and the lease must outlive it between renewals. A
        # leader that dies is replaced once its lease runs out.
        return int(max(self._settings.interval_s * 3, 10.0) * 1000)

    @property
    def _expiry_interval_s(self) -> float:
        # Leases are checked a few times per lease, so a silent host leaves
        # every replica's plans within about a quarter lease of running out;
        # never more often than 4 times a second, never less than each round.
        return min(self._settings.interval_s, max(0.25, self._settings.lease_s / 4))

    async def run(self, stop: asyncio.Event) -> None:
        """Run rounds until ``stop`` is set, then give the lease up.

        Between full rounds, lease sweeps (:meth:`expire_leases`) run at the
        lease's own cadence.
        """
        next_round = 0.0
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                try:
                    if loop.time() >= next_round:
                        next_round = loop.time() + self._settings.interval_s
                        report = await self.round()
                        if report.leader and (report.reaped or report.orphans_torn_down):
                            log.info("housekeeping round: %s", report)
                    else:
                        await self.expire_leases()
                except Exception:  # a round must never kill the scheduler
                    log.exception("housekeeping round failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self._expiry_interval_s)
        finally:
            try:
                await self._store.yield_lease(JOB, self.owner)
            except Exception:  # best effort: the lease expires anyway
                log.debug("could not yield the %s lease", JOB, exc_info=True)

    async def round(self) -> RoundReport:
        """One round: take or renew the lease, then reap and reconcile if leader."""
        token = await self._store.acquire_lease(JOB, self.owner, self._ttl_ms)
        report = RoundReport(leader=token > 0, token=token)
        if not token:
            # Another replica leads; forget what we reconciled, so a term of
            # ours later starts from a full sweep.
            self._reconciled.clear()
            self._last_sweep_ms = 0
            return report
        fence = Fence(JOB, token)
        try:
            hosts = (await self._store.snapshot(inventories=False)).hosts
            # Fenced writes are checked per host, against the newest term the
            # host saw: raise it everywhere before acting anywhere, so from
            # here on a deposed leader is refused on every host.
            behind = [h for h, r in hosts.items() if r.fences.get(JOB, 0) < token]
            if behind:
                await self._store.raise_fences(behind, fence)
            await self._expire(hosts, report)
            await self._reap(hosts, fence, report)
            await self._reconcile(hosts, fence, report)
            await self._forget_dead(hosts, fence, report)
        except FencedOutError:
            log.warning("lost the %s lease mid-round (token %d): stopping", JOB, token)
            report.leader = False
        return report

    # -- leases --------------------------------------------------------------

    async def expire_leases(self) -> RoundReport:
        """A lease sweep alone: if this replica leads, mark silent hosts expired."""
        token = await self._store.acquire_lease(JOB, self.owner, self._ttl_ms)
        report = RoundReport(leader=token > 0, token=token)
        if token:
            await self._expire((await self._store.snapshot(inventories=False)).hosts, report)
        return report

    async def _expire(self, records: Mapping[str, HostRecord], report: RoundReport) -> None:
        """Mark the leases of hosts silent for longer than the lease expired.

        Each expiry is one script on the host that checks the heartbeat again
        (one may have come since the read) and puts the change on the feed,
        so every replica stops planning on the host; its next heartbeat or
        registration brings it back. Not fenced: it depends on the heartbeat
        only, so a deposed leader marking it too marks the same truth.
        """
        deadline = self._clock_ms() - int(self._settings.lease_s * 1000)
        for host_id, record in sorted(records.items()):
            if record.lease_expired or record.last_heartbeat_ms >= deadline:
                continue
            if await self._store.expire_host(host_id, deadline):
                report.leases_expired += 1
                event_log.host_lease_expired(
                    host_id, (self._clock_ms() - record.last_heartbeat_ms) / 1000
                )

    # -- dead hosts ----------------------------------------------------------

    async def _forget_dead(
        self, records: Mapping[str, HostRecord], fence: Fence, report: RoundReport
    ) -> None:
        """Forget the hosts dead longer than ``forget_dead_after_s`` that hold nothing.

        The store checks again, in the script that forgets, that the lease
        is still marked expired, the last heartbeat still that old and no
        placement there (a host whose agent came back, or that got a
        placement, since the round's read stays). Not fenced, as lease
        expiry: it depends on the host alone, so a deposed leader doing it
        too does the same.
        """
        after_s = self._settings.forget_dead_after_s
        if after_s <= 0:
            return
        now = self._clock_ms()
        deadline = now - int((self._settings.lease_s + after_s) * 1000)
        for host_id, record in sorted(records.items()):
            if not record.lease_expired or record.last_heartbeat_ms >= deadline:
                continue
            if record.allocations:
                continue  # holds placements: listed as expired until drained or forgotten
            await self._renew(fence)
            result = await self._store.forget_host(host_id, silent_before_ms=deadline)
            if result.outcome is not ForgetOutcome.FORGOTTEN:
                # BUSY: a placement without slots; ALIVE: its agent came back;
                # NOT_FOUND: forgotten already.
                continue
            self._reconciled.pop(host_id, None)
            report.dead_hosts_forgotten += 1
            silent_s = (now - record.last_heartbeat_ms) / 1000
            detail = (
                f"lease expired, no heartbeat for {silent_s:.0f} s "
                f"(forget_dead_after_s {after_s:.0f}), no placements"
            )
            who = f"{self.owner} ({fence.job} job, fencing token {fence.token})"
            event_log.host_forgotten(host_id, who, detail)
            self._audit.record(
                who=who,
                action="forget-dead-host",
                outcome="OK",
                resources={"host_id": host_id},
                detail=detail,
            )

    # -- reaping -------------------------------------------------------------

    async def _reap(
        self, records: Mapping[str, HostRecord], fence: Fence, report: RoundReport
    ) -> None:
        now = self._clock_ms()
        for host_id, payload in await self._store.list_placements():
            placement = placement_pb2.Placement.FromString(payload)
            state = await self._store.placement_state(host_id, placement.placement_id)
            age_s = (now - placement.updated_unix_ms) / 1000
            stuck: PlacementState
            if state == PENDING and age_s > self._settings.pending_after_s:
                stuck = PENDING
                cause = f"reaped after {age_s:.0f}s pending: its scheduler never finished"
            elif state == RELEASING and age_s > self._settings.releasing_after_s:
                stuck = RELEASING
                cause = f"release finished by the reaper after {age_s:.0f}s"
            else:
                continue
            record = records.get(host_id)
            if record is None:
                continue  # host deregistered: nothing to tear down through
            await self._renew(fence)
            try:
                await self._agents.unprepare_fenced(record.agent_address, placement, fence.token)
            except AgentCallError as err:
                detail = f"{cause}; teardown failed: {err.message}"
                moved = await self._mark_failed(placement, _QUARANTINE_STUCK[stuck], detail, fence)
                report.quarantined += int(moved)
                self._record("reap", fence, placement, "UNAVAILABLE", detail)
                continue
            released = await self._store.release(
                host_id,
                placement.placement_id,
                from_states=_REAP[stuck].from_states,
                fence=fence,
                request=schema.tenant_request(placement.tenant, placement.request_id),
            )
            if released and state == PENDING:
                report.reaped += 1
            elif released:
                report.finished_releases += 1
            if released:
                event_log.placement_released(placement, cause)
            else:
                log.debug(
                    "%s %s on %s: released by someone else meanwhile",
                    cause, placement.placement_id, host_id,
                )  # fmt: skip
            self._record("reap", fence, placement, "OK" if released else "ABORTED", cause)

    def _record(
        self,
        action: str,
        fence: Fence,
        placement: placement_pb2.Placement,
        outcome: str,
        detail: str,
    ) -> None:
        """One audit record of the job acting on a placement."""
        self._audit.record(
            who=f"{self.owner} ({fence.job} job, fencing token {fence.token})",
            action=action,
            outcome=outcome,
            resources={
                "placement_id": placement.placement_id,
                "host_id": placement.host_id,
                "tenant": placement.tenant,
            },
            detail=detail,
        )

    async def _renew(self, fence: Fence) -> None:
        """Renew the lease before each host's work, so a long round keeps it.

        Raises:
            FencedOutError: another replica took the lease meanwhile.
        """
        token = await self._store.acquire_lease(JOB, self.owner, self._ttl_ms)
        if token != fence.token:
            raise FencedOutError(f"{JOB} lease now held by another replica")

    async def _move(
        self,
        placement: placement_pb2.Placement,
        move: Move,
        message: str,
        fence: Fence,
    ) -> placement_pb2.Placement | None:
        """Make a lifecycle move on a placement, compare-and-set under the fence.

        Returns:
            The placement as stored now, or None when it was not in one of
            the move's sources.
        """
        stored, moved = await self._moves.apply(placement, move, message, fence=fence)
        return moved if stored else None

    async def _mark_failed(
        self, placement: placement_pb2.Placement, move: Move, message: str, fence: Fence
    ) -> bool:
        """Quarantine a placement (``move`` leads to FAILED): its slots stay taken."""
        return await self._move(placement, move, message, fence) is not None

    # -- reconciling ---------------------------------------------------------

    async def _reconcile(
        self, records: Mapping[str, HostRecord], fence: Fence, report: RoundReport
    ) -> None:
        now = self._clock_ms()
        sweep = now - self._last_sweep_ms >= self._settings.full_sweep_s * 1000
        if sweep:
            self._last_sweep_ms = now
            # Claims whose caller died between claim and finalize: those that
            # committed are finalized (the reaper frees their placement like
            # any stuck PENDING one), the rest are dropped; records naming a
            # released placement are forgotten.
            swept = await self._store.sweep_request_records()
            report.claims_resolved = swept.claims_resolved
            report.records_forgotten = swept.records_forgotten
        for host_id, record in sorted(records.items()):
            key = (record.boot_id, record.agent_address, record.inventory_generation)
            if not sweep and self._reconciled.get(host_id) == key:
                continue
            await self._renew(fence)
            try:
                await self._reconcile_host(record, fence, report)
            except AgentCallError as err:
                # A dead host fails here every round until it is forgotten:
                # said once, then held back as a repeat (tessera.logs).
                log.warning(
                    "cannot reconcile host %s now: %s",
                    host_id, err.message,
                    extra={"host": host_id, "reason": err.message},
                )  # fmt: skip
                continue
            self._reconciled[host_id] = key
            report.hosts_reconciled += 1

    async def _stored_placements(self, host_id: str) -> dict[str, bytes]:
        """One read of a host's placements in the store: id -> serialized payload."""
        return {
            placement_pb2.Placement.FromString(payload).placement_id: payload
            for _, payload in await self._store.list_placements(host_id)
        }

    async def _reconcile_host(self, record: HostRecord, fence: Fence, report: RoundReport) -> None:
        """Bring one host in line with the store: tear orphans down, prepare lost ones again.

        Raises:
            AgentCallError: the host could not be asked or could not tear an
                orphan down; the host is reconciled again next round.
            FencedOutError: a newer term of the job began.
        """
        # The host and the store move on their own while they are read, and
        # the two rules need opposite orders: the store is therefore read on
        # both sides of the host, S1 -> GetState (H) -> S2. Each read is one
        # instant (HGETALL is atomic; GetState answers about one moment
        # between the end of S1 and the start of S2).
        #
        # Orphan = held in H, absent from S2. A host holds only what it was
        # asked to prepare, and a placement is committed before any host is
        # asked; so one held at H was in the store before H, and its absence
        # at S2 means it was released, reaped or abandoned since: gone for
        # good, as placement ids are never reused. Tearing it down is right,
        # and harmless if its release did so already (Unprepare is idempotent).
        #
        # Lost = READY in S1, READY in S2 with the very same payload, absent
        # from H. A placement enters READY only from PENDING, once its host
        # finished Prepare (a Place, or this job's re-prepare); it enters
        # PENDING only by a commit (a new id) or this job's claim (never while
        # this host is being read; a deposed leader's claim is refused, as the
        # round raised every host's fence before acting). So READY at S1 and
        # at S2 means READY throughout, at H too, and prepared before S1: if H
        # lacks it, the host lost it. The payload's equality (every move
        # rewrites it, stamped) is a generation check besides, should READY
        # ever be re-entered another way. A Place that completes after S1 is
        # PENDING there; a Release after S1 is RELEASING or gone at S2: neither
        # is taken for lost. Reading the host before the store instead (as
        # this did once), a placement confirmed READY just after GetState was
        # flipped back to PENDING and prepared again, its Release refused
        # meanwhile; a leader dying then left its successor's reaper to tear a
        # live placement down (issue 12, item 7).
        #
        # A loss that begins during these reads (not yet READY at S1, say) is
        # missed here and caught the next time this host is reconciled.
        host_id = record.host_id
        # S1: READY by the payload's state; every writer stamps it in the
        # same store script that sets the state hash, so the two agree.
        before = {
            placement_id: payload
            for placement_id, payload in (await self._stored_placements(host_id)).items()
            if placement_pb2.Placement.FromString(payload).state
            == placement_pb2.PLACEMENT_STATE_READY
        }
        held = set(await self._agents.get_state(record.agent_address, host_id))  # H
        after = await self._stored_placements(host_id)  # S2
        for placement_id in sorted(held - set(after)):
            orphan = placement_pb2.Placement(placement_id=placement_id, host_id=host_id)
            await self._agents.unprepare_fenced(record.agent_address, orphan, fence.token)
            report.orphans_torn_down += 1
            log.info(
                "tore down %s on host %s: the store no longer has it",
                placement_id, host_id,
                extra={"placement": placement_id, "host": host_id, "state": "torn-down"},
            )  # fmt: skip
            self._record("tear-down-orphan", fence, orphan, "OK", "the store no longer has it")
        for placement_id, payload in sorted(before.items()):
            if placement_id in held or after.get(placement_id) != payload:
                continue  # held, or it moved while the host was read: not known lost
            # The state hash is authoritative (the payload's state mirrors
            # it); the re-prepare's claim compares-and-sets on it again.
            if await self._store.placement_state(host_id, placement_id) != READY:
                continue
            placement = placement_pb2.Placement.FromString(payload)
            await self._reprepare(record, placement, fence, report)

    async def _reprepare(
        self,
        record: HostRecord,
        placement: placement_pb2.Placement,
        fence: Fence,
        report: RoundReport,
    ) -> None:
        # Claim it first (READY -> PENDING, "being prepared"): a Release now
        # is refused as busy instead of freeing slots the host is about to
        # hold again. Stamped now, so the reaper does not take it for stuck.
        message = "the host lost it; preparing it again"
        claimed = await self._move(placement, _CLAIM_LOST, message, fence)
        if claimed is None:
            return  # released or changed meanwhile: nothing to restore
        try:
            prepared = as_prepared(
                claimed,
                await self._agents.prepare_fenced(record.agent_address, claimed, fence.token),
            )
        except AgentCallError as err:
            detail = f"the host lost it and cannot prepare it again: {err.message}"
            await self._mark_failed(claimed, _QUARANTINE_LOST, detail, fence)
            report.quarantined += 1
            self._record("prepare-again", fence, placement, "UNAVAILABLE", detail)
            return
        # Only this job moves a PENDING placement it claimed (Release refuses
        # PENDING); if deposed meanwhile, FencedOutError leaves it PENDING and
        # prepared, which the next leader's reaper tears down and releases.
        message = "ready (prepared again after the host lost it)"
        ready = await self._move(prepared, _CONFIRM_REPREPARED, message, fence)
        if ready is not None:
            report.reprepared += 1
            event_log.placement_ready(ready, "prepared again: the host had lost it")
            self._record("prepare-again", fence, placement, "OK", "the host had lost it")
