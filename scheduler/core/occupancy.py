"""What is taken on a host: allocations and live objects, folded into one view.

The engine judges every candidate against a host's :class:`Occupancy`, built
once per host state from two sources that can disagree for a while:

* the store's allocations (slot keys, see :mod:`scheduler.core.slots`): what
  Tessera has promised, including placements the agent has not carried out;
* the inventory's live objects (mdevs, MIG GPU instances, enabled VFs): what
  exists on the host, including what someone else created.

Both count: a unit is free only if neither source holds it. Pure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType

from tessera.scheduler.core.fast_enum import IdentityHashedEnum
from tessera.scheduler.core.host import GpuView, HostView, MdevParentView, PciFunctionView
from tessera.scheduler.core.identity import IommuGroupNumber, PciAddress, TenantName
from tessera.scheduler.core.mig import GpuInstance
from tessera.scheduler.core.mig_geometry import MigGeometryError, MigLayout
from tessera.scheduler.core.request import ExclusivityDomain
from tessera.scheduler.core.slots import (
    ExclusiveSlot,
    GroupSlot,
    HostShareSlot,
    MdevSlot,
    MigSlot,
    ParsedSlot,
    VfSlot,
    parse_slot,
)
from tessera.scheduler.core.snapshot import HostState


class DeviceMode(IdentityHashedEnum):
    """How a physical device is being used; one mode at a time."""

    WHOLE = "whole-device"
    VF = "vf"
    MDEV = "mdev"
    MIG = "mig"


#: An exclusivity domain instance: (domain, instance id).
DomainKey = tuple[ExclusivityDomain, str]

#: The domains a device belongs to, narrowest first.
DOMAINS = (
    ExclusivityDomain.DEVICE,
    ExclusivityDomain.PCIE_SWITCH,
    ExclusivityDomain.NUMA_NODE,
    ExclusivityDomain.HOST,
)


def domain_keys(view: HostView, device: PciFunctionView) -> tuple[DomainKey, ...]:
    """Every domain instance ``device`` lies in, narrowest first (as :data:`DOMAINS`)."""
    return (*device.own_domains, (ExclusivityDomain.HOST, view.host_id))


@dataclass(frozen=True)
class Occupancy:
    """A host's taken units and who holds what.

    Attributes:
        groups_taken: IOMMU groups held whole.
        modes: devices in use, with how. A VF a placement holds puts both
            its PF and its own function in VF use; an mdev, its parent (on
            SR-IOV vGPU a VF function) in mdev use.
        vfs_taken: per PF, VF indexes held.
        mdev_used: per parent, mdevs per type (live or allocated).
        mdev_pending: per parent, allocated mdevs per type not live yet.
        mig_layouts: per MIG-enabled GPU, its occupancy.
        unusable: devices whose state is inconsistent (e.g. overlapping MIG
            instances reported); nothing more goes there.
        tenants: per domain instance, the tenants with something inside.
        exclusive: per domain instance, the tenant holding it exclusively.
        cpu_used: host CPU held beside devices, in thousandths of a CPU.
        memory_used: host memory held beside devices, in MiB.
    """

    groups_taken: frozenset[IommuGroupNumber]
    modes: Mapping[PciAddress, DeviceMode]
    vfs_taken: Mapping[PciAddress, frozenset[int]]
    mdev_used: Mapping[PciAddress, Mapping[str, int]]
    mdev_pending: Mapping[PciAddress, Mapping[str, int]]
    mig_layouts: Mapping[PciAddress, MigLayout]
    unusable: frozenset[PciAddress] = frozenset()
    tenants: Mapping[DomainKey, frozenset[TenantName]] = field(default_factory=dict)
    exclusive: Mapping[DomainKey, TenantName] = field(default_factory=dict)
    cpu_used: int = 0
    memory_used: int = 0

    def other_tenants(self, key: DomainKey, tenant: TenantName) -> frozenset[TenantName]:
        """Tenants other than ``tenant`` inside a domain instance."""
        return self.tenants.get(key, frozenset()) - {tenant}

    def held_by_other(self, key: DomainKey, tenant: TenantName) -> TenantName | None:
        """The other tenant holding a domain instance exclusively, if any."""
        holder = self.exclusive.get(key)
        return holder if holder is not None and holder != tenant else None


def mdev_free(
    parent: MdevParentView,
    type_id: str,
    used: Mapping[str, int],
    pending: Mapping[str, int],
) -> int:
    """How many more mdevs of ``type_id`` the parent takes.

    Two bounds, the tighter wins: the kernel's ``available_instances`` less
    what Tessera allocated but the agent has not created yet; and the
    parent's share model, where an instance of type *t* uses ``1/max(t)`` of
    the parent (NVIDIA vGPU splits framebuffer this way), so mixed types add
    up to at most one parent. On a single-type parent, any other live or
    allocated type leaves no room.
    """
    offered = parent.types.get(type_id)
    if offered is None or offered.max_instances <= 0:
        return 0
    if not used:
        # Nothing on the parent: the share model leaves all of it, without
        # the sums below (the fast path asks this of every parent it indexes).
        return max(0, min(offered.max_instances, offered.available - pending.get(type_id, 0)))
    if parent.single_type and any(n > 0 and t != type_id for t, n in used.items()):
        return 0
    fill = Fraction(0)
    for t, n in used.items():
        other = parent.types.get(t)
        # A live mdev of a type no longer offered still takes room; count it
        # as a whole parent's worth would be too harsh, as one of this type.
        share = other.max_instances if other is not None and other.max_instances > 0 else 0
        fill += Fraction(n, share) if share else Fraction(n, offered.max_instances)
    room = int((1 - fill) * offered.max_instances) if fill < 1 else 0
    kernel = offered.available - pending.get(type_id, 0)
    return max(0, min(room, kernel))


def _devices_of_slot(view: HostView, slot: object) -> tuple[PciAddress, ...]:
    if isinstance(slot, GroupSlot):
        group = view.iommu_groups.get(slot.group)
        return group.members if group is not None else ()
    if isinstance(slot, VfSlot):
        return (slot.pf,)
    if isinstance(slot, MdevSlot):
        return (slot.parent,)
    if isinstance(slot, MigSlot):
        return (slot.gpu,)
    return ()


# id(GPU view) -> (the view, the layout of its live instances; None: they
# overlap). Views are immutable and long-lived: most GPUs have no allocation,
# and their layout is the same at every build.
_LIVE_LAYOUTS: dict[int, tuple[GpuView, MigLayout | None]] = {}


def _live_layout(gpu: GpuView) -> MigLayout | None:
    """The layout of a MIG GPU's live instances, or None when they overlap."""
    found = _LIVE_LAYOUTS.get(id(gpu))
    if found is not None and found[0] is gpu:
        return found[1]
    try:
        # One instance per placement, as when allocations are folded in.
        live = {(gi.start, gi.size): gi for gi in gpu.gpu_instances}
        layout: MigLayout | None = MigLayout(tuple(live.values()))
    except MigGeometryError:
        layout = None
    if len(_LIVE_LAYOUTS) >= 65_536:  # bounded: old views are dead weight
        _LIVE_LAYOUTS.clear()
    _LIVE_LAYOUTS[id(gpu)] = (gpu, layout)
    return layout


