"""The plugins: one per constraint family, each naming its rejections.

Hard constraints (never broken, whatever the score says):

* ``host``, ``host-selector``: lease and labels;
* ``device-match``: kind, vendor, device ids, models;
* ``host-use``: what the host itself needs is never offered;
* ``iommu-isolation``: a group never spans two tenants; whole-device
  passthrough takes every endpoint of an entirely free group; VFs and mdevs
  sit in groups of their own;
* ``interference``: one device serves in one mode at a time (whole, VF,
  mdev, MIG); a GPU in MIG mode hosts no time-sliced mdev; a GPU with
  time-sliced tenants is never handed over whole or partitioned;
* ``migratability``: a migratable claim only lands on slots that can move;
* ``mdev-homogeneity``: single-type parents keep one type;
* ``capacity``: VFs per PF, mdev instances and share, MIG geometry;
* ``exclusivity``: no other tenant inside a tenant's exclusive domain;
* ``numa``, ``pcie-affinity``: the request's topology policy.

Soft preferences are the scorers at the end of the module.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence

from tessera.scheduler.core.engine.framework import (
    Cycle,
    Option,
    Pick,
    SearchPass,
    Verdict,
)
from tessera.scheduler.core.fragmentation import (
    HostFragmentation,
    TaskMix,
    TaskMixLearner,
    TaskShape,
    free_shares,
    host_fragmentation,
    occupancy_after,
    task_shape,
)
from tessera.scheduler.core.host import (
    HANDOVER_GROUP_HOLDS_HOST_DEVICE,
    HANDOVER_IN_USE_BY_HOST,
    GpuView,
    HostView,
    PciFunctionView,
    domain_instance,
)
from tessera.scheduler.core.identity import PciAddress
from tessera.scheduler.core.mig import MigProfile
from tessera.scheduler.core.mig_geometry import (
    MigLayout,
    best_placement,
    capacity,
    fragmentation_score,
    with_instance,
)
from tessera.scheduler.core.occupancy import (
    DeviceMode,
    Occupancy,
    domain_keys,
    mdev_free,
)
from tessera.scheduler.core.request import (
    Affinity,
    AffinityScope,
    Claim,
    DeviceForm,
    DeviceKind,
    ExclusivityDomain,
    NumaPolicy,
    PlacementRequest,
)
from tessera.scheduler.core.stranding import (
    cpu_memory_shortfall,
    demand_per_gpu,
    gangs_lost,
    geometry_mix,
    geometry_of,
    geometry_value,
    rare_hole_closed,
    stranded_share,
    unfillable_hole,
)

# Named reasons, stable for operators and metrics.
REASON_LEASE_EXPIRED = "lease-expired"
REASON_CORDONED = "cordoned"
REASON_LABELS_MISMATCH = "labels-mismatch"
REASON_CPU_SHORT = "host-cpu-short"
REASON_MEMORY_SHORT = "host-memory-short"
REASON_NO_IOMMU = "no-iommu"
REASON_NO_MATCHING_DEVICE = "no-matching-device"
REASON_KIND_MISMATCH = "kind-mismatch"
REASON_SELECTOR_MISMATCH = "selector-mismatch"
REASON_NOT_MIGRATABLE = "passthrough-not-migratable"
REASON_MIG_NOT_MIGRATABLE = "mig-not-migratable"
REASON_MDEV_TYPE_NOT_MIGRATABLE = "mdev-type-not-migratable"
REASON_VF_NOT_MIGRATABLE = "vf-driver-not-migratable"
REASON_NO_GROUP = "device-without-iommu-group"
REASON_GROUP_ALLOCATED = "iommu-group-allocated"
REASON_PF_HAS_VFS = "pf-has-vfs-enabled"
REASON_GROUP_HOLDS_HOST_DEVICE = HANDOVER_GROUP_HOLDS_HOST_DEVICE
REASON_IN_USE_BY_HOST = HANDOVER_IN_USE_BY_HOST
REASON_DEVICE_IN_OTHER_MODE = "device-in-other-mode"
REASON_MIG_HOSTS_NO_MDEV = "mig-gpu-hosts-no-time-sliced-mdev"
REASON_MIG_DISABLED = "mig-disabled"
REASON_DEVICE_UNUSABLE = "device-state-inconsistent"
REASON_NO_FREE_VF = "no-free-vf"
REASON_NO_MDEV_ROOM = "no-mdev-instance-free"
REASON_MDEV_TYPE_NOT_OFFERED = "mdev-type-not-offered"
REASON_MDEV_OTHER_TYPE = "parent-holds-other-mdev-type"
REASON_MIG_PROFILE_NOT_OFFERED = "mig-profile-not-offered"
REASON_NO_MIG_PLACEMENT = "no-mig-placement-free"
REASON_HELD_EXCLUSIVELY = "domain-held-exclusively"
REASON_OTHER_TENANTS = "domain-has-other-tenants"
REASON_TOO_FEW = "too-few-free-units"
REASON_TOPOLOGY = "no-assignment-meets-topology"

#: The VFIO driver of plain passthrough.
VFIO_PCI = "vfio-pci"


def selector_matches(claim: Claim, device: PciFunctionView) -> bool:
    """Whether a device matches a claim's vendor, device ids and models."""
    sel = claim.selector
    if sel.vendor_id and device.vendor_id != sel.vendor_id:
        return False
    if sel.device_ids and device.device_id not in sel.device_ids:
        return False
    return not sel.models or (device.model is not None and device.model in sel.models)


# ---------------------------------------------------------------- host filters


class LeasePlugin:
    """Hosts whose lease expired (or that drain) take nothing new."""

    name = "host"

    def filter_host(self, cycle: Cycle) -> Verdict | None:
        """Reject a host that is not schedulable."""
        if not cycle.state.schedulable:
            why = REASON_CORDONED if cycle.state.cordoned else REASON_LEASE_EXPIRED
            return (self.name, why, cycle.view.host_id)
        return None


