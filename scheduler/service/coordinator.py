"""The scheduler's use cases, composed: one facade over the rooms that do the work.

Each room has one job:

* :mod:`~scheduler.service.cluster_model` and :mod:`~scheduler.service.model_refresh`:
  the live model of the cluster, followed through the store's change feed;
* :mod:`~scheduler.service.request_claims`: a tenant's request id, claimed by one call;
* :mod:`~scheduler.service.request_placement`: one request planned and replanned;
* :mod:`~scheduler.service.batch_placement`: batches and gangs;
* :mod:`~scheduler.service.plan_applier`: commit -> agent Prepare -> READY, undo, release;
* :mod:`~scheduler.service.placement_lookup`: placements read back;
* :mod:`~scheduler.service.host_admin`: cordon, drain, forget, host summaries;
* :mod:`~scheduler.service.host_registry`: registration, heartbeats, reboots.

:class:`PlacementCoordinator` wires them (``scheduler.__main__`` builds one) and
keeps the methods callers holding wire requests use; the servicers convert a
request once and call the rooms' domain methods.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable

from tessera.scheduler.core.engine.batch import BatchSettings
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.engine.policies import Policy, TesseraPolicy
from tessera.scheduler.core.plan import Plan, Unschedulable
from tessera.scheduler.core.snapshot import ClusterSnapshot
from tessera.scheduler.service.agent_gateway import AgentGateway
from tessera.scheduler.service.batch_placement import DEFAULT_BATCH_SETTINGS, BatchPlacer
from tessera.scheduler.service.cluster_model import LiveCluster
from tessera.scheduler.service.convert import parsed_request, submitted, submitted_batch
from tessera.scheduler.service.host_admin import HostAdmin
from tessera.scheduler.service.host_registry import DEFAULT_LEASES, HostRegistry, Leases
from tessera.scheduler.service.model_refresh import ModelRefresh
from tessera.scheduler.service.page_tokens import PageRequest
from tessera.scheduler.service.placement_lookup import PlacementLookup
from tessera.scheduler.service.placement_moves import PlacementMoves
from tessera.scheduler.service.plan_applier import PlanApplier
from tessera.scheduler.service.request_claims import RequestClaims
from tessera.scheduler.service.request_placement import RequestPlacer
from tessera.scheduler.store.redis_store import HostRecord, RedisStateStore
from tessera.v1 import inventory_pb2, placement_pb2, scheduler_pb2

__all__ = ["Leases", "PlacementCoordinator"]


def _now_ms() -> int:
    return int(time.time() * 1000)


class PlacementCoordinator:
    """Places, releases and looks up placements; administers and registers hosts.

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
        leases: Leases = DEFAULT_LEASES,
        clock_ms: Callable[[], int] = _now_ms,
        *,
        engine: Engine | None = None,
        batch_settings: BatchSettings = DEFAULT_BATCH_SETTINGS,
        policy: Policy | None = None,
    ) -> None:
        # Ties between equally good hosts are broken this replica's way.
        engine = engine if engine is not None else Engine(affinity=uuid.uuid4().hex)
        policy = policy if policy is not None else TesseraPolicy(engine=engine)
        # The cluster as this replica plans on it, followed through the feed.
        self._model = LiveCluster(store, clock_ms)
        self._refresh = ModelRefresh(self._model)
        moves = PlacementMoves(store, clock_ms)
        claims = RequestClaims(store)
        self._applier = PlanApplier(store, agents, self._model, moves, clock_ms)
        self._lookup = PlacementLookup(store)
        self.placer = RequestPlacer(
            self._model,
            refresh=self._refresh,
            claims=claims,
            applier=self._applier,
            policy=policy,
            engine=engine,
        )
        self.batches = BatchPlacer(
            refresh=self._refresh,
            claims=claims,
            placer=self.placer,
            applier=self._applier,
            release=self._release_by_id,
            engine=engine,
            settings=batch_settings,
        )
        self.host_admin = HostAdmin(store, self._model, engine, self._release_by_id, clock_ms)
        self.registry = HostRegistry(store, moves, leases, clock_ms)

    @property
    def leases(self) -> Leases:
        """Heartbeat settings handed to agents."""
        return self.registry.leases

    @property
    def model(self) -> LiveCluster:
        """The replica's live model of the cluster."""
        return self._model

    @property
    def commit_outcomes(self) -> Counter[str]:
        """Commit outcomes so far (COMMITTED, CONFLICT, ...), by name."""
        return self._applier.commit_outcomes

    # -- the live model -----------------------------------------------------

    async def snapshot(self) -> tuple[ClusterSnapshot, dict[str, HostRecord]]:
        """The model, brought up to date after this call began (see :class:`ModelRefresh`)."""
        return await self._refresh.snapshot()

    async def refreshed(self) -> None:
        """Bring the model up to what the store held at some point after this call began."""
        await self._refresh.refreshed()

    # -- placing (wire requests, converted here once) -------------------------

    async def explain(self, msg: placement_pb2.PlacementRequest) -> Plan | Unschedulable:
        """Dry run: the plan the request would get now, or why it cannot be placed."""
        return await self.placer.explain(parsed_request(msg))

    async def place(
        self, msg: placement_pb2.PlacementRequest, prefix: str = ""
    ) -> placement_pb2.Placement:
        """Place one request and have its host carry it out (see :meth:`RequestPlacer.place`).

        Raises:
            InvalidRequestError: the request is malformed (nothing is written).
        """
        return await self.placer.place(submitted(msg, prefix))

    async def place_batch(
        self, msgs: list[placement_pb2.PlacementRequest], all_or_nothing: bool
    ) -> tuple[list[placement_pb2.Placement], list[scheduler_pb2.Unplaced]]:
        """Place requests jointly (see :meth:`BatchPlacer.place`).

        Raises:
            InvalidRequestError: any request is malformed; nothing is placed.
        """
        return await self.batches.place(submitted_batch(msgs), all_or_nothing)

    # -- lookups and release ------------------------------------------------

    async def get(
        self, placement_id: str, request_id: str, tenant: str = ""
    ) -> placement_pb2.Placement:
        """A placement by its id or by its tenant's request id (see :class:`PlacementLookup`)."""
        return await self._lookup.get(placement_id, request_id, tenant)

    async def list_placements(
        self, tenant: str = "", host_id: str = ""
    ) -> list[placement_pb2.Placement]:
        """Placements, optionally of one tenant or host.

        Without a host, only the hosts the model (brought up to date first)
        shows holding something of the tenant are read: every placement
        holds slots on its host until it is released, so none is missed,
        and a fleet of mostly idle hosts is not read whole.
        """
        among: list[str] | None = None
        if not host_id:
            await self.refreshed()
            among = self._hosts_holding(tenant, lambda _: True)
        return await self._lookup.list_placements(tenant, host_id, among)

    def _hosts_holding(self, tenant: str, visible: Callable[[str], bool]) -> list[str]:
        """The hosts the model shows holding placements of ``tenant`` ("": of anyone visible).

        Only placements the caller may see count: a tenant listing its own
        placements page by page must not make each call read the hosts of
        every other tenant.
        """
        return [
            h
            for h, state in self._model.live().hosts.items()
            if any((t == tenant if tenant else visible(t)) for t in set(state.tenants.values()))
        ]

    async def placements_page(
        self, tenant: str, host_id: str, page: PageRequest, visible: Callable[[str], bool]
    ) -> tuple[list[placement_pb2.Placement], str]:
        """One page of placements (see :meth:`PlacementLookup.page`).

        Without a host, only the hosts the model shows holding placements of
        the tenant are read, as :meth:`list_placements` does.

        Returns:
            The page, and the placement id the next one starts after ("": none).
        """
        among: list[str] = []
        if not host_id:
            await self.refreshed()
            among = self._hosts_holding(tenant, visible)
        return await self._lookup.page(tenant, host_id, among, page, visible=visible)

    async def release(
        self, placement_id: str, request_id: str, tenant: str = ""
    ) -> placement_pb2.Placement:
        """Tear a placement down on its host, then free its slots (see :meth:`PlanApplier.release`).

        Raises:
            InvalidRequestError: an id no placement could have.
            PlacementNotFoundError: there is none.
            PlacementBusyError: it is being prepared or released right now.
            HostOperationError: teardown failed; the placement is FAILED and
                its slots stay quarantined.
        """
        return await self._applier.release(await self._lookup.get(placement_id, request_id, tenant))

    async def _release_by_id(self, placement_id: str) -> placement_pb2.Placement:
        """Release a placement by its id (a drain's and a broken gang's releases)."""
        return await self.release(placement_id, "")

    # -- hosts --------------------------------------------------------------

    async def hosts(self) -> list[scheduler_pb2.HostSummary]:
        """Every registered host as ListHosts shows it, read now."""
        return await self.host_admin.hosts()

    async def hosts_page(self, page: PageRequest) -> tuple[list[scheduler_pb2.HostSummary], str]:
        """One page of registered hosts (see :meth:`HostAdmin.hosts_page`)."""
        return await self.host_admin.hosts_page(page)

    async def host_summary(self, host_id: str) -> scheduler_pb2.HostSummary:
        """One registered host as ListHosts shows it, read now."""
        return await self.host_admin.host_summary(host_id)

    async def cordon(self, host_id: str, reason: str, by: str) -> scheduler_pb2.HostSummary:
        """Take a host out of scheduling (see :meth:`HostAdmin.cordon`)."""
        return await self.host_admin.cordon(host_id, reason, by)

    async def uncordon(self, host_id: str, by: str) -> scheduler_pb2.HostSummary:
        """Let new placements land on a cordoned host again."""
        return await self.host_admin.uncordon(host_id, by)

    async def drain(
        self, host_id: str, reason: str, by: str
    ) -> tuple[
        scheduler_pb2.HostSummary, list[placement_pb2.Placement], list[scheduler_pb2.DrainFailure]
    ]:
        """Cordon a host, then release every placement on it (see :meth:`HostAdmin.drain`)."""
        return await self.host_admin.drain(host_id, reason, by)

    async def forget(self, host_id: str, force: bool, by: str) -> list[str]:
        """Remove a host and every key of it from the store (see :meth:`HostAdmin.forget`)."""
        return await self.host_admin.forget(host_id, force, by)

    async def fence(self) -> int:
        """The newest fencing token of the background jobs, told to agents (0: none yet)."""
        return await self.registry.fence()

    async def register(self, inventory: inventory_pb2.HostInventory, agent_address: str) -> bool:
        """Record a host's report; False if it is older than the stored one."""
        return await self.registry.register(inventory, agent_address)

    async def heartbeat(
        self, host_id: str, boot_id: str, inventory: inventory_pb2.HostInventory | None
    ) -> bool:
        """Renew a host's lease (and take a changed inventory)."""
        return await self.registry.heartbeat(host_id, boot_id, inventory)