def _mig_layouts(
    view: HostView, allocated: Mapping[PciAddress, list[MigSlot]]
) -> tuple[dict[PciAddress, MigLayout], set[PciAddress]]:
    layouts: dict[PciAddress, MigLayout] = {}
    broken: set[PciAddress] = set()
    for address, gpu in view.gpus.items():
        if not gpu.mig_enabled:
            continue
        mine = allocated.get(address)
        if not mine:
            layout = _live_layout(gpu)
            if layout is None:
                broken.add(address)
            else:
                layouts[address] = layout
            continue
        layout = _allocated_layout(gpu, mine)
        if layout is None:
            broken.add(address)
        else:
            layouts[address] = layout
    return layouts, broken


# (id(GPU view), its allocated instances) -> (the view, the layout; None:
# they overlap). A GPU's instances come in few combinations (its geometry
# is fixed), met again as placements come and go. Bounded.
_ALLOCATED_LAYOUTS: dict[
    tuple[int, tuple[tuple[int, int, int], ...]], tuple[GpuView, MigLayout | None]
] = {}


def _allocated_layout(gpu: GpuView, mine: Sequence[MigSlot]) -> MigLayout | None:
    """The layout of a MIG GPU's live and allocated instances, or None when they overlap."""
    key = (id(gpu), tuple((s.start, s.size, s.profile_id) for s in mine))
    found = _ALLOCATED_LAYOUTS.get(key)
    if found is not None and found[0] is gpu:
        return found[1]
    slices = {p.profile_id: p.slices for p in gpu.mig_profiles}
    instances = {(gi.start, gi.size): gi for gi in gpu.gpu_instances}
    for s in mine:
        # An allocated instance the agent created shows up live at the
        # same placement: count it once.
        instances.setdefault(
            (s.start, s.size),
            GpuInstance(s.start, s.size, s.profile_id, slices.get(s.profile_id, 1)),
        )
    try:
        layout: MigLayout | None = MigLayout(tuple(instances.values()))
    except MigGeometryError:
        layout = None
    if len(_ALLOCATED_LAYOUTS) >= 65_536:  # bounded: old views are dead weight
        _ALLOCATED_LAYOUTS.clear()
    _ALLOCATED_LAYOUTS[key] = (gpu, layout)
    return layout