class HostSelectorPlugin:
    """The host's labels must include every pair of the request's selector."""

    name = "host-selector"

    def filter_host(self, cycle: Cycle) -> Verdict | None:
        """Reject a host whose labels do not match."""
        labels = cycle.view.labels
        if any(labels.get(k) != v for k, v in cycle.request.host_selector.items()):
            return (self.name, REASON_LABELS_MISMATCH, cycle.view.host_id)
        return None


class HostSharePlugin:
    """The host has the CPU and memory the request's workload needs beside its devices.

    What a host has is what its agent reports (every CPU of its NUMA nodes,
    their memory); what is left is that less every placement's share. A
    request asking for neither passes every host. A host whose agent
    reports no CPUs (or no memory) takes no request asking for them: what
    is not known is not promised.
    """

    name = "host-share"

    def filter_host(self, cycle: Cycle) -> Verdict | None:
        """Reject a host without the CPU or memory left."""
        request = cycle.request
        if not request.cpu_milli and not request.memory_mib:
            return None
        view, occupancy = cycle.view, cycle.occupancy
        for asked, total, used, reason, unit in (
            (request.cpu_milli, view.cpu_milli, occupancy.cpu_used, REASON_CPU_SHORT, "milli-CPU"),
            (
                request.memory_mib,
                view.memory_mib,
                occupancy.memory_used,
                REASON_MEMORY_SHORT,
                "MiB",
            ),
        ):
            if asked and asked > total - used:
                return (
                    self.name,
                    reason,
                    f"{view.host_id}: {max(0, total - used)} of {total} {unit} left, {asked} asked",
                )
        return None


# ----------------------------------------------------------- option generators


class WholeDeviceOptions:
    """Whole devices by VFIO passthrough: one option per device."""

    form = DeviceForm.WHOLE_DEVICE

    def options(self, cycle: Cycle, claim: Claim) -> Iterator[Option | Verdict]:
        """Every device of the claim's kind that is not a VF."""
        for device in cycle.view.whole_devices(claim.kind):
            yield Option(
                self.form,
                device,
                pool=f"whole:{device.address}",
                free=1,
                group=device.iommu_group,
            )


class VfOptions:
    """SR-IOV VFs: one pool per PF of the claim's kind."""

    form = DeviceForm.VF

    def options(self, cycle: Cycle, claim: Claim) -> Iterator[Option | Verdict]:
        """A pool per PF, with the VFs free on it."""
        view = cycle.view
        for pf in view.sriov_pfs.values():
            device = view.functions.get(pf.address)
            if device is None or device.kind is not claim.kind:
                continue
            free, driver = free_vfs(view, cycle.occupancy, pf.address, migratable=claim.migratable)
            yield Option(
                self.form,
                device,
                pool=f"vf:{pf.address}",
                free=len(free),
                variant=driver,
                migratable=driver != VFIO_PCI,
            )


class FreeVfIndexes:
    """Free VF indexes of a PF, lowest first: counted at once, handed out one at a time.

    A PF without VFs offers every index below its ``total_vfs`` that no
    placement holds. ``total_vfs`` is the agent's word (the registry refuses
    more than the 16-bit TotalVFs field allows, but the engine does not rely
    on that): the indexes are never listed, so memory stays proportional to
    the VFs placements hold and the VFs the PF really has, not to what it
    claims it could have.

    Used like the list it replaces: ``len()``, truth, iteration (lazy, not
    consuming) and ``pop(0)`` to take the lowest.

    Args:
        listed: free indexes of existing VFs, ascending (a PF with VFs).
        below: every index in ``[0, below)`` not in ``taken`` is free too
            (a PF without VFs).
        taken: indexes placements hold.
    """

    def __init__(
        self,
        listed: Sequence[int] = (),
        *,
        below: int = 0,
        taken: frozenset[int] = frozenset(),
    ) -> None:
        self._listed = deque(listed)
        self._next = 0
        self._stop = max(0, below)
        self._skip = taken
        held = sum(1 for i in taken if 0 <= i < self._stop)
        self._count = len(self._listed) + self._stop - held

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[int]:
        yield from self._listed
        for i in range(self._next, self._stop):
            if i not in self._skip:
                yield i

    def pop(self, index: int = 0) -> int:
        """Take the lowest free index.

        Raises:
            IndexError: none is left, or ``index`` is not 0 (only the lowest
                is ever taken).
        """
        if index != 0:
            raise IndexError("only the lowest free VF index can be taken")
        if self._count <= 0:
            raise IndexError("no free VF index left")
        self._count -= 1
        if self._listed:
            return self._listed.popleft()
        i = self._next
        while i in self._skip:
            i += 1
        self._next = i + 1
        return i


def free_vfs(
    view: HostView, occupancy: Occupancy, pf_address: PciAddress, *, migratable: bool = False
) -> tuple[FreeVfIndexes, str]:
    """Free VF indexes of a PF, lowest first, and the VFIO driver they take.

    A PF with VFs offers those (the agent never resizes a PF in use); one
    without offers all it could have, enabled on first use. A VF migrates
    only on a variant driver (plain vfio-pci cannot):

    * existing VFs take the one the agent reported for them, each its own
      ``migration_driver``; none reported means vfio-pci, whatever the PF
      says of VFs in general;
    * VFs not created yet take the one the PF reported for its future VFs
      (``vf_migration_driver``), but only for a claim that must migrate:
      any other claim gets vfio-pci, so that it never depends on the variant
      module being loaded on the host.

    A VF is free only if its own function is unused too: on SR-IOV vGPU a VF
    is an mdev parent, and a VF with live or allocated mdevs is not handed
    over; nor is a VF whose IOMMU group a whole-device claim holds.

    Args:
        view: the host.
        occupancy: what placements hold on it.
        pf_address: the PF.
        migratable: the claim must be live-migratable.
    """
    pf = view.sriov_pfs[pf_address]
    taken = occupancy.vfs_taken.get(pf.address, frozenset())
    if pf.num_vfs > 0:
        drivers: set[str] = set()
        free: list[int] = []
        modes = occupancy.modes
        for vf in sorted(pf.vfs, key=lambda v: v.index):
            function = view.functions.get(vf.address)
            if function is not None:
                drivers.add(function.migration_driver or VFIO_PCI)
                if function.host_use:
                    continue
            if vf.index in taken or modes.get(vf.address) not in (None, DeviceMode.VF):
                continue
            if vf.iommu_group is not None and vf.iommu_group in occupancy.groups_taken:
                continue
            free.append(vf.index)
        driver = drivers.pop() if len(drivers) == 1 else VFIO_PCI
        return FreeVfIndexes(free), driver
    whole_taken = (
        view.functions[pf.address].iommu_group in occupancy.groups_taken
        if pf.address in view.functions
        else False
    )
    if whole_taken:
        return FreeVfIndexes(), VFIO_PCI
    future = (pf.vf_migration_driver if migratable else None) or VFIO_PCI
    return FreeVfIndexes(below=pf.total_vfs, taken=taken), future


