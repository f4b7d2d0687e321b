"""Host administration: what operators see of hosts, and cordon, drain, forget.

Operators take a host out of scheduling (cordon), empty it (drain: cordon,
then release every placement on it as a client's Release would), or remove it
from the store (forget); ListHosts shows each host's lease, cordon, what
is in use in which form (:mod:`scheduler.core.host_usage`) and MIG capacity.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.host_usage import host_usage
from tessera.scheduler.core.snapshot import HostState
from tessera.scheduler.core.validation import (
    MAX_TEXT,
    InvalidRequestError,
    validate_identifier,
    validate_text,
)
from tessera.scheduler.service import event_log
from tessera.scheduler.service.cluster_model import LiveCluster
from tessera.scheduler.service.errors import (
    HostBusyError,
    HostNotFoundError,
    PlacementNotFoundError,
    SchedulerError,
)
from tessera.scheduler.service.page_tokens import MAX_PAGE_BYTES, PageRequest
from tessera.scheduler.store.redis_store import ForgetOutcome, HostRecord, RedisStateStore
from tessera.v1 import placement_pb2, scheduler_pb2

#: Releases a drain runs at once: the agent tears down placements on
#: different devices side by side, and a host with hundreds of VF placements
#: should not take hundreds of round trips one after the other.
DRAIN_CONCURRENCY = 8

#: Releases a placement by its id, exactly as a client's Release does.
Release = Callable[[str], Awaitable[placement_pb2.Placement]]


def _check_host_admin(host_id: str, reason: str = "") -> None:
    """Refuse a host id that cannot name a host, or an over-long reason."""
    violations = validate_identifier(host_id, "host_id")
    violations += validate_text(reason, "reason", MAX_TEXT)
    if violations:
        raise InvalidRequestError(violations)


class HostAdmin:
    """Shows hosts to operators and cordons, drains and forgets them.

    Args:
        store: the Redis state store.
        model: the replica's live model (each host's parsed state).
        engine: the placement engine (each host's occupancy, MIG capacity per GPU).
        release: releases a placement by id (a drain's releases).
        clock_ms: current time in ms.
    """

    def __init__(
        self,
        store: RedisStateStore,
        model: LiveCluster,
        engine: Engine,
        release: Release,
        clock_ms: Callable[[], int],
    ) -> None:
        self._store = store
        self._model = model
        self._engine = engine
        self._release = release
        self._clock_ms = clock_ms

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

    async def hosts_page(
        self, page: PageRequest, max_bytes: int = MAX_PAGE_BYTES
    ) -> tuple[list[scheduler_pb2.HostSummary], str]:
        """One page of registered hosts after ``page.after``, ordered by host id, read now.

        Reads the page's hosts and one more (a token is handed out only when
        the next page has a host to show), and more in place of any host
        forgotten between listing the ids and reading it.

        Args:
            page: where the page starts (after a host id) and its size.
            max_bytes: most bytes of summaries in the page; a page holds at
                least one host when any is left.

        Returns:
            The page, and the host id the next page starts after ("": this is
            the last page).
        """
        ids = [h for h in await self._store.host_ids() if h > page.after]
        known = self._model.known()
        out: list[scheduler_pb2.HostSummary] = []
        size, read = 0, 0
        while read < len(ids):
            batch = ids[read : read + page.size + 1 - len(out)]
            read += len(batch)
            records = await self._store.read_hosts(batch, known)
            now = self._clock_ms()
            for host_id in batch:
                record = records[host_id]
                if record is None:  # forgotten since it was listed
                    continue
                summary = self._summary(self._model.state_of(record), record, now)
                more = summary.ByteSize()
                if len(out) == page.size or (out and size + more > max_bytes):
                    return out, out[-1].host_id
                out.append(summary)
                size += more
        return out, ""

    def _summary(
        self, state: HostState, record: HostRecord, now_ms: int
    ) -> scheduler_pb2.HostSummary:
        """One host as operators see it: lease, cordon, use by form, MIG capacity.

        What is in use comes from :func:`scheduler.core.host_usage.host_usage`
        on the engine's occupancy of the state, so ListHosts and placement
        agree on what is free.
        """
        view = state.view
        usage = host_usage(state, self._engine.occupancy(state))
        return scheduler_pb2.HostSummary(
            host_id=record.host_id,
            agent_address=record.agent_address,
            boot_id=record.boot_id,
            inventory_generation=record.inventory_generation,
            heartbeat_age_ms=now_ms - record.last_heartbeat_ms,
            schedulable=state.schedulable,
            assignable_groups=usage.groups_assignable,
            allocated_groups=usage.groups_used,
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
            used_by_form=dict(usage.by_form),
            lease_expired=record.lease_expired,
        )

    async def host_summary(self, host_id: str) -> scheduler_pb2.HostSummary:
        """One registered host as ListHosts shows it, read now.

        Raises:
            InvalidRequestError: the id cannot name a host.
            HostNotFoundError: no host is registered under it.
        """
        _check_host_admin(host_id)
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
        _check_host_admin(host_id, reason)
        if not await self._store.cordon_host(
            host_id, reason=reason, by=by, now_ms=self._clock_ms()
        ):
            raise HostNotFoundError(f"host {host_id} is not registered")
        event_log.host_cordoned(host_id, by, reason)
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
        _check_host_admin(host_id)
        if not await self._store.uncordon_host(host_id):
            raise HostNotFoundError(f"host {host_id} is not registered")
        event_log.host_uncordoned(host_id, by)
        return await self.host_summary(host_id)

    async def drain(
        self, host_id: str, reason: str, by: str
    ) -> tuple[
        scheduler_pb2.HostSummary, list[placement_pb2.Placement], list[scheduler_pb2.DrainFailure]
    ]:
        """Cordon a host, then release every placement on it.

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
        _check_host_admin(host_id, reason)
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
                    released.append(await self._release(placement.placement_id))
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
        event_log.host_drained(host_id, by, len(released), len(failed))
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
        _check_host_admin(host_id)
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
        event_log.host_forgotten(host_id, by, dropped=dropped)
        return dropped
