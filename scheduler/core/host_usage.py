"""What a host's devices are used for, and by whom: what operators are shown of a host.

The engine reads a host as an :class:`~scheduler.core.occupancy.Occupancy`,
tuned for judging candidates. Operators ask other questions: which of my
devices are in use, in which form, by which tenants, how full is each, how
many IOMMU groups are left. :func:`host_usage` answers them from the same two
sources the engine reads (the store's allocations and the inventory's live
objects), so ListHosts and the engine cannot disagree about what is free.

Forms and their units (what ``by_form`` and the per-tenant counts hold):

========  ==========================================================
``whole``  IOMMU groups held whole (whole-device passthrough)
``vf``     SR-IOV VFs allocated to placements
``mdev``   mediated devices, allocated or live (made by anyone)
``mig``    MIG GPU instances, allocated or live (made by anyone)
========  ==========================================================

A unit live on the host that no placement holds (an mdev or a MIG instance
someone made outside Tessera) counts in ``by_form`` and on its device, under
no tenant. A placement whose tenant the store does not say counts under
``placement:<id>``, as the engine judges it.

Pure: no store, no network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from tessera.scheduler.core.fragmentation import free_shares
from tessera.scheduler.core.host import HostView, PciFunctionView
from tessera.scheduler.core.identity import IommuGroupNumber, PciAddress, PlacementId, TenantName
from tessera.scheduler.core.mig_geometry import COMPUTE_SLICES
from tessera.scheduler.core.occupancy import DeviceMode, Occupancy
from tessera.scheduler.core.request import DeviceKind
from tessera.scheduler.core.slots import GroupSlot, MdevSlot, MigSlot, VfSlot, parse_slot
from tessera.scheduler.core.snapshot import HostState

__all__ = ["DeviceUsage", "DeviceUse", "HostUsage", "host_usage"]


class DeviceUse(StrEnum):
    """What one offered device is used for now; one use at a time.

    A device the host uses (``host_use``) whose VFs or mdevs tenants hold
    shows that form: the host keeps the device, tenants hold parts of it.
    """

    FREE = "free"
    """Nothing is held or live on it: it may still go in any form it offers."""
    WHOLE = "whole"
    """Its IOMMU group is held whole (passthrough)."""
    VF = "vf"
    """A PF with VFs enabled or allocated."""
    MDEV = "mdev"
    """An mdev parent with mdevs live or allocated."""
    MIG = "mig"
    """A MIG GPU with GPU instances live or allocated."""
    HOST = "host"
    """Used by the host itself (``PciFunctionView.host_use``), nothing else on it: never offered."""
    UNUSABLE = "unusable"
    """Its state is inconsistent (``Occupancy.unusable``: overlapping MIG instances)."""


#: The forms of ``by_form`` and of each tenant's counts, in the order shown.
_FORMS: tuple[str, ...] = tuple(
    u.value for u in (DeviceUse.WHOLE, DeviceUse.VF, DeviceUse.MDEV, DeviceUse.MIG)
)

_USE_OF_MODE: Mapping[DeviceMode, DeviceUse] = {
    DeviceMode.WHOLE: DeviceUse.WHOLE,
    DeviceMode.VF: DeviceUse.VF,
    DeviceMode.MDEV: DeviceUse.MDEV,
    DeviceMode.MIG: DeviceUse.MIG,
}


@dataclass(frozen=True)
class DeviceUsage:
    """One device offered to tenants, as it is used now.

    Attributes:
        address: the PCI function.
        kind: its :class:`~scheduler.core.request.DeviceKind` value
            (``"gpu"``, ``"nic"``, ``"accelerator"``).
        model: its model name, where the inventory says.
        numa_node: the NUMA node it sits on.
        iommu_group: its IOMMU group (None: the host has no IOMMU).
        use: what it is used for.
        tenants: the tenants holding anything on it, sorted. A VF or an
            mdev on one of a PF's VFs (SR-IOV vGPU) counts on the PF.
        placements: the placements holding anything on it, sorted.
        units_total: how many units of its use it has: ``WHOLE`` 1; ``VF``
            the PF's total VFs (``sriov_totalvfs``); ``MDEV`` the parent's
            capacity in instances of its most used type (the max
            ``max_instances`` of its types when that type is not offered);
            ``MIG`` 7 compute slices; ``FREE``, ``HOST`` and ``UNUSABLE`` 1.
        units_used: how many of those are held, allocated or live:
            ``WHOLE`` 1; ``VF`` the VFs allocated or whose own function is
            in use otherwise (mdevs on it, its group held whole, the host);
            ``MDEV`` the mdevs of every type; ``MIG`` the compute slices its
            instances use; ``HOST`` and ``UNUSABLE`` 1 (nothing is left to
            offer); ``FREE`` 0.
    """

    address: PciAddress
    kind: str
    model: str | None
    numa_node: int
    iommu_group: IommuGroupNumber | None
    use: DeviceUse
    tenants: tuple[TenantName, ...]
    placements: tuple[PlacementId, ...]
    units_total: int
    units_used: int


@dataclass(frozen=True)
class HostUsage:
    """A host's devices and IOMMU groups as they are used now.

    Attributes:
        devices: every function offered to tenants (a device kind, not a
            bridge) that is not itself a VF, in the view's order.
        groups_assignable: IOMMU groups holding such a device.
        groups_used: of those, the groups in use in any form: a device in
            it is not :attr:`DeviceUse.FREE` (held whole, VFs enabled or
            held, mdevs or MIG instances on it, unusable), or a function in
            it is used by the host.
        by_form: units held per form, allocated or live: ``"whole"`` (IOMMU
            groups held whole), ``"vf"`` (VFs allocated), ``"mdev"``
            (mdevs), ``"mig"`` (GPU instances); every form present, 0 when
            none.
        tenants: per tenant holding anything on the host, sorted by name,
            the units it holds per form (every form present). Units live
            without a placement count under no tenant, so these may sum to
            less than ``by_form``.
        gpus: the host's GPUs that can be handed over whole (VFs aside).
        gpu_free_share: the free share summed over those GPUs, in GPUs
            (:func:`scheduler.core.fragmentation.free_shares`).
    """

    devices: Mapping[PciAddress, DeviceUsage]
    groups_assignable: int
    groups_used: int
    by_form: Mapping[str, int]
    tenants: Mapping[TenantName, Mapping[str, int]]
    gpus: int
    gpu_free_share: float


def _tenant(owners: Mapping[PlacementId, TenantName], placement: PlacementId) -> TenantName:
    """The tenant of a placement; one the store does not name is a stranger (as the engine)."""
    tenant = owners.get(placement)
    return tenant if tenant is not None else TenantName(f"placement:{placement}")


def _listed(view: HostView, address: PciAddress) -> PciAddress:
    """The listed device a function's use counts on: a VF's PF, else the function itself."""
    function = view.functions.get(address)
    if function is not None and function.physfn is not None:
        return function.physfn
    return address


def _units(
    view: HostView, occupancy: Occupancy, device: PciFunctionView, use: DeviceUse
) -> tuple[int, int]:
    """(units_total, units_used) of a device in a use (see :class:`DeviceUsage`)."""
    address = device.address
    if use is DeviceUse.FREE:
        return 1, 0
    if use is DeviceUse.VF:
        pf = view.sriov_pfs.get(address)
        held = set(occupancy.vfs_taken.get(address, frozenset()))
        total = max(device.num_vfs, len(held))
        if pf is not None:
            total = max(total, pf.total_vfs)
            for vf in pf.vfs:
                function = view.functions.get(vf.address)
                in_use = vf.address in occupancy.modes or vf.address in occupancy.unusable
                if in_use or (function is not None and function.host_use):
                    held.add(vf.index)
        return total, len(held)
    if use is DeviceUse.MDEV:
        parent = view.mdev_parents.get(address)
        counts = occupancy.mdev_used.get(address, {})
        used = sum(counts.values())
        if parent is None:
            return used, used
        # The most used type, the first by id among equals.
        most = min(((-n, t) for t, n in counts.items() if n > 0), default=None)
        offered = parent.types.get(most[1]) if most is not None else None
        if offered is not None:
            return offered.max_instances, used
        return max((t.max_instances for t in parent.types.values()), default=0), used
    if use is DeviceUse.MIG:
        layout = occupancy.mig_layouts.get(address)
        return COMPUTE_SLICES, layout.used_compute if layout is not None else COMPUTE_SLICES
    return 1, 1  # WHOLE, HOST, UNUSABLE: the device is held, all of it


def _use(occupancy: Occupancy, device: PciFunctionView) -> DeviceUse:
    """What a device is used for (see :class:`DeviceUse`)."""
    if device.address in occupancy.unusable:
        return DeviceUse.UNUSABLE
    mode = occupancy.modes.get(device.address)
    if mode is not None:
        return _USE_OF_MODE[mode]
    return DeviceUse.HOST if device.host_use else DeviceUse.FREE


def _count(counts: dict[str, int], form: str, n: int = 1) -> None:
    counts[form] = counts.get(form, 0) + n


def _frozen(counts: Mapping[str, int]) -> Mapping[str, int]:
    """Counts with every form present, in :data:`_FORMS` order, read-only."""
    return MappingProxyType({form: counts.get(form, 0) for form in _FORMS})


def host_usage(state: HostState, occupancy: Occupancy) -> HostUsage:
    """What a host's devices are used for, by whom, and how full they are.

    Args:
        state: the host and its allocations (slot -> placement) and tenants.
        occupancy: ``state``'s occupancy
            (:func:`scheduler.core.occupancy.build_occupancy`, or the
            engine's memoised one).

    Returns:
        The host's usage (see :class:`HostUsage`).
    """
    view = state.view
    owners = state.tenants
    by_form: dict[str, int] = {}
    per_tenant: dict[TenantName, dict[str, int]] = {}
    holders: dict[PciAddress, set[PlacementId]] = {}
    # Per mdev parent its mdevs, per MIG GPU its instances (by start and
    # size): allocated and live, each counted once.
    mdevs: dict[PciAddress, set[str]] = {}
    instances: dict[PciAddress, set[tuple[int, int]]] = {}

    for key, placement in state.allocations.items():
        slot = parse_slot(key)
        devices: Iterable[PciAddress]
        form: str
        if isinstance(slot, GroupSlot):
            form = DeviceUse.WHOLE.value
            group = view.iommu_groups.get(slot.group)
            devices = group.members if group is not None else ()
        elif isinstance(slot, VfSlot):
            form, devices = DeviceUse.VF.value, (slot.pf,)
        elif isinstance(slot, MdevSlot):
            form, devices = DeviceUse.MDEV.value, (_listed(view, slot.parent),)
            mdevs.setdefault(slot.parent, set()).add(slot.uuid)
        elif isinstance(slot, MigSlot):
            form, devices = DeviceUse.MIG.value, (slot.gpu,)
            instances.setdefault(slot.gpu, set()).add((slot.start, slot.size))
        else:
            continue  # exclusive holds, host CPU and memory, unknown keys: no device
        if form in (DeviceUse.WHOLE.value, DeviceUse.VF.value):
            _count(by_form, form)  # mdevs and MIG instances: counted once, with the live ones
        _count(per_tenant.setdefault(_tenant(owners, placement), {}), form)
        for address in devices:
            holders.setdefault(address, set()).add(placement)

    # Live objects, whoever made them (as the engine counts them).
    for address, parent in view.mdev_parents.items():
        if parent.live:
            mdevs.setdefault(address, set()).update(parent.live)
    for address, gpu in view.gpus.items():
        if gpu.mig_enabled and gpu.gpu_instances:
            instances.setdefault(address, set()).update(
                (gi.start, gi.size) for gi in gpu.gpu_instances
            )
    _count(by_form, DeviceUse.MDEV.value, sum(len(u) for u in mdevs.values()))
    _count(by_form, DeviceUse.MIG.value, sum(len(i) for i in instances.values()))

    devices_used: dict[PciAddress, DeviceUsage] = {}
    assignable: set[IommuGroupNumber] = set()
    used_groups: set[IommuGroupNumber] = set()
    for function in view.functions.values():
        kind = function.kind
        if kind is None or function.is_vf:
            continue
        use = _use(occupancy, function)
        total, used = _units(view, occupancy, function, use)
        placements = sorted(holders.get(function.address, ()))
        devices_used[function.address] = DeviceUsage(
            address=function.address,
            kind=kind.value,
            model=function.model,
            numa_node=function.numa_node,
            iommu_group=function.iommu_group,
            use=use,
            tenants=tuple(sorted({_tenant(owners, p) for p in placements})),
            placements=tuple(placements),
            units_total=total,
            units_used=used,
        )
        if function.iommu_group is not None:
            assignable.add(function.iommu_group)
            if use is not DeviceUse.FREE:
                used_groups.add(function.iommu_group)
    for number in assignable - used_groups:
        group = view.iommu_groups.get(number)
        members = group.members if group is not None else ()
        if any((f := view.functions.get(m)) is not None and f.host_use for m in members):
            used_groups.add(number)

    shares = free_shares(view, occupancy)
    return HostUsage(
        devices=MappingProxyType(devices_used),
        groups_assignable=len(assignable),
        groups_used=len(used_groups),
        by_form=_frozen(by_form),
        tenants=MappingProxyType({t: _frozen(per_tenant[t]) for t in sorted(per_tenant)}),
        gpus=len(view.whole_devices(DeviceKind.GPU)),
        gpu_free_share=sum(shares.values()),
    )