class MdevOptions:
    """Mediated devices: one pool per (parent, type)."""

    form = DeviceForm.MDEV

    def options(self, cycle: Cycle, claim: Claim) -> Iterator[Option | Verdict]:
        """A pool per offered type the claim accepts."""
        view = cycle.view
        occ = cycle.occupancy
        for parent in view.mdev_parents.values():
            device = view.functions.get(parent.address)
            if device is None or device.kind is not claim.kind:
                continue
            wanted = [t for t in parent.types if not claim.mdev_types or t in claim.mdev_types]
            if not wanted:
                yield ("capacity", REASON_MDEV_TYPE_NOT_OFFERED, parent.address)
                continue
            used = occ.mdev_used.get(parent.address, {})
            pending = occ.mdev_pending.get(parent.address, {})
            for type_id in wanted:
                offered = parent.types[type_id]
                yield Option(
                    self.form,
                    device,
                    pool=f"mdev:{parent.address}#{type_id}",
                    free=mdev_free(parent, type_id, used, pending),
                    variant=type_id,
                    migratable=offered.migratable,
                )


class MigOptions:
    """MIG GPU instances: one pool per (GPU, profile)."""

    form = DeviceForm.MIG

    def options(self, cycle: Cycle, claim: Claim) -> Iterator[Option | Verdict]:
        """A pool per profile the claim accepts, on every MIG GPU."""
        view = cycle.view
        for gpu in view.gpus.values():
            device = view.functions.get(gpu.address)
            if device is None or device.kind is not claim.kind:
                continue
            if not gpu.mig_enabled:
                yield ("interference", REASON_MIG_DISABLED, gpu.address)
                continue
            layout = cycle.occupancy.mig_layouts.get(gpu.address)
            if layout is None:
                yield ("interference", REASON_DEVICE_UNUSABLE, gpu.address)
                continue
            profiles = [
                p
                for p in gpu.mig_profiles
                if not claim.mig_profiles or p.name in claim.mig_profiles
            ]
            if not profiles:
                yield ("capacity", REASON_MIG_PROFILE_NOT_OFFERED, gpu.address)
                continue
            free = capacity(layout, profiles)
            for profile in profiles:
                yield Option(
                    self.form,
                    device,
                    pool=f"mig:{gpu.address}#{profile.name}",
                    free=free[profile.name],
                    variant=profile.name,
                )


# -------------------------------------------------------------- option filters


class DeviceMatchPlugin:
    """Vendor, device ids and models of the claim's selector."""

    name = "device-match"

    def filter_option(self, cycle: Cycle, claim: Claim, option: Option) -> Verdict | None:
        """Reject a device the selector does not match."""
        if not selector_matches(claim, option.device):
            return (self.name, REASON_SELECTOR_MISMATCH, option.device.address)
        return None


class HostUsePlugin:
    """What the host itself uses (boot display, a NIC with link up) stays."""

    name = "host-use"

    def filter_option(self, cycle: Cycle, claim: Claim, option: Option) -> Verdict | None:
        """Reject handing over a device (or group) the host needs."""
        if option.form is not DeviceForm.WHOLE_DEVICE:
            # A PF's VFs and a parent's mdevs leave the device with the host.
            return None
        blocker = cycle.view.handover_blocker(option.device.address)
        if blocker is not None and blocker[0] == HANDOVER_IN_USE_BY_HOST:
            return (self.name, REASON_IN_USE_BY_HOST, blocker[1])
        return None


class IommuIsolationPlugin:
    """A group never spans two tenants; passthrough takes whole free groups."""

    name = "iommu-isolation"

    def filter_option(self, cycle: Cycle, claim: Claim, option: Option) -> Verdict | None:
        """Reject options that would share a group or lack one."""
        view = cycle.view
        if option.form is not DeviceForm.MIG and not view.iommu_present:
            return (self.name, REASON_NO_IOMMU, view.host_id)
        if option.form is not DeviceForm.WHOLE_DEVICE:
            return None
        device = option.device
        if device.iommu_group is None:
            return (self.name, REASON_NO_GROUP, device.address)
        if device.iommu_group in cycle.occupancy.groups_taken:
            return ("capacity", REASON_GROUP_ALLOCATED, device.address)
        blocker = view.handover_blocker(device.address)
        if blocker is not None and blocker[0] == HANDOVER_GROUP_HOLDS_HOST_DEVICE:
            return (self.name, REASON_GROUP_HOLDS_HOST_DEVICE, blocker[1])
        if device.num_vfs > 0 or cycle.occupancy.vfs_taken.get(device.address):
            # vfio-pci refuses a PF with SR-IOV enabled (EBUSY).
            return (self.name, REASON_PF_HAS_VFS, device.address)
        # Every other endpoint of the group goes along: none may be in use.
        for member in view.group_endpoints(device.iommu_group):
            if cycle.occupancy.modes.get(member) not in (None, DeviceMode.WHOLE):
                return ("interference", REASON_DEVICE_IN_OTHER_MODE, member)
        return None


#: The modes an option's form puts its device in.
FORM_MODE = {
    DeviceForm.WHOLE_DEVICE: DeviceMode.WHOLE,
    DeviceForm.VF: DeviceMode.VF,
    DeviceForm.MDEV: DeviceMode.MDEV,
    DeviceForm.MIG: DeviceMode.MIG,
}


