"""A host's topology as the dashboard draws it: NUMA -> root bus -> bridges -> group -> function.

Built from the scheduler's own model of the host (its :class:`HostView`), its
allocations and the placements' states, so what the page shows is what
placement decides on. Each function is marked with who holds it: free, held
by a tenant (with the placement), used by the host itself, or quarantined
(held by a placement whose teardown failed: its slots stay out of use until
an operator releases it). An SR-IOV PF carries its VFs, an mdev parent its
types and instances, a MIG GPU its memory slices with the instances placed
and, per profile, how many more fit and at which slices.

Pure: no store, no network, no web framework.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tessera.scheduler.core.host import GpuView, HostView, PciFunctionView
from tessera.scheduler.core.host_usage import DeviceUse, HostUsage
from tessera.scheduler.core.identity import PciAddress, PlacementId, TenantName
from tessera.scheduler.core.mig_geometry import (
    MEMORY_SLICES,
    MigLayout,
    capacity,
    placements_available,
)
from tessera.scheduler.core.occupancy import Occupancy
from tessera.scheduler.core.slots import MdevSlot, MigSlot, VfSlot, parse_slot
from tessera.scheduler.core.snapshot import HostState

#: The placement state whose slots stay held after a failed teardown.
FAILED = "failed"


@dataclass(frozen=True)
class Holder:
    """Who holds a unit: a placement, its tenant and its state."""

    placement_id: PlacementId
    tenant: TenantName
    state: str

    @property
    def quarantined(self) -> bool:
        """Held by a placement whose teardown failed."""
        return self.state == FAILED


@dataclass
class TreeNode:
    """One node of the drawn tree.

    Attributes:
        kind: ``numa``, ``bus``, ``bridge``, ``group`` or ``function``.
        label: what the node is called (``NUMA node 0``, ``0000:4b:00.0``).
        status: for functions: ``free``, ``held``, ``partly``, ``host``,
            ``quarantined``, ``unusable`` or ``other`` (not offered to
            tenants: a GPU's audio function, a bridge's own function).
        detail: a line under the label (model, driver, use).
        holders: the placements holding it.
        vfs: an SR-IOV PF's VFs.
        mdev: an mdev parent's types and instances.
        mig: a MIG GPU's slices and what fits.
        children: the nodes below.
    """

    kind: str
    label: str
    status: str = ""
    detail: str = ""
    holders: tuple[Holder, ...] = ()
    vfs: tuple[VfCell, ...] = ()
    mdev: tuple[MdevTypeRow, ...] = ()
    mig: MigMap | None = None
    children: list[TreeNode] = field(default_factory=list)

    def child(self, kind: str, label: str, detail: str = "") -> TreeNode:
        """The child of this kind and label, added if it is not there yet."""
        for node in self.children:
            if node.kind == kind and node.label == label:
                return node
        node = TreeNode(kind, label, detail=detail)
        self.children.append(node)
        return node


@dataclass(frozen=True)
class VfCell:
    """One VF of a PF: its index, address, group and holder (None: free)."""

    index: int
    address: str
    iommu_group: int | None
    holder: Holder | None


@dataclass(frozen=True)
class MdevTypeRow:
    """One mdev type of a parent: capacity, and the instances of it (live or allocated)."""

    type_id: str
    max_instances: int
    available: int
    instances: tuple[tuple[str, Holder | None], ...]


@dataclass(frozen=True)
class MigCell:
    """A run of memory slices: free, or one GPU instance."""

    start: int
    size: int
    profile: str = ""
    holder: Holder | None = None

    @property
    def free(self) -> bool:
        """No instance here."""
        return not self.profile


@dataclass(frozen=True)
class MigFit:
    """A profile: how many more instances fit, and the first slices each could start at."""

    profile: str
    more: int
    starts: tuple[int, ...]


@dataclass(frozen=True)
class MigMap:
    """A MIG GPU's memory slices and what still fits."""

    cells: tuple[MigCell, ...]
    fits: tuple[MigFit, ...]
    compute_used: int


