"""The cluster as one replica plans on it: kept in memory, followed through the change feed.

Reading and parsing every host from the store for each request cost a second
at 10,000 hosts. A replica instead keeps, for the life of the process, every
host's parsed view, allocations and lease state, and before planning reads
the store's change feed (:mod:`scheduler.store.schema`) from its cursors: only
the hosts named there are read again. Redis stays the single source of truth
and the one commit point; this model may lag it by the time since the last
refresh, which is safe because every commit checks the generation of the host
it writes, so a plan on a state the store has moved past conflicts and is
planned again, never applied.

Resync in full (cursors first, then every host, so whatever changes during
the read is replayed from the feed after) at start, when the feed shows a
hole (trimmed past this reader, or numbered anew after the store lost its
data), or when a shard has more entries waiting than hosts are worth reading
one by one.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import NamedTuple

from tessera.scheduler.core import guards
from tessera.scheduler.core.host import HostView
from tessera.scheduler.core.identity import HostId, PlacementId, SlotKey, TenantName
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState
from tessera.scheduler.service.convert import host_view_from_inventory
from tessera.scheduler.store.redis_store import FeedCursor, HostRecord, RedisStateStore, StoreError
from tessera.v1 import inventory_pb2

log = logging.getLogger(__name__)

#: Feed entries read per shard and round trip; a shard with more waiting is
#: read again, up to :data:`MAX_FEED_ROUNDS` times, then resynced in full.
FEED_BATCH = 1024
MAX_FEED_ROUNDS = 8

#: Changes remembered for :meth:`LiveCluster.changed_since`: an engine that
#: last looked further back compares every host instead.
CHANGE_LOG = 65_536

#: At most one collect-and-freeze of long-lived objects per interval.
FREEZE_INTERVAL_MS = 300_000


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class ModelStats:
    """What the model did so far (for logs, benchmarks and tests).

    Attributes:
        resyncs: full reads of every host.
        refreshes: feed reads.
        hosts_reloaded: hosts read again because the feed named them.
        inventories_parsed: inventories parsed into host views.
        revision: the model's current revision.
        refreshed_ms: when a refresh last succeeded (clock ms; 0: never):
            the model holds at least what the store held then.
    """

    resyncs: int
    refreshes: int
    hosts_reloaded: int
    inventories_parsed: int
    revision: int
    refreshed_ms: int = 0


class LiveCluster:
    """Every host's state as this replica last read it, brought up to date from the feed.

    Not safe for concurrent refreshes: the coordinator runs one at a time
    (its shared read rounds). Local reservations (:meth:`apply_reservation`)
    may land at any time between them.

    Args:
        store: the state store.
        clock_ms: current time in ms (for the collector's pacing).
    """

    def __init__(self, store: RedisStateStore, clock_ms: Callable[[], int] = _now_ms) -> None:
        self._store = store
        self._clock_ms = clock_ms
        # Parsed views by host with the (boot, inventory generation) they were
        # parsed from: parsing a big inventory is most of a host's read cost.
        self._views: dict[str, tuple[str, int, HostView]] = {}
        # Each host as the store last showed it, and as planning sees it: the
        # same, plus this replica's reservations whose commits are in flight
        # or landed but not read back yet (kube-scheduler's assumed pods).
        self._base: dict[HostId, HostState] = {}
        self._states: dict[HostId, HostState] = {}
        # Per host, the reservations assumed: slots, tenant, and the host's
        # generation after the commit once it landed (0 while in flight).
        self._assumed: dict[HostId, dict[PlacementId, _Assumed]] = {}
        self._records: dict[str, HostRecord] = {}
        self._cursors: list[FeedCursor] | None = None  # None: resync first
        # The primary the store's client last named (Sentinel), see refresh.
        self._primary: tuple[str, int] | None = None
        # Hosts to read again on the next refresh whatever the feed says
        # (a commit on them conflicted: the model is behind the store).
        self._stale: set[str] = set()
        # Hosts the feed showed past the model while commits or releases of
        # this replica on them were in flight, with the (incarnation,
        # generation) it showed: most likely those very writes. Not read
        # again unless the answers, once in, do not reach it.
        self._awaiting: dict[str, tuple[int, int]] = {}
        # Hosts this replica committed on since the current refresh began,
        # with the generation its commit left: a read of theirs from that
        # refresh may predate the commit.
        self._local: dict[str, int] = {}
        self._revision = 0
        self._log: deque[tuple[int, HostId]] = deque(maxlen=CHANGE_LOG)
        self._floor = 0  # changed_since answers only from this revision on
        self._frozen_ms = -FREEZE_INTERVAL_MS
        self._parsed_at_freeze = 0
        self._resyncs = 0
        self._refreshes = 0
        self._reloaded = 0
        self._parsed = 0
        self._refreshed_ms = 0

    # -- reading it ----------------------------------------------------------

    @property
    def stats(self) -> ModelStats:
        """Counters of what the model did."""
        return ModelStats(
            self._resyncs,
            self._refreshes,
            self._reloaded,
            self._parsed,
            self._revision,
            self._refreshed_ms,
        )

    def changed_since(self, revision: int) -> Set[HostId] | None:
        """Hosts added, changed or removed after ``revision`` (None: too far back).

        The :class:`~scheduler.core.snapshot.HostChanges` of the snapshots
        this model hands out.
        """
        if revision < self._floor:
            return None
        changed: set[HostId] = set()
        for rev, host_id in reversed(self._log):
            if rev <= revision:
                break
            changed.add(host_id)
        return changed

    def live(self) -> ClusterSnapshot:
        """The model as a snapshot without copying: valid until the caller next awaits.

        For planning, which runs without yielding to the event loop: the
        hosts mapping is the model's own and changes with the next refresh.
        """
        return ClusterSnapshot(
            hosts=MappingProxyType(self._states), revision=self._revision, changes=self
        )

    def frozen(self) -> ClusterSnapshot:
        """The model as an immutable snapshot (a copy of the host map)."""
        return ClusterSnapshot(hosts=dict(self._states), revision=self._revision, changes=self)

    def record(self, host_id: str) -> HostRecord | None:
        """A host's record as last read (without its inventory), or None."""
        return self._records.get(host_id)

    def records(self) -> dict[str, HostRecord]:
        """Every host's record as last read (a copy; inventories left out)."""
        return dict(self._records)

    def known(self) -> dict[str, tuple[str, int]]:
        """Host -> (boot, inventory generation) of every inventory parsed already."""
        return {h: (boot, generation) for h, (boot, generation, _) in self._views.items()}

    def view_of(self, record: HostRecord) -> HostView:
        """A record's host view: parsed from its inventory, or the cached one.

        Raises:
            StoreError: the record leaves its inventory out (the reader said
                it holds it) but no view of that boot and generation is held.
        """
        found = self._views.get(record.host_id)
        if found is not None and found[:2] == (record.boot_id, record.inventory_generation):
            return found[2]
        if not record.inventory:
            raise StoreError(f"host {record.host_id}: inventory left out but not cached")
        inventory = inventory_pb2.HostInventory.FromString(record.inventory)
        view = host_view_from_inventory(inventory)
        self._parsed += 1
        self._views[record.host_id] = (record.boot_id, record.inventory_generation, view)
        return view

    def state_of(self, record: HostRecord) -> HostState:
        """The state a record describes (schedulable unless expired or cordoned)."""
        return HostState(
            view=self.view_of(record),
            alloc_generation=record.alloc_generation,
            allocations={SlotKey(k): PlacementId(v) for k, v in record.allocations.items()},
            # A cordoned host takes nothing new, whatever its lease; what it
            # holds stays and can be released. Lease expiry is the
            # housekeeper's event on the feed, not computed here: heartbeats
            # that change nothing do not reach this model.
            schedulable=not record.lease_expired and not record.cordoned,
            cordoned=record.cordoned,
            tenants={PlacementId(k): TenantName(v) for k, v in record.tenants.items()},
            versions=dict(record.versions),
        )

    # -- keeping it current ----------------------------------------------------

    async def refresh(self) -> None:
        """Bring the model up to what the store held when this call began.

        Raises:
            redis.exceptions.RedisError: the store is unreachable; the next
                refresh starts where this one did.
            StoreError: a record the model cannot interpret.
        """
        self._local.clear()
        self._refreshes += 1
        began_ms = self._clock_ms()
        stale, self._stale = self._stale, set()
        primary = self._store.primary
        if primary != self._primary:
            if self._primary is not None:
                # A failover: the new primary may lack writes the old one
                # acknowledged, its feed and versions counted from an older
                # point. The feed cannot say what it lost (numbers may line
                # up again), so every host is read afresh.
                log.warning(
                    "the store's primary moved from %s:%d to %s:%d: reading every host again",
                    *self._primary,
                    *(primary or ("?", 0)),
                )
                self._cursors = None
            self._primary = primary
        try:
            if self._cursors is None or not await self._follow(stale):
                await self._resync()
        except BaseException:
            self._stale |= stale
            raise
        self._refreshed_ms = began_ms

    async def _follow(self, stale: set[str]) -> bool:
        """Read the feed from the cursors and the hosts it names (False: resync instead)."""
        assert self._cursors is not None
        cursors = list(self._cursors)
        moved = set(stale)
        # host -> its (incarnation, generation) after the last change the feed names.
        reached: dict[str, tuple[int, int]] = {}
        pending = list(cursors)
        for _ in range(MAX_FEED_ROUNDS):
            found = await self._store.read_feed(pending, FEED_BATCH)
            pending = []
            for shard, entries in found.items():
                expected = cursors[shard].seq + 1
                numbers = [e.seq for e in entries]
                if numbers != list(range(expected, expected + len(entries))):
                    # Trimmed past this reader, or numbered anew after the
                    # store lost its data: what happened in the hole is lost.
                    log.info(
                        "change feed of shard %d: expected entry %d, found %d; resyncing",
                        shard, expected, numbers[0],
                    )  # fmt: skip
                    return False
                moved.update(e.host_id for e in entries)
                reached.update((e.host_id, (e.incarnation, e.generation)) for e in entries)
                last = entries[-1]
                cursors[shard] = FeedCursor(shard, last.entry_id, last.seq)
                if len(entries) == FEED_BATCH:
                    pending.append(cursors[shard])
            if not pending:
                break
        else:
            return False  # further behind than a few batches: one full read is cheaper
        if len(moved) > max(64, len(self._records) // 2):
            return False
        # Every change on the feed moves the host's generation: a host the
        # model holds at the generation of its last change (this replica's
        # own commit, taken at once) is current, and is not read again.
        current = {
            h
            for h, (incarnation, generation) in reached.items()
            if h not in stale
            and generation >= 0
            and (base := self._base.get(HostId(h))) is not None
            and (base.versions.get(guards.INCARNATION, 0), base.alloc_generation)
            == (incarnation, generation)
        }
        # Past the model by no more than this replica's own writes in
        # flight on the host: their answers will most likely bring it there
        # (see settle), at no read.
        awaiting = {
            h: reached[h]
            for h in moved - current
            if h not in stale and h in reached and self._may_reach(HostId(h), *reached[h])
        }
        await self._reload(sorted(moved - current - awaiting.keys()))
        self._awaiting.update(awaiting)
        self._cursors = cursors
        return True

    def _may_reach(self, key: HostId, incarnation: int, generation: int) -> bool:
        """Whether this replica's writes in flight on a host may bring it to a generation."""
        base = self._base.get(key)
        if base is None or base.versions.get(guards.INCARNATION, 0) != incarnation:
            return False
        return 0 < generation - base.alloc_generation <= self._in_flight(key)

    def _in_flight(self, key: HostId) -> int:
        """This replica's commits and releases on a host not answered yet."""
        return sum(1 for a in self._assumed.get(key, {}).values() if a.landed == 0)

    def _settle_awaited(self, key: HostId) -> None:
        """A write in flight on a host the feed showed further answered: is the model there?"""
        awaited = self._awaiting.get(key)
        if awaited is None:
            return
        base = self._base.get(key)
        if (
            base is not None
            and base.versions.get(guards.INCARNATION, 0) == awaited[0]
            and base.alloc_generation >= awaited[1]
        ):
            # There, or past it (more of its writes landed since): the feed
            # names the host again for anything else.
            del self._awaiting[key]
        elif base is None or not self._in_flight(key):
            # Every answer is in and the model is not where the feed was:
            # someone else moved the host too. Read it.
            del self._awaiting[key]
            self._stale.add(key)

    async def _reload(self, host_ids: list[str]) -> None:
        """Read some hosts again and take what they hold now."""
        if not host_ids:
            return
        known = {h: self._views[h][:2] for h in host_ids if h in self._views}
        found = await self._store.read_hosts(host_ids, known)
        self._reloaded += len(host_ids)
        for host_id, record in found.items():
            self._take(host_id, record)
        self._freeze_if_grown()

    async def _resync(self) -> None:
        """Read every host afresh; the feed resumes from where it stood before the read."""
        heads = await self._store.feed_heads()
        stored = await self._store.snapshot(self.known())
        self._awaiting.clear()
        for host_id in set(self._records) - set(stored.hosts):
            self._take(host_id, None)
        for host_id, record in stored.hosts.items():
            self._take(host_id, record)
        self._cursors = heads
        self._resyncs += 1
        # An engine that indexed an older revision compares every host once.
        self._floor = self._revision
        self._freeze_if_grown()

    def _take(self, host_id: str, record: HostRecord | None) -> None:
        """Replace one host's state with what the store holds (None: it is gone)."""
        if record is not None and self._local.get(host_id, -1) > record.alloc_generation:
            # This replica committed on the host after the read may have
            # happened: keep its newer state; the feed names the host again.
            self._stale.add(host_id)
            return
        key = HostId(host_id)
        awaited = self._awaiting.get(host_id)
        if awaited is not None and (record is None or record.alloc_generation >= awaited[1]):
            del self._awaiting[host_id]
        if record is None:
            if self._records.pop(host_id, None) is None:
                return
            self._base.pop(key, None)
            self._views.pop(host_id, None)
            self._assumed.pop(key, None)
        else:
            state = self.state_of(record)
            self._records[host_id] = replace(record, inventory=b"")
            previous = self._base.get(key)
            if previous is not None and _same(previous, state):
                return
            if previous is not None and _incarnation(previous) != _incarnation(state):
                # Another host under the same id: nothing assumed on the old one holds.
                self._assumed.pop(key, None)
            self._base[key] = state
        self._derive(key)

    def _derive(self, key: HostId) -> None:
        """Planning's view of a host: the store's state plus what is assumed on it."""
        base = self._base.get(key)
        assumed = self._assumed.get(key)
        if base is None:
            if self._states.pop(key, None) is not None:
                self._changed(key)
            return
        if assumed:
            # Assumptions the store's state shows already are done with, and
            # so are landed ones the store has moved past without showing
            # them (released since).
            held = set(base.allocations.values())
            for placement_id in [
                p
                for p, a in assumed.items()
                if (p in held if a.frees is None else a.frees not in held)
                or 0 < a.landed <= base.alloc_generation
            ]:
                del assumed[placement_id]
        if not assumed:
            self._assumed.pop(key, None)
            state = base
        else:
            allocations = dict(base.allocations)
            tenants = dict(base.tenants)
            versions = dict(base.versions)
            for placement_id, a in assumed.items():
                if a.frees is None:
                    for slot in a.slots:
                        allocations.setdefault(slot, placement_id)
                    tenants[placement_id] = a.tenant
                # The versions the store will show once it lands: a plan
                # made on this state expects them, and the plan applier
                # sends its commit only after this one has answered. (A
                # release's slots stay held here until it has landed.)
                for guard in a.bumps:
                    versions[guard] = versions.get(guard, 0) + 1
            # ``planned`` names the assumptions, so no memo mistakes this
            # state for the store's at the same generation.
            state = replace(
                base,
                allocations=allocations,
                tenants=tenants,
                versions=versions,
                planned=(*base.planned, *assumed),
            )
        self._states[key] = state
        self._changed(key)

    def _changed(self, host_id: HostId) -> None:
        self._revision += 1
        if len(self._log) == self._log.maxlen:
            # The oldest entry falls out: nobody can be told about it any more.
            self._floor = self._log[0][0]
        self._log.append((self._revision, host_id))

    def mark_stale(self, host_id: str) -> None:
        """Read this host again on the next refresh (a commit on it conflicted)."""
        self._stale.add(host_id)

    def forget(self, host_id: str) -> None:
        """Drop a host this replica forgot in the store (the feed confirms it)."""
        self._take(host_id, None)

    def assume(
        self,
        host_id: str,
        slots: Iterable[SlotKey],
        placement_id: PlacementId,
        tenant: TenantName,
    ) -> None:
        """Plan as if a reservation whose commit is about to be sent had landed.

        Many requests of one replica plan between two refreshes; without
        this they would all reach for the same free device. Undone by
        :meth:`settle`.
        """
        key = HostId(host_id)
        if key not in self._base:
            return
        slots = tuple(slots)
        bumps = guards.changed_by(self._base[key].view, slots)
        self._assumed.setdefault(key, {})[placement_id] = _Assumed(slots, tenant, 0, bumps)
        self._derive(key)

    def assume_release(
        self, host_id: str, placement_id: PlacementId
    ) -> tuple[PlacementId, tuple[str, ...]] | None:
        """Plan as if a release about to be sent had landed, as far as versions go.

        The placement's slots stay held until the release has landed; the
        versions its release bumps are bumped now, so a plan made meanwhile
        on one of its devices expects what the store will show (the plan
        applier sends that commit after the release). Undone by
        :meth:`settle`.

        Returns:
            The assumption's name and the guard keys the release bumps, or
            None when the model does not hold the placement (nothing assumed).
        """
        key = HostId(host_id)
        base = self._base.get(key)
        # As planning sees the host: a commit of this replica not read back
        # yet is there, assumed.
        state = self._states.get(key)
        if base is None or state is None:
            return None
        slots = tuple(s for s, p in state.allocations.items() if p == placement_id)
        if not slots:
            return None
        token = PlacementId(f"{placement_id}/release")
        bumps = guards.changed_by(base.view, slots)
        self._assumed.setdefault(key, {})[token] = _Assumed(
            (), TenantName(""), 0, bumps, placement_id
        )
        self._derive(key)
        return token, bumps

    def settle(self, host_id: str, name: PlacementId, generation: int) -> None:
        """The commit or release of an assumption answered.

        Args:
            host_id: the host.
            name: the assumption (the placement, or a release's name).
            generation: the host's alloc generation after it, or 0 (or less)
                when it wrote nothing (or its outcome is unknown).
        """
        key = HostId(host_id)
        assumed = self._assumed.get(key, {})
        found = assumed.get(name)
        if found is not None and key in self._base:
            if generation <= 0:
                del assumed[name]
                self._stale.add(host_id)  # an error may hide a landed commit or release
            else:
                assumed[name] = found._replace(landed=generation)
                self._take_landed(key, assumed)
        self._settle_awaited(key)
        self._derive(key)

    def _take_landed(self, key: HostId, assumed: dict[PlacementId, _Assumed]) -> None:
        """Fold this replica's landed writes into the store's state, in generation order.

        A write that landed at the generation after the model's is exactly
        the model's state plus that write (the commit checked the
        incarnation the plan, and so the model, saw); answers may come back
        out of order, so a later one waits for the writes before it. Once
        every write in flight answered, one still waiting means someone else
        moved the host in between: it is read again.
        """
        base = self._base[key]
        while True:
            step = next(
                (
                    (name, a)
                    for name, a in assumed.items()
                    if a.landed == base.alloc_generation + 1
                    and (a.frees is None or a.frees in base.tenants)
                ),
                None,
            )
            if step is None:
                break
            name, found = step
            del assumed[name]
            base = _landed(base, name, found, found.landed)
            self._base[key] = base
            self._local[key] = base.alloc_generation
        if any(a.landed > 0 for a in assumed.values()) and not self._in_flight(key):
            self._stale.add(key)

    def _freeze_if_grown(self) -> None:
        """Move long-lived host views out of the cyclic collector's scans.

        Full passes of the collector over millions of such objects otherwise
        stall placement for a second at 10k hosts. Unfreeze and collect first,
        so nothing that became cyclic garbage since the last freeze stays
        frozen for good; at most once per interval, as that collection is
        the same pause.
        """
        now = self._clock_ms()
        if self._parsed == self._parsed_at_freeze or now - self._frozen_ms < FREEZE_INTERVAL_MS:
            return
        self._frozen_ms, self._parsed_at_freeze = now, self._parsed
        gc.unfreeze()
        gc.collect()
        gc.freeze()


def _landed(base: HostState, name: PlacementId, found: _Assumed, generation: int) -> HostState:
    """The host as the store holds it once an assumed commit or release landed on ``base``."""
    if found.frees is None:
        allocations = dict(base.allocations)
        for slot in found.slots:
            allocations[slot] = name
        return replace(
            base,
            alloc_generation=generation,
            allocations=allocations,
            tenants={**base.tenants, name: found.tenant},
            versions=guards.bumped(
                base.versions, found.bumps, new_tenant=found.tenant not in base.tenants.values()
            ),
        )
    freed = found.frees
    return replace(
        base,
        alloc_generation=generation,
        allocations={s: p for s, p in base.allocations.items() if p != freed},
        tenants={p: t for p, t in base.tenants.items() if p != freed},
        versions=guards.bumped(base.versions, found.bumps),
    )


class _Assumed(NamedTuple):
    """A commit (or release) of this replica the model plans as if it had landed.

    Attributes:
        slots: the slots a commit takes (none for a release).
        tenant: the committed placement's tenant.
        landed: the host's generation the commit or release left (0: not
            answered yet).
        bumps: the guard versions it bumps.
        frees: for a release, the placement it frees; None for a commit.
    """

    slots: tuple[SlotKey, ...]
    tenant: TenantName
    landed: int
    bumps: tuple[str, ...]
    frees: PlacementId | None = None


def _incarnation(state: HostState) -> int:
    return state.versions.get(guards.INCARNATION, 0)


def _same(a: HostState, b: HostState) -> bool:
    """Whether two states of a host plan the same (so the revision need not move)."""
    return (
        a.view is b.view
        and a.alloc_generation == b.alloc_generation
        and a.schedulable == b.schedulable
        and a.cordoned == b.cordoned
        and a.allocations == b.allocations
        and a.tenants == b.tenants
        and a.versions == b.versions
    )