class InterferencePlugin:
    """Interference classes: one mode per device, no time-slicing beside MIG."""

    name = "interference"

    def filter_option(self, cycle: Cycle, claim: Claim, option: Option) -> Verdict | None:
        """Reject a form the claim's isolation forbids or the device's mode excludes."""
        address = option.device.address
        if address in cycle.occupancy.unusable:
            return (self.name, REASON_DEVICE_UNUSABLE, address)
        mode = cycle.occupancy.modes.get(address)
        if mode is not None and mode is not FORM_MODE[option.form]:
            return (self.name, REASON_DEVICE_IN_OTHER_MODE, f"{address} is in {mode.value} use")
        if option.form is DeviceForm.MDEV:
            gpu = cycle.view.gpus.get(address)
            if gpu is not None and gpu.mig_enabled:
                return (self.name, REASON_MIG_HOSTS_NO_MDEV, address)
        return None


class MigratabilityPlugin:
    """A migratable claim lands only on slots whose backing can move."""

    name = "migratability"

    def filter_option(self, cycle: Cycle, claim: Claim, option: Option) -> Verdict | None:
        """Reject non-migratable options of a migratable claim."""
        if not claim.migratable:
            return None
        reasons = {
            DeviceForm.WHOLE_DEVICE: REASON_NOT_MIGRATABLE,
            DeviceForm.MIG: REASON_MIG_NOT_MIGRATABLE,
            DeviceForm.MDEV: REASON_MDEV_TYPE_NOT_MIGRATABLE,
            DeviceForm.VF: REASON_VF_NOT_MIGRATABLE,
        }
        if option.form in (DeviceForm.WHOLE_DEVICE, DeviceForm.MIG) or not option.migratable:
            return (self.name, reasons[option.form], option.device.address)
        return None


class MdevHomogeneityPlugin:
    """Single-type parents (time-sliced vGPU before Ampere) keep one type."""

    name = "mdev-homogeneity"

    def filter_option(self, cycle: Cycle, claim: Claim, option: Option) -> Verdict | None:
        """Reject a type other than the one a single-type parent runs."""
        if option.form is not DeviceForm.MDEV:
            return None
        parent = cycle.view.mdev_parents.get(option.device.address)
        if parent is None or not parent.single_type:
            return None
        used = cycle.occupancy.mdev_used.get(parent.address, {})
        others = sorted(t for t, n in used.items() if n > 0 and t != option.variant)
        if others:
            return (self.name, REASON_MDEV_OTHER_TYPE, f"{parent.address} runs {others[0]}")
        return None


class CapacityPlugin:
    """Units left in each pool; joint MIG geometry and mdev share within a request."""

    name = "capacity"

    def filter_option(self, cycle: Cycle, claim: Claim, option: Option) -> Verdict | None:
        """Reject an option with nothing free."""
        if option.free > 0:
            return None
        reason = {
            DeviceForm.VF: REASON_NO_FREE_VF,
            DeviceForm.MDEV: REASON_NO_MDEV_ROOM,
            DeviceForm.MIG: REASON_NO_MIG_PLACEMENT,
            DeviceForm.WHOLE_DEVICE: REASON_GROUP_ALLOCATED,
        }[option.form]
        return (self.name, reason, f"{option.device.address} {option.variant}".strip())

    def reserve(
        self, cycle: Cycle, picks: Sequence[Pick], claim: Claim, option: Option
    ) -> Pick | None:
        """Take one unit of the option's pool, given the units already picked."""
        address = option.device.address
        view = cycle.view
        same_device = [p for p in picks if p.option.device.address == address]
        if any(p.option.form is not option.form for p in same_device):
            return None  # one device, one mode, within a request too
        pool = _vf_pool_of(option)
        if pool is not None and any(
            p.option.form is not option.form and _vf_pool_of(p.option) == pool for p in picks
        ):
            # VFs of a PF and mdevs on its VFs (SR-IOV vGPU) in one request:
            # VF indexes are drawn lowest first, blind to the request's own
            # mdevs, so the two never mix on one PF within a request.
            return None
        # Passthrough takes the device's whole group: nothing else in the
        # request may use any of its members, nor it a member of theirs.
        held_whole = {
            member
            for p in picks
            if p.option.form is DeviceForm.WHOLE_DEVICE and p.option.group is not None
            for member in view.group_endpoints(p.option.group)
        }
        if option.form is DeviceForm.WHOLE_DEVICE:
            members = set(view.group_endpoints(option.group)) if option.group is not None else set()
            in_use = {a for p in picks for a in _pick_devices(view, p.option)}
            if same_device or members & (in_use | held_whole):
                return None
            return Pick(claim, option)
        if held_whole and held_whole.intersection(_pick_devices(view, option)):
            return None
        if option.form is DeviceForm.VF:
            used = sum(1 for p in same_device)
            return Pick(claim, option) if used < option.free else None
        if option.form is DeviceForm.MDEV:
            return self._reserve_mdev(cycle, same_device, claim, option)
        return self._reserve_mig(cycle, same_device, claim, option)

    def _reserve_mdev(
        self, cycle: Cycle, same_device: Sequence[Pick], claim: Claim, option: Option
    ) -> Pick | None:
        parent = cycle.view.mdev_parents[option.device.address]
        used = dict(cycle.occupancy.mdev_used.get(parent.address, {}))
        pending = dict(cycle.occupancy.mdev_pending.get(parent.address, {}))
        for p in same_device:
            used[p.option.variant] = used.get(p.option.variant, 0) + 1
            pending[p.option.variant] = pending.get(p.option.variant, 0) + 1
        if mdev_free(parent, option.variant, used, pending) < 1:
            return None
        return Pick(claim, option)

    def _reserve_mig(
        self, cycle: Cycle, same_device: Sequence[Pick], claim: Claim, option: Option
    ) -> Pick | None:
        gpu = cycle.view.gpus[option.device.address]
        layout = cycle.occupancy.mig_layouts[gpu.address]
        table = gpu.mig_profiles
        by_name: dict[str, MigProfile] = {p.name: p for p in table}
        for p in same_device:
            layout = with_instance(layout, by_name[p.option.variant], p.mig_start)
        profile = by_name[option.variant]
        placement = best_placement(layout, profile, table)
        if placement is None:
            return None
        return Pick(claim, option, mig_start=placement[0], mig_size=placement[1])