def _holder(
    placement: PlacementId | None, state: HostState, states: Mapping[str, str]
) -> Holder | None:
    if placement is None:
        return None
    # Named as the engine and the host's usage name a placement of no known tenant.
    tenant = state.tenants.get(placement, TenantName(f"placement:{placement}"))
    return Holder(placement, tenant, states.get(placement, "pending"))


def _holders_by_slot(
    state: HostState, states: Mapping[str, str]
) -> tuple[
    dict[tuple[str, int], Holder], dict[tuple[str, str], Holder], list[tuple[MigSlot, Holder]]
]:
    """Holders of VFs (pf, index), mdevs (parent, uuid) and MIG instances, from the allocations."""
    vfs: dict[tuple[str, int], Holder] = {}
    mdevs: dict[tuple[str, str], Holder] = {}
    migs: list[tuple[MigSlot, Holder]] = []
    for key, placement in state.allocations.items():
        slot = parse_slot(key)
        holder = _holder(placement, state, states)
        assert holder is not None
        if isinstance(slot, VfSlot):
            vfs[(slot.pf, slot.index)] = holder
        elif isinstance(slot, MdevSlot):
            mdevs[(slot.parent, slot.uuid)] = holder
        elif isinstance(slot, MigSlot):
            migs.append((slot, holder))
    return vfs, mdevs, migs


def mig_map(gpu: GpuView, layout: MigLayout, held: list[tuple[MigSlot, Holder]]) -> MigMap:
    """A MIG GPU's slices: each instance (live or allocated) with its holder, and what fits."""
    names = {p.profile_id: str(p.name) for p in gpu.mig_profiles}
    owners = {(s.start, s.size): h for s, h in held if s.gpu == gpu.address}
    cells: list[MigCell] = []
    at = 0
    for gi in layout.instances:
        if gi.start > at:
            cells.append(MigCell(at, gi.start - at))
        cells.append(
            MigCell(
                gi.start,
                gi.size,
                names.get(gi.profile_id, f"profile {gi.profile_id}"),
                owners.get((gi.start, gi.size)),
            )
        )
        at = gi.start + gi.size
    if at < MEMORY_SLICES:
        cells.append(MigCell(at, MEMORY_SLICES - at))
    more = capacity(layout, gpu.mig_profiles)
    fits = tuple(
        MigFit(
            str(p.name),
            more.get(p.name, 0),
            tuple(start for start, _ in placements_available(layout, p)),
        )
        for p in gpu.mig_profiles
        # The media-extension variants (+me) mirror their base profile.
        if "+" not in str(p.name)
    )
    return MigMap(tuple(cells), fits, layout.used_compute)


def _status(fn: PciFunctionView, usage: HostUsage, holders: tuple[Holder, ...]) -> str:
    device = usage.devices.get(fn.address)
    if device is None:
        return "other"
    if any(h.quarantined for h in holders):
        return "quarantined"
    if device.use is DeviceUse.FREE:
        return "free"
    if device.use is DeviceUse.HOST:
        return "host"
    if device.use is DeviceUse.UNUSABLE:
        return "unusable"
    if device.use is DeviceUse.WHOLE or device.units_used >= device.units_total:
        return "held"
    return "partly"


def _detail(fn: PciFunctionView, usage: HostUsage) -> str:
    parts = [fn.model or f"{fn.vendor_id:04x}:{fn.device_id:04x}"]
    device = usage.devices.get(fn.address)
    if device is not None and device.use not in (DeviceUse.FREE, DeviceUse.HOST):
        parts.append(f"{device.use.value} {device.units_used}/{device.units_total}")
    if fn.host_use:
        parts.append(f"used by the host: {fn.host_use}")
    if fn.driver:
        parts.append(f"driver {fn.driver}")
    return " · ".join(parts)


