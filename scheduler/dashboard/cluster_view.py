"""What the dashboard reads: the replica's live model, kept in tiles, and placements from the store.

No second source of truth: every page is drawn from the model the replica
places on (brought up to date through the change feed before it is read) and
from the store's placement records. A host's tile and usage are derived once
per host state the model holds and kept until the model replaces that state,
so drawing the fleet at 10,000 hosts costs only the hosts that changed.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Mapping, Set
from dataclasses import dataclass

from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.fragmentation import free_shares
from tessera.scheduler.core.host_usage import HostUsage, host_usage
from tessera.scheduler.core.identity import HostId
from tessera.scheduler.core.snapshot import HostState
from tessera.scheduler.dashboard.fleet import FORMS, HostTile, stranded_gpu_share, tile_of
from tessera.scheduler.dashboard.topology_tree import TreeNode, host_tree
from tessera.scheduler.presentation import state_name
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.errors import HostNotFoundError
from tessera.scheduler.store.redis_store import HostRecord
from tessera.v1 import placement_pb2

#: Seconds of deriving between two chances for the event loop to run other work.
DERIVE_SLICE_S = 0.002


@dataclass(frozen=True)
class _Derived:
    state: HostState
    usage: HostUsage
    tile: HostTile
    stranded: float


@dataclass(frozen=True)
class HostDetail:
    """One host as its page shows it.

    Attributes:
        state: the model's state of the host.
        record: its stored record (agent, boot, cordon), as last read.
        tile: its tile (lease, allocation by form).
        usage: its usage per device.
        tree: its topology tree.
        placements: its placements, as stored.
    """

    state: HostState
    record: HostRecord | None
    tile: HostTile
    usage: HostUsage
    tree: list[TreeNode]
    placements: list[placement_pb2.Placement]


@dataclass(frozen=True)
class TenantUsage:
    """What one tenant holds: units per form, devices per model, hosts.

    Attributes:
        tenant: the tenant.
        by_form: units held per form.
        by_model: devices it holds something on, per model.
        hosts: hosts it holds something on.
    """

    tenant: str
    by_form: Mapping[str, int]
    by_model: Mapping[str, int]
    hosts: int


class ClusterView:
    """Reads the cluster for the dashboard.

    Args:
        coordinator: the replica's use cases (its live model, placements).
        engine: the engine whose occupancy per host state is memoised.
    """

    def __init__(self, coordinator: PlacementCoordinator, engine: Engine) -> None:
        self._c = coordinator
        self._engine = engine
        self._derived: dict[HostId, _Derived] = {}

    @property
    def revision(self) -> int:
        """The model's revision as last refreshed."""
        return self._c.model.stats.revision

    def changed_since(self, revision: int) -> Set[str] | None:
        """Hosts changed after ``revision`` of the model (None: too far back to say)."""
        return self._c.model.changed_since(revision)

    async def refreshed(self) -> None:
        """Bring the model up to date with the store (shared with placing's reads)."""
        await self._c.refreshed()

    def _derive(self, host_id: HostId, state: HostState) -> _Derived:
        found = self._derived.get(host_id)
        if found is not None and found.state is state:
            return found
        occupancy = self._engine.occupancy(state)
        usage = host_usage(state, occupancy)
        derived = _Derived(
            state,
            usage,
            tile_of(state, usage),
            stranded_gpu_share(free_shares(state.view, occupancy).values()),
        )
        self._derived[host_id] = derived
        return derived

    async def _every_host(self) -> list[_Derived]:
        """Every host's derived figures, in host id order, the model brought up to date first."""
        await self.refreshed()
        hosts = self._c.model.live().hosts
        for gone in set(self._derived) - set(hosts):
            del self._derived[gone]
        out: list[_Derived] = []
        since = time.perf_counter()
        for host_id in sorted(hosts):
            state = hosts.get(host_id)
            if state is None:  # forgotten while this loop gave way
                continue
            kept = self._derived.get(host_id)
            fresh = kept is None or kept.state is not state
            if fresh and time.perf_counter() - since > DERIVE_SLICE_S:
                # Deriving every host (the first fleet page, 1.4 s at
                # 10,000 hosts) must not hold Places up: a Place waits
                # on the loop at each of its steps. Give way often; the
                # model may move on meanwhile, each host is drawn as it
                # is when reached.
                await asyncio.sleep(0)
                since = time.perf_counter()
                state = hosts.get(host_id)
                if state is None:
                    continue
            out.append(self._derive(host_id, state))
        return out

    async def tiles(self) -> tuple[list[HostTile], dict[str, float]]:
        """Every host's tile in host id order, and each host's stranded GPU share."""
        every = await self._every_host()
        return [d.tile for d in every], {d.tile.host_id: d.stranded for d in every}

    async def host(self, host_id: str) -> HostDetail:
        """One host's detail.

        Raises:
            HostNotFoundError: the model holds no such host.
        """
        await self.refreshed()
        state = self._c.model.live().hosts.get(HostId(host_id))
        if state is None:
            raise HostNotFoundError(f"host {host_id} is not registered")
        derived = self._derive(HostId(host_id), state)
        record = self._c.model.record(host_id)
        placements = await self._c.list_placements("", host_id)
        states = {p.placement_id: state_name(p) for p in placements}
        tree = host_tree(state, self._engine.occupancy(state), derived.usage, states)
        return HostDetail(state, record, derived.tile, derived.usage, tree, placements)

    async def tenants(self) -> list[TenantUsage]:
        """Every tenant holding something, with what it holds, by tenant name."""
        forms: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FORMS, 0))
        models: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        hosts: dict[str, int] = defaultdict(int)
        for derived in await self._every_host():
            usage = derived.usage
            for tenant, held in usage.tenants.items():
                hosts[tenant] += 1
                for form, n in held.items():
                    forms[tenant][form] = forms[tenant].get(form, 0) + n
            for device in usage.devices.values():
                for tenant in device.tenants:
                    models[tenant][device.model or device.kind] += 1
        return [
            TenantUsage(t, forms[t], dict(sorted(models[t].items())), hosts[t])
            for t in sorted(hosts)
        ]

    async def placements(
        self, tenant: str = "", host_id: str = ""
    ) -> list[placement_pb2.Placement]:
        """Placements as stored, optionally of one tenant or host."""
        return await self._c.list_placements(tenant, host_id)