def _vf_pool_of(option: Option) -> PciAddress | None:
    """The PF whose VFs an option draws on: a VF pool's, or an mdev parent's that is a VF."""
    if option.form is DeviceForm.VF:
        return option.device.address
    if option.form is DeviceForm.MDEV:
        return option.device.physfn
    return None


def _pick_devices(view: HostView, option: Option) -> tuple[PciAddress, ...]:
    """The functions a unit of an option may take: a VF pool, its PF and every existing VF."""
    if option.form is DeviceForm.VF:
        pf = view.sriov_pfs.get(option.device.address)
        if pf is not None:
            return (option.device.address, *(vf.address for vf in pf.vfs))
    return (option.device.address,)


class ExclusivityPlugin:
    """No other tenant inside a tenant's exclusive domain, in either direction."""

    name = "exclusivity"

    def filter_option(self, cycle: Cycle, claim: Claim, option: Option) -> Verdict | None:
        """Reject an option inside another tenant's domain, or sharing the request's."""
        occ = cycle.occupancy
        domain = cycle.request.exclusivity
        if not occ.exclusive and domain is ExclusivityDomain.NONE:
            return None  # nobody holds anything here, nor does the request ask
        tenant = cycle.request.tenant
        view = cycle.view
        for key in domain_keys(view, option.device):
            holder = occ.held_by_other(key, tenant)
            if holder is not None:
                # Never the holder's name: the caller is another tenant.
                return (
                    self.name,
                    REASON_HELD_EXCLUSIVELY,
                    f"{key[0].value} {key[1]} is held exclusively by another tenant",
                )
        if domain is ExclusivityDomain.NONE:
            return None
        key = (domain, domain_instance(view, option.device, domain))
        others = occ.other_tenants(key, tenant)
        if others:
            return (
                self.name,
                REASON_OTHER_TENANTS,
                f"{domain.value} {key[1]} has {len(others)} other tenant(s)",
            )
        return None


# ---------------------------------------------------------------- unit filters


def numa_domains(view: HostView, policy: NumaPolicy) -> Iterator[frozenset[int] | None]:
    """The sets of NUMA nodes an assignment may span, in order of preference.

    None means "any node". Devices with an unknown node (-1) fit only None,
    as Kubernetes' Topology Manager treats resources without NUMA affinity
    under single-numa-node: they cannot prove locality, so they are refused.
    """
    nodes = sorted(n.node_id for n in view.numa_nodes)
    if policy in (NumaPolicy.SINGLE_NUMA_NODE, NumaPolicy.PREFERRED):
        for node in nodes:
            yield frozenset({node})
        if policy is NumaPolicy.PREFERRED:
            yield None
    elif policy is NumaPolicy.SOCKET:
        sockets: dict[int, set[int]] = {}
        for node in nodes:
            sockets.setdefault(view.socket_of(node), set()).add(node)
        for socket in sorted(sockets):
            yield frozenset(sockets[socket])
    else:
        yield None


class NumaPlugin:
    """All units on the NUMA nodes of the current search pass."""

    name = "numa"

    def admit(self, search: SearchPass, picks: Sequence[Pick], pick: Pick) -> bool:
        """Whether the pick's device is on an allowed node."""
        return search.numa_nodes is None or pick.option.device.numa_node in search.numa_nodes


def within_scope(a: PciFunctionView, b: PciFunctionView, scope: AffinityScope) -> bool:
    """Whether two devices are as close as an affinity scope asks."""
    if scope is AffinityScope.SAME_NUMA_NODE:
        return a.numa_node >= 0 and a.numa_node == b.numa_node
    if scope is AffinityScope.SAME_ROOT_PORT:
        return a.root_port is not None and a.root_port == b.root_port
    return bool(set(a.switches) & set(b.switches))


class AffinityPlugin:
    """PCIe affinity between named claims."""

    name = "pcie-affinity"

    def admit(self, search: SearchPass, picks: Sequence[Pick], pick: Pick) -> bool:
        """Whether the pick is close enough to every earlier unit it relates to."""
        name = pick.claim.name
        for aff in search.affinities:
            if name not in (aff.claim_a, aff.claim_b):
                continue
            other = aff.claim_b if name == aff.claim_a else aff.claim_a
            for placed in picks:
                if placed.claim.name == other and not within_scope(
                    pick.option.device, placed.option.device, aff.scope
                ):
                    return False
        return True


class SwitchPartners:
    """Idle devices under each outermost PCIe switch, by kind: who can still pair there.

    A device sharing a switch with an idle device of another kind (an HGX
    GPU and the NIC beside it) is the only way to serve a request asking for
    the two under one switch. A claim with no affinity of its own should
    take such a device last, so a later pair request still finds its pair:
    :meth:`partners_of` is the option order's measure of that.

    Args:
        view: the host.
        occupancy: what is taken on it.
    """

    def __init__(self, view: HostView, occupancy: Occupancy) -> None:
        modes, unusable, groups = occupancy.modes, occupancy.unusable, occupancy.groups_taken
        self._idle: dict[PciAddress, Counter[DeviceKind]] = {}
        for function in view.functions.values():
            kind = function.kind
            if kind is None or function.is_vf or not function.switches:
                continue
            address = function.address
            if address in modes or address in unusable or function.iommu_group in groups:
                continue
            # The outermost switch holds every device of the inner ones: the
            # widest "same switch" any pair can meet.
            self._idle.setdefault(function.switches[0], Counter())[kind] += 1

    def partners_of(self, device: PciFunctionView) -> int:
        """Idle devices of another kind that share a switch with ``device``."""
        if not device.switches:
            return 0
        idle = self._idle.get(device.switches[0])
        if idle is None:
            return 0
        return sum(n for kind, n in idle.items() if kind is not device.kind)