def host_tree(
    state: HostState,
    occupancy: Occupancy,
    usage: HostUsage,
    placement_states: Mapping[str, str],
) -> list[TreeNode]:
    """The host's tree, one root per NUMA node (functions without one under ``NUMA node -1``).

    Args:
        state: the host as the scheduler's model holds it.
        occupancy: its occupancy (the engine's, memoised per state).
        usage: its usage (:func:`scheduler.core.host_usage.host_usage`).
        placement_states: placement id -> lifecycle state (``ready``,
            ``failed``, ...) of the host's placements, as stored.
    """
    view: HostView = state.view
    roots: dict[int, TreeNode] = {}
    vf_holders, mdev_holders, mig_holders = _holders_by_slot(state, placement_states)
    by_device: dict[PciAddress, set[PlacementId]] = {}
    for address, device in usage.devices.items():
        by_device[address] = set(device.placements)
    for fn in view.functions.values():
        if fn.role.is_bridge or fn.is_vf:
            continue
        numa = roots.get(fn.numa_node)
        if numa is None:
            numa = roots[fn.numa_node] = TreeNode("numa", f"NUMA node {fn.numa_node}")
        node = numa.child("bus", f"root bus {fn.root_bus or '?'}")
        for bridge in fn.bridge_chain:
            bridge_fn = view.functions.get(bridge)
            node = node.child(
                "bridge",
                bridge,
                bridge_fn.role.value if bridge_fn is not None else "bridge",
            )
        group = "no IOMMU group" if fn.iommu_group is None else f"IOMMU group {fn.iommu_group}"
        node = node.child("group", group)
        holders = tuple(
            sorted(
                (
                    h
                    for p in by_device.get(fn.address, ())
                    if (h := _holder(p, state, placement_states))
                ),
                key=lambda h: h.placement_id,
            )
        )
        leaf = TreeNode(
            "function",
            fn.address,
            status=_status(fn, usage, holders),
            detail=_detail(fn, usage),
            holders=holders,
        )
        pf = view.sriov_pfs.get(fn.address)
        if pf is not None:
            cells = [
                VfCell(vf.index, vf.address, vf.iommu_group, vf_holders.get((pf.address, vf.index)))
                for vf in pf.vfs
            ]
            # VFs allocated that the PF has not enabled yet: the agent makes them.
            enabled = {vf.index for vf in pf.vfs}
            cells += [
                VfCell(index, "(to be created)", None, holder)
                for (at, index), holder in sorted(vf_holders.items())
                if at == pf.address and index not in enabled
            ]
            leaf.vfs = tuple(sorted(cells, key=lambda c: c.index))
        parent = view.mdev_parents.get(fn.address)
        if parent is not None:
            rows = []
            held = {uuid: h for (p, uuid), h in mdev_holders.items() if p == fn.address}
            allocated_types = {
                slot.uuid: slot.type_id
                for key in state.allocations
                if isinstance(slot := parse_slot(key), MdevSlot) and slot.parent == fn.address
            }
            instances = {**parent.live, **allocated_types}
            for type_id, mtype in sorted(parent.types.items()):
                rows.append(
                    MdevTypeRow(
                        type_id,
                        mtype.max_instances,
                        mtype.available,
                        tuple(
                            (uuid, held.get(uuid))
                            for uuid, t in sorted(instances.items())
                            if t == type_id
                        ),
                    )
                )
            leaf.mdev = tuple(rows)
        gpu = view.gpus.get(fn.address)
        layout = occupancy.mig_layouts.get(fn.address)
        use = usage.devices[fn.address].use if fn.address in usage.devices else None
        # A MIG-mode GPU passed through whole has no slices to offer.
        sliced = use in (DeviceUse.FREE, DeviceUse.MIG)
        if gpu is not None and gpu.mig_enabled and layout is not None and sliced:
            leaf.mig = mig_map(gpu, layout, mig_holders)
        node.children.append(leaf)
    return [roots[n] for n in sorted(roots)]