@dataclass(frozen=True, slots=True)
class _SlotFacts:
    """What one allocation's key means on one host's hardware, worked out once.

    Attributes:
        slot: the parsed key (None: a key the grammar does not know, held
            but tied to no device).
        whole: the functions a whole-group slot puts in whole-device use.
        vf_function: a VF slot's own function, where the VF exists.
        domains: the exclusivity domains, the host's aside, of the devices
            the slot sits on (bridges aside): its tenant is inside each.
        on_host: the slot sits on some device: its tenant is inside the host.
    """

    slot: ParsedSlot | None
    whole: tuple[PciAddress, ...] = ()
    vf_function: PciAddress | None = None
    domains: tuple[DomainKey, ...] = ()
    on_host: bool = False


#: (id(view), slot key) -> (the view, the key's facts on it). Views are
#: immutable and long-lived, and a host's allocations change a few at a
#: time: most of a rebuild's keys were worked out at the last one. Bounded;
#: mdev and exclusive keys are unique per placement.
_FACTS: dict[tuple[int, str], tuple[HostView, _SlotFacts]] = {}
_FACTS_KEPT = 65_536


def _slot_facts(view: HostView, key: str) -> _SlotFacts:
    """The facts of ``key`` on ``view`` (memoised)."""
    found = _FACTS.get((id(view), key))
    if found is not None and found[0] is view:
        return found[1]
    slot = parse_slot(key)
    devices = _devices_of_slot(view, slot)
    whole = devices if isinstance(slot, GroupSlot) else ()
    vf_function = None
    if isinstance(slot, VfSlot):
        pf = view.sriov_pfs.get(slot.pf)
        for vf in pf.vfs if pf is not None else ():
            if vf.index == slot.index:
                vf_function = vf.address
    domains: dict[DomainKey, None] = {}
    on_host = False
    for address in devices:
        device = view.functions.get(address)
        if device is None or device.role.is_bridge:
            continue
        on_host = True
        domains.update(dict.fromkeys(device.own_domains))
    facts = _SlotFacts(slot, whole, vf_function, tuple(domains), on_host)
    if len(_FACTS) >= _FACTS_KEPT:
        _FACTS.clear()
    _FACTS[(id(view), key)] = (view, facts)
    return facts