def affinities_met(affinities: Sequence[Affinity], picks: Sequence[Pick]) -> int:
    """How many of the affinities every pair of units meets."""
    met = 0
    for aff in affinities:
        a = [p for p in picks if p.claim.name == aff.claim_a]
        b = [p for p in picks if p.claim.name == aff.claim_b]
        if (
            a
            and b
            and all(within_scope(x.option.device, y.option.device, aff.scope) for x in a for y in b)
        ):
            met += 1
    return met


# --------------------------------------------------------------------- scorers


def free_whole_devices(
    cycle: Cycle, picks: Sequence[Pick] = (), kinds: frozenset[DeviceKind] | None = None
) -> int:
    """Devices of the request's kinds (or of ``kinds``) entirely unused, after the picks."""
    if kinds is None:
        kinds = frozenset(c.kind for c in cycle.request.claims)
    used = {p.option.device.address for p in picks}
    modes = cycle.occupancy.modes
    return sum(
        1
        for kind in kinds
        for d in cycle.view.whole_devices(kind)
        if d.address not in modes and d.address not in used
    )


class BestFitScorer:
    """Pack: prefer hosts with fewer idle devices, so empty hosts stay empty.

    Args:
        weight: points per idle device left.
        whole_only: count only idle devices of the kinds the assignment
            takes whole (the packing profile's tie-breaker: where a unit is
            a slice, what the slice leaves decides, and counting idle GPUs
            beside it stranded more).
    """

    name = "best-fit"

    def __init__(self, weight: int = 10, *, whole_only: bool = False) -> None:
        self.weight = weight
        self.whole_only = whole_only

    def score(self, cycle: Cycle, picks: Sequence[Pick]) -> tuple[int, str]:
        """Minus the idle devices of the request's kinds left on the host."""
        kinds = None
        if self.whole_only:
            # Only the kinds handed over whole: for a slice, what it leaves
            # decides; a GPU taken whole beside a MIG slice still packs.
            kinds = frozenset(
                p.claim.kind for p in picks if p.option.form is DeviceForm.WHOLE_DEVICE
            )
            if not kinds and picks:
                return 0, "slices only: left to packing"
        idle = free_whole_devices(cycle, picks, kinds)
        return -self.weight * idle, f"{idle} idle devices of the request's kinds left"


class SharingScorer:
    """Slice devices already sliced; hand out whole devices only when needed."""

    name = "sharing"

    def score(self, cycle: Cycle, picks: Sequence[Pick]) -> tuple[int, str]:
        """Reward units on devices already in their mode; charge idle devices opened."""
        modes = cycle.occupancy.modes
        joined = 0
        opened: set[str] = set()
        whole_for_sliceable = 0
        for p in picks:
            address = p.option.device.address
            if p.option.form is DeviceForm.WHOLE_DEVICE:
                if p.claim.accepted_forms() - {DeviceForm.WHOLE_DEVICE}:
                    whole_for_sliceable += 1
            elif address in modes:
                joined += 1
            else:
                opened.add(address)
        score = 20 * joined - 30 * len(opened) - 200 * whole_for_sliceable
        return score, (
            f"{joined} units on already-sliced devices, {len(opened)} devices newly sliced, "
            f"{whole_for_sliceable} whole devices for sliceable claims"
        )


class LocalityScorer:
    """Preferred affinities met, one NUMA node, and short PCIe paths."""

    name = "locality"

    def score(self, cycle: Cycle, picks: Sequence[Pick]) -> tuple[int, str]:
        """Reward preferred affinities met, NUMA-local assignments and short PCIe paths."""
        preferred = [a for a in cycle.request.affinities if not a.required]
        met = affinities_met(preferred, picks)
        nodes = {p.option.device.numa_node for p in picks}
        one_node = len(nodes) == 1 and -1 not in nodes
        # Units of different claims (a GPU and its NIC) talk to each other:
        # the closer on PCIe (nvidia-smi's PIX/PXB over PHB/NODE/SYS), the more
        # of their traffic stays off the root complex and the interconnect.
        closeness = 0
        distance = cycle.distance
        if distance is not None:
            for i, a in enumerate(picks):
                for b in picks[i + 1 :]:
                    if a.claim.name != b.claim.name:
                        closeness += _FARTHEST - distance(
                            a.option.device.address, b.option.device.address
                        )
        score = 50 * met + (40 if one_node else 0) + 5 * min(closeness, 40)
        return score, (
            f"{met}/{len(preferred)} preferred affinities met, NUMA nodes {sorted(nodes)}, "
            f"PCIe closeness {closeness} between claims"
        )


#: The largest PCIe distance (SYS: across NUMA nodes).
_FARTHEST = 5


class MigFragmentationScorer:
    """Keep large MIG profiles placeable: charge the fragmentation a plan leaves."""

    name = "mig-fragmentation"

    def score(self, cycle: Cycle, picks: Sequence[Pick]) -> tuple[int, str]:
        """Minus 100 per unit of fragmentation score added on the GPUs touched."""
        by_gpu: dict[PciAddress, list[Pick]] = {}
        for p in picks:
            if p.option.form is DeviceForm.MIG:
                by_gpu.setdefault(p.option.device.address, []).append(p)
        added = 0.0
        for address, gpu_picks in by_gpu.items():
            gpu = cycle.view.gpus[address]
            before = cycle.occupancy.mig_layouts[address]
            after = _layout_after(before, gpu, gpu_picks)
            added += fragmentation_score(after, gpu.mig_profiles) - fragmentation_score(
                before, gpu.mig_profiles
            )
        return -round(100 * added), f"MIG fragmentation {added:+.2f} on {len(by_gpu)} GPUs"


def gpu_picks(picks: Sequence[Pick]) -> list[tuple[DeviceForm, PciAddress, str, int]]:
    """The GPU units of an assignment as :func:`occupancy_after` takes them."""
    return [
        (p.option.form, p.option.device.address, p.option.variant, p.mig_start)
        for p in picks
        if p.claim.kind is DeviceKind.GPU
    ]


class FragmentationScorer:
    """Place where free GPU capacity fragments least under the task mix (FGD, ATC'23).

    The charge is the growth of the host's fragmentation ``F_n(M)`` (see
    :mod:`scheduler.core.fragmentation`) the assignment causes, in GPUs,
    plus the GPU capacity it consumes: a half-GPU task taking a 4-slice MIG
    instance (4/7 of a GPU) pays more than one taking a half-GPU vGPU. The
    mix is the learner's published one; :attr:`epoch` moves with it, so an
    engine drops judgements scored under an older mix.

    Args:
        learner: where the mix comes from (the engine's observers feed it).
        weight: points per GPU of fragmentation added.
        consumed_weight: points per GPU of capacity consumed.
    """

    name = "fragmentation"

    def __init__(
        self, learner: TaskMixLearner, *, weight: int = 1000, consumed_weight: int = 200
    ) -> None:
        self.learner = learner
        self.weight = weight
        self.consumed_weight = consumed_weight
        # id(occupancy) -> (occupancy, epoch, its fragmentation): a host's
        # state is judged for many shapes, its "before" is the same.
        self._before: dict[int, tuple[Occupancy, int, HostFragmentation]] = {}

    @property
    def epoch(self) -> int:
        """Changes whenever the mix the scores are made under does."""
        return self.learner.epoch

    def score(self, cycle: Cycle, picks: Sequence[Pick]) -> tuple[int, str]:
        """Minus the fragmentation added and the capacity consumed, weighted."""
        mix = self.learner.mix
        taken = gpu_picks(picks)
        if not mix or not taken:
            return 0, "no GPU taken" if mix else "no GPU task mix learnt yet"
        view, occupancy = cycle.view, cycle.occupancy
        epoch = self.learner.epoch
        found = self._before.get(id(occupancy))
        if found is None or found[0] is not occupancy or found[1] != epoch:
            if len(self._before) >= 65_536:  # bounded: old states are dead weight
                self._before.clear()
            found = (occupancy, epoch, host_fragmentation(view, occupancy, mix))
            self._before[id(occupancy)] = found
        before = found[2]
        request = cycle.request
        share = (request.cpu_milli, request.memory_mib)
        after = host_fragmentation(view, occupancy_after(view, occupancy, taken, share), mix)
        grown = after.fragmented - before.fragmented
        consumed = before.free - after.free
        value = -round(self.weight * grown + self.consumed_weight * consumed)
        return value, (
            f"fragmentation {grown:+.3f} GPUs under the task mix, {consumed:.3f} GPUs consumed"
        )


def _layout_after(layout: MigLayout, gpu: GpuView, picks: Sequence[Pick]) -> MigLayout:
    by_name: dict[str, MigProfile] = {p.name: p for p in gpu.mig_profiles}
    for p in picks:
        layout = with_instance(layout, by_name[p.option.variant], p.mig_start)
    return layout