def build_occupancy(state: HostState) -> Occupancy:
    """Fold a host state's allocations and live objects into an :class:`Occupancy`."""
    view = state.view
    groups: set[IommuGroupNumber] = set()
    modes: dict[PciAddress, DeviceMode] = {}
    vfs: dict[PciAddress, set[int]] = {}
    mdev_uuids: dict[PciAddress, dict[str, str]] = {}
    mig_allocated: dict[PciAddress, list[MigSlot]] = {}
    # Built frozen: most domains hold one tenant, whose set is shared.
    tenants: dict[DomainKey, frozenset[TenantName]] = {}
    exclusive: dict[DomainKey, TenantName] = {}
    on_host: set[TenantName] = set()
    owners = state.tenants
    whole_mode, vf_mode = DeviceMode.WHOLE, DeviceMode.VF
    # The memo read inline and each tenant's singleton made once: this loop
    # runs for every allocation of every host that changes (a replica's
    # hottest loop after the search).
    known, view_id = _FACTS.get, id(view)
    alone_of: dict[TenantName, frozenset[TenantName]] = {}
    cpu_used = memory_used = 0

    for key, pid in state.allocations.items():
        found = known((view_id, key))
        facts = found[1] if found is not None and found[0] is view else _slot_facts(view, key)
        slot = facts.slot
        # A placement whose tenant the store does not say is some other
        # tenant: judged as a stranger, never as the requester.
        tenant = owners.get(pid)
        if tenant is None:
            tenant = TenantName(f"placement:{pid}")
        if isinstance(slot, GroupSlot):
            groups.add(slot.group)
            for member in facts.whole:
                modes[member] = whole_mode
        elif isinstance(slot, VfSlot):
            vfs.setdefault(slot.pf, set()).add(slot.index)
            modes.setdefault(slot.pf, vf_mode)
            # The VF's own function is in VF use too: nothing else goes on
            # it (an mdev where the VF is an mdev parent, SR-IOV vGPU; a
            # whole-device claim of its group).
            if facts.vf_function is not None:
                modes.setdefault(facts.vf_function, vf_mode)
        elif isinstance(slot, MdevSlot):
            mdev_uuids.setdefault(slot.parent, {})[slot.uuid] = slot.type_id
            modes.setdefault(slot.parent, DeviceMode.MDEV)
        elif isinstance(slot, MigSlot):
            mig_allocated.setdefault(slot.gpu, []).append(slot)
            modes.setdefault(slot.gpu, DeviceMode.MIG)
        elif isinstance(slot, ExclusiveSlot):
            exclusive[(slot.domain, slot.instance)] = tenant
        elif isinstance(slot, HostShareSlot):
            cpu_used += slot.cpu_milli
            memory_used += slot.memory_mib
        if facts.domains:
            alone = alone_of.get(tenant)
            if alone is None:
                alone = alone_of[tenant] = frozenset((tenant,))
            for domain in facts.domains:
                inside = tenants.setdefault(domain, alone)
                if inside is not alone and tenant not in inside:
                    tenants[domain] = inside | alone
        if facts.on_host:
            on_host.add(tenant)
    if on_host:
        tenants[(ExclusivityDomain.HOST, view.host_id)] = frozenset(on_host)

    # Live objects, whoever made them.
    for pf in view.sriov_pfs.values():
        if pf.num_vfs > 0:
            modes.setdefault(pf.address, DeviceMode.VF)
    used: dict[PciAddress, Counter[str]] = {}
    pending: dict[PciAddress, Counter[str]] = {}
    for address, parent in view.mdev_parents.items():
        allocated = mdev_uuids.get(address, {})
        everything = {**parent.live, **allocated}
        if everything:
            modes.setdefault(address, DeviceMode.MDEV)
        used[address] = Counter(everything.values())
        pending[address] = Counter(t for u, t in allocated.items() if u not in parent.live)
    layouts, broken = _mig_layouts(view, mig_allocated)
    for address, layout in layouts.items():
        if layout.instances:
            modes.setdefault(address, DeviceMode.MIG)
    return Occupancy(
        groups_taken=frozenset(groups),
        modes=MappingProxyType(modes),
        vfs_taken=MappingProxyType({pf: frozenset(ix) for pf, ix in vfs.items()}),
        mdev_used=MappingProxyType(used),
        mdev_pending=MappingProxyType(pending),
        mig_layouts=MappingProxyType(layouts),
        unusable=frozenset(broken),
        tenants=MappingProxyType(tenants),
        exclusive=MappingProxyType(exclusive),
        cpu_used=cpu_used,
        memory_used=memory_used,
    )