class PackingScorer:
    """Tessera's packing: place where the least free GPU capacity is stranded under the task mix.

    The charges are those of :mod:`scheduler.core.stranding`, in GPUs, each
    with its weight (points per GPU): the growth of the host's stranded
    share, the unfillable part of the hole a shared unit leaves on its GPU
    (less, as a credit, the part of a rare hole it closes), the growth of
    what the host has lost to multi-GPU shapes, the geometry a whole device
    spends, the growth of the free share the host's CPU and memory left
    fall short of (a credit where it shrinks), and the GPU capacity
    consumed (a half-GPU task on a half-GPU vGPU pays less than on a
    4-slice MIG instance).

    Where FGD (:class:`FragmentationScorer`) scores every feasible host by
    the next task's expected loss, this scorer asks what stays free for good.
    Like FGD it needs every feasible host scored (an engine with
    ``feasible_hosts=0``): a hole is worth filling only where one is.

    The mix is the learner's; the least share each shape takes anywhere is
    learnt from the GPUs scored. :attr:`epoch` moves with either, so an
    engine drops judgements made under what the scorer knew before.

    Args:
        learner: where the mix comes from (the engine's observers feed it).
        stranded_weight: points per GPU of stranded share added.
        hole_weight: points per GPU of unfillable hole left, and credited
            per GPU of rare hole closed (bench (h), multigpu50, unallocated
            at 100% arrived, mean of 3 seeds: 0.92% without the credit,
            0.67% with it).
        gangs_weight: points per GPU lost to multi-GPU shapes.
        geometry_weight: points per unit of the mix's best geometry spent
            by a whole device.
        short_weight: points per GPU of free share the host's CPU or memory
            falls short of, at the mix's CPU and memory per GPU (bench (h),
            unallocated at 100% arrived, mean of 3 seeds on the default,
            gpushare100 and multigpu50 lists: 0.80, 1.30 and 1.34% without
            it; 0.26, 0.43 and 0.92% at 500; 0.20, 0.46 and 1.01% at 1000).
        consumed_weight: points per GPU of capacity consumed (1000: on the
            trace's gpushare100 list, 500 left 2.07% unallocated at 100%
            arrived, 1000 left 1.30% and 2000 1.61%).
        floor: the share of the mix below which a GPU's users count as none.
        rare: the share of the mix below which a hole's users are few
            (:func:`rare_hole_closed`; at 0.5 the gpushare100 list left
            1.04% unallocated, at 0.25 0.47%).
    """

    name = "packing"

    def __init__(
        self,
        learner: TaskMixLearner,
        *,
        stranded_weight: int = 1000,
        hole_weight: int = 2000,
        gangs_weight: int = 1000,
        geometry_weight: int = 3000,
        short_weight: int = 500,
        consumed_weight: int = 1000,
        floor: float = 0.03,
        rare: float = 0.25,
    ) -> None:
        if not 0 <= floor <= 1:
            raise ValueError(f"floor must be in [0, 1], not {floor}")
        if not 0 <= rare <= 1:
            raise ValueError(f"rare must be in [0, 1], not {rare}")
        self.learner = learner
        self.stranded_weight = stranded_weight
        self.hole_weight = hole_weight
        self.gangs_weight = gangs_weight
        self.geometry_weight = geometry_weight
        self.short_weight = short_weight
        self.consumed_weight = consumed_weight
        self.floor = floor
        self.rare = rare
        self._least: dict[TaskShape, float] = {}
        self._least_seen = 0
        self._geometry: tuple[int, dict[TaskShape, float]] = (-1, {})
        # (epoch, the mix's CPU and memory per GPU) (see _per_gpu).
        self._rates: tuple[int, tuple[float, float]] = (-1, (0.0, 0.0))
        # id(occupancy) -> (occupancy, epoch, (stranded, gangs lost, short, free),
        # free shares): a host state is judged for many shapes; its "before"
        # is the same.
        self._before: dict[
            int,
            tuple[Occupancy, int, tuple[float, float, float, float], Mapping[PciAddress, float]],
        ] = {}
        # (id(view), GPU, epoch) -> (view, its geometry value).
        self._values: dict[tuple[int, PciAddress, int], tuple[HostView, float]] = {}
        # The last request scored and its geometry (see _geometry_of).
        self._request: PlacementRequest | None = None
        self._me: TaskShape | None = None

    @property
    def epoch(self) -> int:
        """Changes whenever the mix, or a least share learnt, does."""
        return self.learner.epoch * 4096 + self._least_seen

    def score(self, cycle: Cycle, picks: Sequence[Pick]) -> tuple[int, str]:
        """Minus the weighted charges of :mod:`scheduler.core.stranding`."""
        mix = self.learner.mix
        taken = gpu_picks(picks)
        if not mix or not taken:
            return 0, "no GPU taken" if mix else "no GPU task mix learnt yet"
        view, occupancy, request = cycle.view, cycle.occupancy, cycle.request
        epoch = self.epoch
        if self._geometry[0] != self.learner.epoch:
            self._geometry = (self.learner.epoch, geometry_mix(mix))
            # Least shares are learnt afresh under each mix: the table holds
            # only shapes of the (bounded) mix whatever clients send, and
            # forgets hardware that has left the fleet since.
            self._least = {}
        geometry = self._geometry[1]
        # Every GPU taken teaches the least shares first (what the mix asks
        # per GPU depends on them), so that before and after are measured
        # under one epoch.
        spent = 0.0
        for p in picks:
            if p.claim.kind is DeviceKind.GPU:
                value = self._geometry_value(view, p.option.device.address, geometry)
                if p.option.form is DeviceForm.WHOLE_DEVICE:
                    spent += value
        epoch = self.epoch
        found = self._before.get(id(occupancy))
        if found is None or found[0] is not occupancy or found[1] != epoch:
            if len(self._before) >= 65_536:  # bounded: old states are dead weight
                self._before.clear()
            free = free_shares(view, occupancy)
            found = (occupancy, epoch, self._measure(view, occupancy, mix, free), free)
            self._before[id(occupancy)] = found
        stranded0, gangs0, short0, free0 = found[2]
        free_before = found[3]
        after = occupancy_after(view, occupancy, taken, (request.cpu_milli, request.memory_mib))
        free_after = free_shares(view, after)
        stranded1, gangs1, short1, free1 = self._measure(view, after, mix, free_after)
        me = self._geometry_of(request)
        hole = closed = 0.0
        for p in picks:
            if p.claim.kind is not DeviceKind.GPU or p.option.form is DeviceForm.WHOLE_DEVICE:
                continue
            address = p.option.device.address
            if me is not None and me.shared:
                hole += unfillable_hole(view, after, address, me, geometry, free_after=free_after)
            closed += rare_hole_closed(
                view, occupancy, address, geometry, self.rare,
                free_before=free_before, free_after=free_after,
            )  # fmt: skip
        stranded, gangs, short = stranded1 - stranded0, gangs1 - gangs0, short1 - short0
        consumed = free0 - free1
        value = -round(
            self.stranded_weight * stranded
            + self.hole_weight * (hole - closed)
            + self.gangs_weight * gangs
            + self.geometry_weight * spent
            + self.short_weight * short
            + self.consumed_weight * consumed
        )
        return value, (
            f"stranded {stranded:+.3f}, unfillable hole {hole:.3f}, rare hole closed "
            f"{closed:.3f}, gangs lost {gangs:+.3f}, "
            f"short of CPU or memory {short:+.3f} GPUs; geometry spent {spent:.3f}; "
            f"{consumed:.3f} GPUs consumed"
        )

    def _measure(
        self,
        view: HostView,
        occupancy: Occupancy,
        mix: TaskMix,
        free: Mapping[PciAddress, float],
    ) -> tuple[float, float, float, float]:
        """(stranded share, gangs lost, short of CPU or memory, free share) of a host state.

        ``free`` is :func:`free_shares` of the state, read once by the caller.
        """
        total = sum(free.values())
        return (
            stranded_share(view, occupancy, mix, self.floor, free=free),
            gangs_lost(view, occupancy, mix, free=free),
            cpu_memory_shortfall(view, occupancy, total, self._per_gpu(mix)),
            total,
        )

    def _per_gpu(self, mix: TaskMix) -> tuple[float, float]:
        """The mix's CPU and memory per GPU taken (:func:`demand_per_gpu`), once an epoch."""
        epoch = self.epoch
        if self._rates[0] != epoch:
            self._rates = (epoch, demand_per_gpu(mix, self._least))
        return self._rates[1]

    def _geometry_of(self, request: PlacementRequest) -> TaskShape | None:
        """The request's geometry (its shape without CPU and memory), worked out once a request.

        Every host judged for a request asks; the last request's is kept.
        """
        if self._request is not request:
            shape = task_shape(request)
            self._request = request
            self._me = geometry_of(shape) if shape is not None else None
        return self._me

    def _geometry_value(
        self, view: HostView, address: PciAddress, geometry: Mapping[TaskShape, float]
    ) -> float:
        key = (id(view), address, self.learner.epoch)
        found = self._values.get(key)
        if found is not None and found[0] is view:
            return found[1]
        before = dict(self._least)
        # Worked out with this GPU's shares already in the table.
        value = geometry_value(view, address, geometry, self._least)
        if self._least != before:
            # A smaller least share seen: values worked out before are stale.
            self._least_seen = (self._least_seen + 1) % 4096
            self._values.clear()
        if len(self._values) >= 65_536:  # bounded: old views are dead weight
            self._values.clear()
        self._values[key] = (view, value)
        return value
