"""Every HostInventory checked before the scheduler stores or reads it.

An agent's report is untrusted input like any client request: one hostile (or
broken) Register used to take the scheduler down (a PF claiming 2**32-1 VFs
made the engine list four billion indexes; a MIG profile of zero slices made
every MIG answer a ZeroDivisionError), and inconsistent reports (a function
whose IOMMU group is not listed) made ``tessera plan`` hand a device out
without its group mates.

Where the check sits: here, in the service layer, on the wire message, before
conversion. Only the message carries every field (notes, mdev descriptions,
UUIDs, link speeds, boot id); the domain view drops many of them, so a check
of the view could not bound them. Checking first also keeps conversion
(:func:`scheduler.service.convert.host_view_from_inventory`) safe: it only
ever sees bounded, consistent input. The scheduling core cannot import the
generated ``tessera`` package (import-linter contract), and it does not need
to: it guards its own arithmetic on inventory numbers (free VF indexes are
counted, never listed; a profile of zero slices has no headroom; placements
outside the GPU are ignored), so an inventory stored before this check
existed cannot bring it down either.

One validator for every entry point: ``Registry.Register`` and
``Registry.Heartbeat`` (through :class:`PlacementCoordinator`) and the
inventory files of ``tessera plan``. Every problem is reported by its field
path in wire terms (``inventory.sriov_pfs[2].total_vfs: must be at most
65535``), so an agent's operator sees exactly what to fix; echoed values are
cut (:func:`scheduler.core.validation.shown`), and past
:data:`scheduler.core.validation.MAX_REPORTED` problems the rest are only
counted. A list over its bound is reported once and its entries past the
bound are not examined, so checking costs no more than the bound allows
whatever a client sends.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Mapping, Sized
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import islice

from tessera.scheduler.core.mig_geometry import (
    COMPUTE_SLICES,
    DEFAULT_INSTANCE_LIMITS,
    MEMORY_SLICES,
)
from tessera.scheduler.core.validation import (
    MAX_IDENT,
    MAX_REPORTED,
    MAX_TEXT,
    FieldViolation,
    InvalidRequestError,
    shown,
    validate_identifier,
)
from tessera.scheduler.service.convert import cpu_ranges, stated_max_instances
from tessera.v1 import inventory_pb2

# -- limits, each with where it comes from -----------------------------------

#: PCI vendor, device and subsystem ids are 16-bit configuration registers.
MAX_PCI_ID = 0xFFFF
#: The class code register is 24 bits (base class, subclass, programming interface).
MAX_CLASS_CODE = 0xFFFFFF
#: Linux's MAX_NUMNODES is ``1 << CONFIG_NODES_SHIFT`` and NODES_SHIFT is at
#: most 10 (x86-64 with MAXSMP): node ids are below 1,024, and so is their count.
MAX_NUMA_NODES = 1024
#: CONFIG_NR_CPUS is at most 8,192 (x86-64 MAXSMP): CPU ids in a cpulist are below it.
MAX_CPUS = 8192
#: A sysfs attribute is at most one page (PAGE_SIZE, 4 KiB on x86-64), so
#: cpulists and mdev descriptions the agent reads from sysfs never exceed it.
MAX_SYSFS_TEXT = 4096
#: SLIT distances are one byte (ACPI 6.5 section 5.2.17): 10 local, 255 unreachable.
MAX_NUMA_DISTANCE = 255
#: x86-64 physical addresses are at most 52 bits (4 PiB): no node has more memory.
MAX_NODE_MEMORY_KIB = 1 << 42
#: PCI functions in one report. A PCI segment addresses 65,536 functions but a
#: host reports what is present: 262 on the largest fixture (``sriov-large``
#: with every VF on); 16,384 is 64 PFs each with 255 VFs, and such a report
#: still fits gRPC's 4 MiB message limit.
MAX_PCI_FUNCTIONS = 16_384
#: IOMMU group numbers come from the kernel's ida: allocated densely from 0
#: and reused, one group per function at most, so they stay below the
#: functions a host ever had. Generously above :data:`MAX_PCI_FUNCTIONS`.
MAX_IOMMU_GROUP = (1 << 20) - 1
#: Bridges above a function. Each bridge level takes a bus number, but real
#: chains are a root port and at most three nested switches (7 bridges).
MAX_BRIDGE_DEPTH = 32
#: PCIe links are x1 to x32.
MAX_LINK_WIDTH = 32
#: ``reset_method`` lists Linux's methods: PCI_NUM_RESET_METHODS is 8.
MAX_RESET_METHODS = 8
#: TotalVFs, First VF Offset and VF Stride are 16-bit fields of the SR-IOV
#: extended capability (PCIe Base 6.0 section 9.3.3).
MAX_SRIOV_FIELD = 0xFFFF
#: Bus numbers are 8 bits: every VF's routing ID (the PF's plus First VF
#: Offset plus VF Stride times the index) must land on a bus at most 255;
#: Linux refuses to enable SR-IOV otherwise (sriov_init: "not enough bus
#: numbers").
MAX_BUS = 0xFF
#: Devices offering mdev types on one host: each is a PCI function (a GPU);
#: the largest fixture has 3.
MAX_MDEV_PARENTS = 256
#: Types one mdev parent offers: NVIDIA lists a few dozen per GPU (Q, B, A
#: and C series at each framebuffer size).
MAX_MDEV_TYPES = 256
#: Instances of one parent (and ``available_instances``, ``max_instance=``):
#: the vGPU types in shared/reference/mdev_types.json allow 24 at most;
#: generous for other vendors.
MAX_MDEV_INSTANCES = 1024
#: GPUs NVML lists on one host (8 on DGX/HGX boards, 16 on the largest).
MAX_GPUS = 256
#: NVML_GPU_INSTANCE_PROFILE_COUNT (nvml.h): the profile indexes there are,
#: so a GPU lists at most that many GPU-instance profiles.
MAX_MIG_PROFILES = 18
#: Profile ids in mig_profiles.json are 0..20; room for newer GPUs' profiles.
MAX_MIG_PROFILE_ID = 255
#: GPU-instance and compute-instance ids the driver assigns: 1..14 observed
#: (mig_profiles.json, gi_id_assignment_observations).
MAX_MIG_INSTANCE_ID = 255
#: Framebuffer of one GPU: 141 GiB on H200, 288 GiB announced; 1 TiB bounds it.
MAX_GPU_MEMORY_MIB = 1 << 20
#: Streaming multiprocessors of one GPU (132 on H100 SXM, 148 on B200 per die).
MAX_MULTIPROCESSORS = 1024
#: NVML_NVLINK_MAX_LINKS (nvml.h): links of one GPU, so links to one peer.
MAX_NVLINKS = 18
#: NVML_DEVICE_NAME_V2_BUFFER_SIZE and NVML_DEVICE_UUID_V2_BUFFER_SIZE (nvml.h).
MAX_NVML_STRING = 96
#: Linux MODULE_NAME_LEN is 56; a driver's name is its module's or shorter.
MAX_DRIVER_NAME = 64
#: Short free text: mdev type names, link speeds, MIG profile names, device APIs.
MAX_NAME = 128
#: Operator labels on one host (``--label``); keys follow host selectors'
#: identifier rule, values are free text of :data:`MAX_TEXT` characters.
MAX_LABELS = 64
#: Notes on subsystems the agent could not read: a few per GPU at most.
MAX_NOTES = 256
#: One note: a subsystem name and an error message.
MAX_NOTE = 1024

# -- shapes --------------------------------------------------------------------

#: ``DDDD:BB:DD.F`` in lower case, as sysfs names functions. Domains behind an
#: Intel VMD controller are 0x10000 and up, printed with five digits.
_PCI_ADDRESS = re.compile(r"[0-9a-f]{4,8}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]")
#: ``pci0000:4a``: a root bus as its sysfs directory names it.
_ROOT_BUS = re.compile(r"pci[0-9a-f]{4,8}:[0-9a-f]{2}")
#: A kernel driver name: ``mlx5_core``, ``vfio-pci``, ``4xxx``, ``snd_hda_intel``.
_DRIVER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]*")
#: A VFIO variant driver, the only kind that migrates: ``mlx5_vfio_pci``
#: (module names end in ``_vfio_pci``; a few older kernels registered dashes,
#: ``hisi-acc-vfio-pci``). Plain ``vfio-pci`` cannot migrate, and the
#: scheduler hands the name to the agent as the driver to bind, which refuses
#: anything but a VFIO driver: any other name is a malformed report.
_MIGRATION_DRIVER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*[_-]vfio[_-]pci")
#: A cpulist as bitmap_print_to_pagebuf writes it: ``0-31,64-95``.
_CPULIST = re.compile(r"\d{1,5}(?:-\d{1,5})?(?:,\d{1,5}(?:-\d{1,5})?)*")
#: A reset method: ``flr``, ``af_flr``, ``pm``, ``bus``, ``cxl_bus``, ``device_specific``.
_RESET_METHOD = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: An RFC 4122 UUID (mdevs are named by one).
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
#: NVML UUIDs: ``GPU-<uuid>``, ``MIG-<uuid>`` and the older ``MIG-GPU-<uuid>/<gi>/<ci>``.
_NVML_UUID = re.compile(r"(?:GPU|MIG)-[A-Za-z0-9/-]{1,90}")
#: An mdev type id: parent driver, dash, vendor type name (``nvidia-63``, ``i915-GVTg_V5_4``).
_MDEV_TYPE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]*")
#: ``vfio-pci``, ``vfio-ccw``, ``vfio-ap``.
_DEVICE_API = re.compile(r"[a-z0-9][a-z0-9_-]*")
#: ``1g.10gb``, ``1g.10gb+me``, ``7g.80gb``.
_MIG_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]*")
#: ``/dev/vfio/N`` or, for a VFIO no-IOMMU group, ``/dev/vfio/noiommu-N``.
_VFIO_PATH = re.compile(r"/dev/vfio/(?:noiommu-)?(\d{1,7})")

#: Roles the functions a bridge chain names may have.
_BRIDGE_ROLES = frozenset(
    {
        inventory_pb2.PCI_ROLE_ROOT_PORT,
        inventory_pb2.PCI_ROLE_SWITCH_UPSTREAM,
        inventory_pb2.PCI_ROLE_SWITCH_DOWNSTREAM,
        inventory_pb2.PCI_ROLE_PCI_BRIDGE,
    }
)
_ROLES = frozenset(inventory_pb2.PciRole.values())
_GROUP_TYPES = frozenset(inventory_pb2.IommuGroupType.values())
_MIG_MODES = frozenset(inventory_pb2.MigMode.values())


def inventory_violations(
    inventory: inventory_pb2.HostInventory, prefix: str = "inventory"
) -> tuple[list[FieldViolation], int]:
    """The problems of an inventory: the first ones, and how many more there are.

    Args:
        inventory: the report, as received.
        prefix: the path of the message itself (``inventory`` in Register).

    Returns:
        Up to :data:`MAX_REPORTED` violations in field order, and the number
        of further problems found (only counted). Empty and 0 when the
        inventory is valid.
    """
    check = _Check(prefix)
    check.run(inventory)
    return check.found.kept, check.found.more


def check_inventory(inventory: inventory_pb2.HostInventory, prefix: str = "inventory") -> None:
    """Refuse an inventory that is malformed, out of bounds or inconsistent.

    Raises:
        InvalidRequestError: naming each problem by its field path (gRPC
            INVALID_ARGUMENT), the first :data:`MAX_REPORTED` of them.
    """
    kept, more = inventory_violations(inventory, prefix)
    if kept:
        raise InvalidRequestError(kept, more)


@dataclass
class _Found:
    """Violations kept for the message, and the count of the rest."""

    kept: list[FieldViolation] = field(default_factory=list)
    more: int = 0

    def add(self, path: str, message: str) -> None:
        if len(self.kept) < MAX_REPORTED:
            self.kept.append(FieldViolation(path, message))
        else:
            self.more += 1


def _parse_address(address: str) -> tuple[str, int, int] | None:
    """``(domain, bus, devfn)`` of a well-formed PCI address, else None."""
    if not _PCI_ADDRESS.fullmatch(address):
        return None
    domain, bus, slot = address.split(":")
    dev, fn = slot.split(".")
    return domain, int(bus, 16), int(dev, 16) << 3 | int(fn)


def _vf_address(pf: str, offset: int, stride: int, index: int) -> str | None:
    """The address of VF ``index`` of PF ``pf`` by the SR-IOV routing-ID rule, if on a bus."""
    parsed = _parse_address(pf)
    if parsed is None:
        return None
    domain, bus, devfn = parsed
    rid = devfn + offset + stride * index
    vf_bus = bus + (rid >> 8)
    if vf_bus > MAX_BUS:
        return None
    vf_devfn = rid & 0xFF
    return f"{domain}:{vf_bus:02x}:{vf_devfn >> 3:02x}.{vf_devfn & 7}"


def _cpulist_problem(value: str) -> str | None:
    """Why ``value`` is not a cpulist of CPUs below :data:`MAX_CPUS`, or None."""
    if len(value) > MAX_SYSFS_TEXT:
        return f"must be at most {MAX_SYSFS_TEXT} characters, not {len(value):,}"
    if not _CPULIST.fullmatch(value):
        return f"{shown(value)} is not a cpulist such as 0-31,64-95"
    for part in value.split(","):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if last < first:
            return f"range {part} runs backwards"
        if last >= MAX_CPUS:
            return f"CPU {last} is not below {MAX_CPUS}"
    return None


@dataclass
class _Functions:
    """The inventory's PCI functions by address, as the consistency checks read them."""

    by_address: dict[str, inventory_pb2.PciFunction] = field(default_factory=dict)
    path_of: dict[str, str] = field(default_factory=dict)


class _Check:
    """One pass over one inventory; problems go to :attr:`found`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.found = _Found()
        self.fns = _Functions()
        self.numa_ids: set[int] = set()
        # Per CPU id, whether a node listed it so far, and which.
        self.cpu_taken = bytearray(MAX_CPUS)
        self.cpu_node: list[int] = [-1] * MAX_CPUS
        self.pfs: dict[str, inventory_pb2.SriovPf] = {}
        # Addresses of the VFs each PF lists.
        self.pf_vfs: dict[str, set[str]] = {}

    def add(self, path: str, message: str) -> None:
        self.found.add(path, message)

    # -- generic field checks ------------------------------------------------

    def bounded(self, items: Sized, limit: int, path: str) -> int:
        """How many entries of a list to examine: all of them, or none past ``limit``."""
        if len(items) > limit:
            self.add(path, f"at most {limit} entries, not {len(items):,}")
            return limit
        return len(items)

    def at_most(self, value: int, limit: int, path: str, what: str = "") -> bool:
        if value > limit:
            self.add(path, f"must be at most {limit}{what}, not {value}")
            return False
        return True

    def address(self, value: str, path: str) -> bool:
        """A PCI address in sysfs form; True when well formed."""
        if not value:
            self.add(path, "must be a PCI address such as 0000:4b:00.0")
            return False
        if len(value) > 16 or not _PCI_ADDRESS.fullmatch(value):
            self.add(path, f"{shown(value)} is not a PCI address such as 0000:4b:00.0")
            return False
        return True

    def pattern(self, value: str, regex: re.Pattern[str], limit: int, path: str, what: str) -> None:
        """An optional token (empty allowed) of a known shape."""
        if not value:
            return
        if len(value) > limit:
            self.add(path, f"must be at most {limit} characters, not {len(value):,}")
        elif not regex.fullmatch(value):
            self.add(path, f"{shown(value)} is not {what}")

    def text(self, value: str, limit: int, path: str) -> None:
        """Free text (empty allowed): bounded, no control characters."""
        if len(value) > limit:
            self.add(path, f"must be at most {limit:,} characters, not {len(value):,}")
        elif not value.isprintable():
            self.add(path, f"{shown(value)} holds control or unprintable characters")

    def enum(self, value: int, known: Collection[int], path: str, name: str) -> None:
        if value not in known:
            self.add(path, f"{value} is not a known {name} value")

    def known_function(self, address: str, path: str) -> bool:
        """A well-formed address must be one of ``pci_functions``."""
        if address in self.fns.by_address:
            return True
        self.add(path, f"{shown(address)} is not among the reported pci_functions")
        return False

    # -- the pass --------------------------------------------------------------

    def run(self, inv: inventory_pb2.HostInventory) -> None:
        p = self.prefix
        for v in validate_identifier(inv.host_id, f"{p}.host_id"):
            self.add(v.field, v.message)
        for v in validate_identifier(inv.boot_id, f"{p}.boot_id"):
            self.add(v.field, v.message)
        self.numa(inv)
        self.functions(inv)
        self.groups(inv)
        self.bridge_chains(inv)
        self.sriov(inv)
        self.vf_functions(inv)
        self.mdev(inv)
        self.gpus(inv)
        self.labels_and_notes(inv)

    def numa(self, inv: inventory_pb2.HostInventory) -> None:
        n = self.bounded(inv.numa_nodes, MAX_NUMA_NODES, f"{self.prefix}.numa_nodes")
        listed = len(inv.numa_nodes)
        for i, node in enumerate(inv.numa_nodes[:n]):
            path = f"{self.prefix}.numa_nodes[{i}]"
            if not 0 <= node.id < MAX_NUMA_NODES:
                self.add(f"{path}.id", f"must be a node id 0..{MAX_NUMA_NODES - 1}, not {node.id}")
            elif node.id in self.numa_ids:
                self.add(f"{path}.id", f"node {node.id} is listed twice")
            self.numa_ids.add(node.id)
            if node.cpulist and (why := _cpulist_problem(node.cpulist)):
                self.add(f"{path}.cpulist", why)
            elif node.cpulist and (other := self.cpus_of(node.id, node.cpulist)) is not None:
                # The kernel puts each CPU in one node: counted twice, the
                # host would offer CPUs it does not have.
                self.add(f"{path}.cpulist", f"CPU {other[0]} is also in node {other[1]}")
            self.at_most(node.memory_kib, MAX_NODE_MEMORY_KIB, f"{path}.memory_kib", " KiB")
            # nodeN/distance has one entry per online node, the nodes listed.
            if node.distances and len(node.distances) != listed:
                self.add(
                    f"{path}.distances",
                    f"has {len(node.distances):,} entries for {listed:,} NUMA nodes",
                )
            elif any(not 0 <= d <= MAX_NUMA_DISTANCE for d in node.distances):
                self.add(f"{path}.distances", f"SLIT distances are 0..{MAX_NUMA_DISTANCE}")

    def cpus_of(self, node_id: int, cpulist: str) -> tuple[int, int] | None:
        """Record a checked cpulist as ``node_id``'s: a CPU an earlier node has, and that node.

        By merged ranges and slices, never CPU by CPU: a cpulist may name
        every CPU hundreds of times.
        """
        merged = cpu_ranges(cpulist)
        for first, last in merged:
            if (cpu := self.cpu_taken.find(1, first, last + 1)) != -1:
                return cpu, self.cpu_node[cpu]
        for first, last in merged:
            self.cpu_taken[first : last + 1] = b"\x01" * (last - first + 1)
            self.cpu_node[first : last + 1] = [node_id] * (last - first + 1)
        return None

    def functions(self, inv: inventory_pb2.HostInventory) -> None:
        n = self.bounded(inv.pci_functions, MAX_PCI_FUNCTIONS, f"{self.prefix}.pci_functions")
        for i, f in enumerate(inv.pci_functions[:n]):
            path = f"{self.prefix}.pci_functions[{i}]"
            if self.address(f.address, f"{path}.address"):
                if f.address in self.fns.by_address:
                    self.add(
                        f"{path}.address",
                        f"{f.address} is also {self.fns.path_of[f.address]}",
                    )
                else:
                    self.fns.by_address[f.address] = f
                    self.fns.path_of[f.address] = path
            for name, value in (
                ("vendor_id", f.vendor_id),
                ("device_id", f.device_id),
                ("subsystem_vendor_id", f.subsystem_vendor_id),
                ("subsystem_device_id", f.subsystem_device_id),
            ):
                self.at_most(value, MAX_PCI_ID, f"{path}.{name}", " (16 bits)")
            self.at_most(f.class_code, MAX_CLASS_CODE, f"{path}.class_code", " (24 bits)")
            for attr, driver in (("driver", f.driver), ("driver_override", f.driver_override)):
                self.pattern(driver, _DRIVER, MAX_DRIVER_NAME, f"{path}.{attr}", "a driver name")
            self.pattern(
                f.migratability.migration_driver,
                _MIGRATION_DRIVER,
                MAX_DRIVER_NAME,
                f"{path}.migratability.migration_driver",
                "a VFIO variant driver name such as mlx5_vfio_pci",
            )
            if f.numa_node != -1 and not 0 <= f.numa_node < MAX_NUMA_NODES:
                self.add(
                    f"{path}.numa_node",
                    f"must be -1 (no affinity) or a node id 0..{MAX_NUMA_NODES - 1}, "
                    f"not {f.numa_node}",
                )
            elif f.numa_node != -1 and self.numa_ids and f.numa_node not in self.numa_ids:
                self.add(f"{path}.numa_node", f"node {f.numa_node} is not among numa_nodes")
            if f.local_cpulist and (why := _cpulist_problem(f.local_cpulist)):
                self.add(f"{path}.local_cpulist", why)
            if f.has_iommu_group:
                self.at_most(f.iommu_group, MAX_IOMMU_GROUP, f"{path}.iommu_group")
            if f.root_bus and not (len(f.root_bus) <= 16 and _ROOT_BUS.fullmatch(f.root_bus)):
                self.add(f"{path}.root_bus", f"{shown(f.root_bus)} is not a root bus pci0000:4a")
            self.enum(f.role, _ROLES, f"{path}.role", "PciRole")
            link = f.link
            self.text(link.current_speed, MAX_NAME, f"{path}.link.current_speed")
            self.text(link.max_speed, MAX_NAME, f"{path}.link.max_speed")
            self.at_most(link.current_width, MAX_LINK_WIDTH, f"{path}.link.current_width")
            self.at_most(link.max_width, MAX_LINK_WIDTH, f"{path}.link.max_width")
            m = self.bounded(f.reset_methods, MAX_RESET_METHODS, f"{path}.reset_methods")
            seen: set[str] = set()
            for j, method in enumerate(f.reset_methods[:m]):
                if not _RESET_METHOD.fullmatch(method):
                    self.add(f"{path}.reset_methods[{j}]", f"{shown(method)} is not a method")
                elif method in seen:
                    self.add(f"{path}.reset_methods[{j}]", f"{method} is listed twice")
                seen.add(method)
            if f.physfn:
                self.address(f.physfn, f"{path}.physfn")
            self.text(f.host_use, MAX_TEXT, f"{path}.host_use")
            if f.host_use and f.role in _BRIDGE_ROLES:
                # The agent reports what the host uses among endpoints (the
                # boot display, a NIC with its link up); a bridge never is one,
                # and passthrough judges a group by its endpoints.
                self.add(f"{path}.host_use", "set on a bridge; only endpoints are in host use")
            self.at_most(len(f.bridge_chain), MAX_BRIDGE_DEPTH, f"{path}.bridge_chain", " bridges")

    def groups(self, inv: inventory_pb2.HostInventory) -> None:
        p = self.prefix
        n = self.bounded(inv.iommu_groups, MAX_PCI_FUNCTIONS, f"{p}.iommu_groups")
        if not inv.iommu_present and inv.iommu_groups:
            self.add(f"{p}.iommu_groups", "listed, but iommu_present is false")
        # Which group lists each function, to hold a function to one group.
        member_of: dict[str, tuple[int, str]] = {}
        numbers: dict[int, str] = {}
        for i, g in enumerate(inv.iommu_groups[:n]):
            path = f"{p}.iommu_groups[{i}]"
            if self.at_most(g.number, MAX_IOMMU_GROUP, f"{path}.number"):
                if g.number in numbers:
                    self.add(f"{path}.number", f"group {g.number} is also {numbers[g.number]}")
                numbers.setdefault(g.number, path)
            self.enum(g.type, _GROUP_TYPES, f"{path}.type", "IommuGroupType")
            if g.vfio_path:
                node = _VFIO_PATH.fullmatch(g.vfio_path) if len(g.vfio_path) <= 32 else None
                if node is None:
                    self.add(f"{path}.vfio_path", f"{shown(g.vfio_path)} is not /dev/vfio/N")
                elif int(node.group(1)) != g.number:
                    self.add(f"{path}.vfio_path", f"{g.vfio_path} is not group {g.number}'s node")
            if not g.members:
                self.add(f"{path}.members", "a group has at least one member")
            m = self.bounded(g.members, MAX_PCI_FUNCTIONS, f"{path}.members")
            for j, member in enumerate(g.members[:m]):
                mpath = f"{path}.members[{j}]"
                if not self.address(member, mpath) or not self.known_function(member, mpath):
                    continue
                if member in member_of:
                    number, where = member_of[member]
                    same = number == g.number and where == path
                    self.add(
                        mpath,
                        f"{member} is listed twice" if same else f"{member} is also in {where}",
                    )
                    continue
                member_of[member] = (g.number, path)
                f = self.fns.by_address[member]
                if not f.has_iommu_group:
                    self.add(mpath, f"{member} reports no IOMMU group")
                elif f.iommu_group != g.number:
                    self.add(mpath, f"{member} reports IOMMU group {f.iommu_group}")
        for address, f in self.fns.by_address.items():
            if not f.has_iommu_group:
                continue
            path = f"{self.fns.path_of[address]}.iommu_group"
            if not inv.iommu_present:
                self.add(path, "set, but iommu_present is false")
            elif f.iommu_group not in numbers:
                self.add(path, f"group {f.iommu_group} is not among iommu_groups")
            elif member_of.get(address, (None, ""))[0] != f.iommu_group:
                self.add(path, f"group {f.iommu_group} does not list {address}")

    def bridge_chains(self, inv: inventory_pb2.HostInventory) -> None:
        """Chains name reported bridges and agree with those bridges' own chains.

        Agreement (a bridge's own chain is the part of the chain above it)
        makes chains a tree: a parent's chain is shorter than its child's, so
        no chain can loop back. A loop is named as one, though, since that is
        what an operator has to find.
        """
        for address, f in self.fns.by_address.items():
            path = f"{self.fns.path_of[address]}.bridge_chain"
            chain = f.bridge_chain[:MAX_BRIDGE_DEPTH]
            seen: set[str] = set()
            for k, bridge in enumerate(chain):
                bpath = f"{path}[{k}]"
                if not self.address(bridge, bpath):
                    continue
                if bridge == address:
                    self.add(bpath, f"{address} cannot sit below itself")
                elif bridge in seen:
                    self.add(bpath, f"{bridge} appears twice")
                elif not self.known_function(bridge, bpath):
                    pass
                elif (role := self.fns.by_address[bridge].role) not in _BRIDGE_ROLES:
                    named = inventory_pb2.PciRole.Name(role) if role in _ROLES else str(role)
                    self.add(bpath, f"{bridge} is not a bridge but {named}")
                elif list(self.fns.by_address[bridge].bridge_chain) != list(chain[:k]):
                    loop = self._loop(address, bridge)
                    self.add(
                        bpath,
                        f"bridge chains loop: {' -> '.join(loop)}"
                        if loop
                        else f"{bridge}'s own bridge_chain differs from the chain above it",
                    )
                seen.add(bridge)

    def _loop(self, address: str, bridge: str) -> list[str]:
        """The path back to ``address`` following direct parents from ``bridge``, if any."""
        walk = [address, bridge]
        node = bridge
        for _ in range(2 * MAX_BRIDGE_DEPTH):
            found = self.fns.by_address.get(node)
            if found is None or not found.bridge_chain:
                return []
            node = found.bridge_chain[-1]
            walk.append(node)
            if node == address:
                return walk if len(walk) <= 8 else [*walk[:4], "...", *walk[-3:]]
        return []

    def sriov(self, inv: inventory_pb2.HostInventory) -> None:
        p = self.prefix
        n = self.bounded(inv.sriov_pfs, MAX_PCI_FUNCTIONS, f"{p}.sriov_pfs")
        vf_addresses: dict[str, str] = {}
        for i, pf in enumerate(inv.sriov_pfs[:n]):
            path = f"{p}.sriov_pfs[{i}]"
            if self.address(pf.address, f"{path}.address") and self.known_function(
                pf.address, f"{path}.address"
            ):
                if pf.address in self.pfs:
                    self.add(f"{path}.address", f"{pf.address} is listed twice")
                elif self.fns.by_address[pf.address].physfn:
                    self.add(f"{path}.address", f"{pf.address} is a VF; a VF has no VFs")
                self.pfs.setdefault(pf.address, pf)
            total_ok = self.at_most(pf.total_vfs, MAX_SRIOV_FIELD, f"{path}.total_vfs")
            if pf.num_vfs > pf.total_vfs:
                self.add(f"{path}.num_vfs", f"{pf.num_vfs:,} is more than total_vfs")
            offsets_ok = self.at_most(pf.vf_offset, MAX_SRIOV_FIELD, f"{path}.vf_offset")
            offsets_ok &= self.at_most(pf.vf_stride, MAX_SRIOV_FIELD, f"{path}.vf_stride")
            self.at_most(pf.vf_device_id, MAX_PCI_ID, f"{path}.vf_device_id", " (16 bits)")
            self.pattern(
                pf.vf_migration_driver,
                _MIGRATION_DRIVER,
                MAX_DRIVER_NAME,
                f"{path}.vf_migration_driver",
                "a VFIO variant driver name such as mlx5_vfio_pci",
            )
            # Offset 0 means the agent could not read the geometry (a VF never
            # shares its PF's routing ID); then only the counts are checked.
            geometry = offsets_ok and pf.vf_offset > 0 and _parse_address(pf.address) is not None
            if geometry and total_ok and pf.total_vfs > 0:
                last = _vf_address(pf.address, pf.vf_offset, pf.vf_stride, pf.total_vfs - 1)
                if last is None:
                    self.add(
                        f"{path}.total_vfs",
                        f"VF {pf.total_vfs - 1:,} at offset {pf.vf_offset} stride "
                        f"{pf.vf_stride} would sit past bus {MAX_BUS}",
                    )
                    geometry = False
            if len(pf.vfs) > pf.num_vfs:
                self.add(f"{path}.vfs", f"{len(pf.vfs):,} VFs listed, num_vfs is {pf.num_vfs:,}")
            m = min(len(pf.vfs), pf.num_vfs, MAX_SRIOV_FIELD)
            indexes: set[int] = set()
            for j, vf in enumerate(pf.vfs[:m]):
                vpath = f"{path}.vfs[{j}]"
                if vf.index >= pf.num_vfs:
                    self.add(f"{vpath}.index", f"{vf.index:,} is not below num_vfs")
                elif vf.index in indexes:
                    self.add(f"{vpath}.index", f"VF {vf.index} is listed twice")
                indexes.add(vf.index)
                self.pattern(vf.driver, _DRIVER, MAX_DRIVER_NAME, f"{vpath}.driver", "a driver")
                if vf.has_iommu_group:
                    self.at_most(vf.iommu_group, MAX_IOMMU_GROUP, f"{vpath}.iommu_group")
                apath = f"{vpath}.address"
                if not self.address(vf.address, apath):
                    continue
                if vf.address in vf_addresses:
                    self.add(apath, f"{vf.address} is also {vf_addresses[vf.address]}")
                    continue
                vf_addresses[vf.address] = vpath
                self.pf_vfs.setdefault(pf.address, set()).add(vf.address)
                if geometry and vf.index < pf.num_vfs:
                    expected = _vf_address(pf.address, pf.vf_offset, pf.vf_stride, vf.index)
                    if expected != vf.address:
                        self.add(apath, f"VF {vf.index} of {pf.address} is {expected}")
                if not self.known_function(vf.address, apath):
                    continue
                function = self.fns.by_address[vf.address]
                if function.physfn != pf.address:
                    self.add(apath, f"{vf.address} reports physfn {shown(function.physfn)}")
                if vf.has_iommu_group != function.has_iommu_group or (
                    vf.has_iommu_group and vf.iommu_group != function.iommu_group
                ):
                    self.add(f"{vpath}.iommu_group", f"differs from {vf.address}'s own group")

    def vf_functions(self, inv: inventory_pb2.HostInventory) -> None:
        """Every function reporting a physfn is a VF its PF lists."""
        for address, f in self.fns.by_address.items():
            if not f.physfn or not _PCI_ADDRESS.fullmatch(f.physfn):
                continue
            path = f"{self.fns.path_of[address]}.physfn"
            pf = self.pfs.get(f.physfn)
            if f.physfn == address:
                self.add(path, "a function is not its own PF")
            elif pf is None:
                self.add(path, f"{f.physfn} is not among sriov_pfs")
            elif address not in self.pf_vfs.get(f.physfn, ()):
                self.add(path, f"PF {f.physfn} does not list {address} among its vfs")

    def mdev(self, inv: inventory_pb2.HostInventory) -> None:
        p = self.prefix
        n = self.bounded(inv.mdev_parents, MAX_MDEV_PARENTS, f"{p}.mdev_parents")
        parents: set[str] = set()
        uuids: set[str] = set()
        for i, parent in enumerate(inv.mdev_parents[:n]):
            path = f"{p}.mdev_parents[{i}]"
            if self.address(parent.address, f"{path}.address") and self.known_function(
                parent.address, f"{path}.address"
            ):
                if parent.address in parents:
                    self.add(f"{path}.address", f"{parent.address} is listed twice")
                parents.add(parent.address)
            types: set[str] = set()
            # The vendor's per-parent limit of each type that states one.
            stated_limits: dict[str, int] = {}
            m = self.bounded(parent.types, MAX_MDEV_TYPES, f"{path}.types")
            for j, t in enumerate(parent.types[:m]):
                tpath = f"{path}.types[{j}]"
                if not t.id:
                    self.add(f"{tpath}.id", "must not be empty")
                self.pattern(t.id, _MDEV_TYPE_ID, MAX_NAME, f"{tpath}.id", "an mdev type id")
                if t.id in types:
                    self.add(f"{tpath}.id", f"type {shown(t.id)} is listed twice")
                types.add(t.id)
                self.text(t.name, MAX_NAME, f"{tpath}.name")
                self.text(t.description, MAX_SYSFS_TEXT, f"{tpath}.description")
                stated = stated_max_instances(t.description[:MAX_SYSFS_TEXT])
                if stated is not None and self.at_most(
                    stated, MAX_MDEV_INSTANCES, f"{tpath}.description", " instances"
                ):
                    stated_limits.setdefault(t.id, stated)
                self.at_most(
                    t.available_instances, MAX_MDEV_INSTANCES, f"{tpath}.available_instances"
                )
                self.pattern(t.device_api, _DEVICE_API, MAX_NAME, f"{tpath}.device_api", "an API")
                k = self.bounded(t.instances, MAX_MDEV_INSTANCES, f"{tpath}.instances")
                live: set[str] = set()
                for q, uuid in enumerate(t.instances[:k]):
                    if not _UUID.fullmatch(uuid):
                        self.add(f"{tpath}.instances[{q}]", f"{shown(uuid)} is not a UUID")
                    elif uuid in live:
                        self.add(f"{tpath}.instances[{q}]", f"{uuid} is listed twice")
                    live.add(uuid)
            m = self.bounded(parent.instances, MAX_MDEV_INSTANCES, f"{path}.instances")
            for j, mdev in enumerate(parent.instances[:m]):
                ipath = f"{path}.instances[{j}]"
                if not _UUID.fullmatch(mdev.uuid):
                    self.add(f"{ipath}.uuid", f"{shown(mdev.uuid)} is not a UUID")
                elif mdev.uuid.lower() in uuids:
                    self.add(f"{ipath}.uuid", f"mdev {mdev.uuid} is listed twice")
                uuids.add(mdev.uuid.lower())
                if mdev.type_id not in types:
                    self.add(f"{ipath}.type_id", f"{shown(mdev.type_id)} is not a parent's type")
                self.at_most(mdev.iommu_group, MAX_IOMMU_GROUP, f"{ipath}.iommu_group")
            by_type = Counter(i.type_id for i in parent.instances[:m] if i.type_id in types)
            self.mdev_room(parent, by_type, stated_limits, f"{path}.instances")

    def mdev_room(
        self,
        parent: inventory_pb2.MdevParent,
        live: Mapping[str, int],
        limits: Mapping[str, int],
        path: str,
    ) -> None:
        """Live mdevs the parent could hold: the kernel creates no more than that.

        Each instance of a type takes 1/max_instance of the parent (NVIDIA
        vGPU splits the framebuffer so); only the limits a description states
        are held against the report, as an inferred limit is the report's own.
        """
        if parent.single_type and len(live) > 1:
            self.add(path, f"single_type, but the live mdevs are of {len(live)} types")
        share = Fraction(0)
        for type_id, count in sorted(live.items()):
            limit = limits.get(type_id)
            if limit is None:
                continue
            if count > limit:
                self.add(path, f"{count} mdevs of {type_id}, whose description allows {limit}")
            share += Fraction(count, limit) if limit else count
        if share > 1:
            self.add(path, f"the live mdevs fill {float(share):.2f} of the parent")

    def gpus(self, inv: inventory_pb2.HostInventory) -> None:
        p = self.prefix
        n = self.bounded(inv.gpus, MAX_GPUS, f"{p}.gpus")
        addresses: set[str] = set()
        uuids: set[str] = set()
        for i, gpu in enumerate(inv.gpus[:n]):
            path = f"{p}.gpus[{i}]"
            # The agent reports a GPU NVML sees even when sysfs does not show
            # its function (with a note); the engine never offers such a GPU.
            if self.address(gpu.address, f"{path}.address"):
                if gpu.address in addresses:
                    self.add(f"{path}.address", f"{gpu.address} is listed twice")
                addresses.add(gpu.address)
            self.pattern(gpu.uuid, _NVML_UUID, MAX_NVML_STRING, f"{path}.uuid", "an NVML UUID")
            if gpu.uuid and gpu.uuid in uuids:
                self.add(f"{path}.uuid", f"{shown(gpu.uuid)} is listed twice")
            uuids.add(gpu.uuid)
            self.text(gpu.model, MAX_NVML_STRING, f"{path}.model")
            self.at_most(gpu.memory_mib, MAX_GPU_MEMORY_MIB, f"{path}.memory_mib", " MiB")
            self.enum(gpu.mig_mode_current, _MIG_MODES, f"{path}.mig_mode_current", "MigMode")
            self.enum(gpu.mig_mode_pending, _MIG_MODES, f"{path}.mig_mode_pending", "MigMode")
            profiles = self.mig_profiles(gpu, path)
            self.gpu_instances(gpu, profiles, path)
            k = self.bounded(gpu.nvlink_peers, MAX_GPUS, f"{path}.nvlink_peers")
            for peer, links in list(gpu.nvlink_peers.items())[:k]:
                if not _PCI_ADDRESS.fullmatch(peer):
                    self.add(f"{path}.nvlink_peers", f"key {shown(peer)} is not a PCI address")
                elif peer == gpu.address:
                    self.add(f"{path}.nvlink_peers", f"{peer} is the GPU itself")
                elif links > MAX_NVLINKS:
                    self.add(
                        f"{path}.nvlink_peers",
                        f"{links:,} links to {peer}; a GPU has at most {MAX_NVLINKS}",
                    )

    def mig_profiles(
        self, gpu: inventory_pb2.Gpu, path: str
    ) -> Mapping[int, inventory_pb2.MigProfile]:
        """Check a GPU's profiles; returns the sound ones by profile id."""
        by_id: dict[int, inventory_pb2.MigProfile] = {}
        names: set[str] = set()
        n = self.bounded(gpu.mig_profiles, MAX_MIG_PROFILES, f"{path}.mig_profiles")
        for j, profile in enumerate(gpu.mig_profiles[:n]):
            ppath = f"{path}.mig_profiles[{j}]"
            sound = True
            if not profile.name:
                self.add(f"{ppath}.name", "must not be empty")
            self.pattern(profile.name, _MIG_PROFILE_NAME, 32, f"{ppath}.name", "a profile name")
            if profile.name in names:
                self.add(f"{ppath}.name", f"profile {shown(profile.name)} is listed twice")
            names.add(profile.name)
            if not self.at_most(profile.profile_id, MAX_MIG_PROFILE_ID, f"{ppath}.profile_id"):
                sound = False
            elif profile.profile_id in by_id:
                self.add(f"{ppath}.profile_id", f"profile id {profile.profile_id} is listed twice")
                sound = False
            if not 1 <= profile.slice_count <= COMPUTE_SLICES:
                self.add(
                    f"{ppath}.slice_count",
                    f"must be 1..{COMPUTE_SLICES} compute slices, not {profile.slice_count:,}",
                )
                sound = False
            memory = gpu.memory_mib or MAX_GPU_MEMORY_MIB
            self.at_most(profile.memory_mib, memory, f"{ppath}.memory_mib", " MiB (the GPU's)")
            self.at_most(
                profile.multiprocessor_count, MAX_MULTIPROCESSORS, f"{ppath}.multiprocessor_count"
            )
            k = self.bounded(profile.placements, MEMORY_SLICES, f"{ppath}.placements")
            seen: set[tuple[int, int]] = set()
            for q, placement in enumerate(profile.placements[:k]):
                where = (placement.start, placement.size)
                if not self.placement(placement, f"{ppath}.placements[{q}]"):
                    sound = False
                elif where in seen:
                    self.add(f"{ppath}.placements[{q}]", f"{where} is listed twice")
                    sound = False
                seen.add(where)
            if len(profile.placements) > MEMORY_SLICES:
                sound = False
            if sound:
                by_id[profile.profile_id] = profile
        return by_id

    def placement(self, placement: inventory_pb2.MigPlacement, path: str) -> bool:
        """A run of the GPU's memory slices; True when it is one."""
        ok = True
        if placement.start >= MEMORY_SLICES:
            self.add(f"{path}.start", f"must be a memory slice 0..{MEMORY_SLICES - 1}")
            ok = False
        if not 1 <= placement.size <= MEMORY_SLICES:
            self.add(f"{path}.size", f"must be 1..{MEMORY_SLICES} memory slices")
            ok = False
        elif ok and placement.start + placement.size > MEMORY_SLICES:
            self.add(
                f"{path}.size",
                f"slices {placement.start}..{placement.start + placement.size - 1} "
                f"run past the GPU's {MEMORY_SLICES}",
            )
            ok = False
        return ok

    def gpu_instances(
        self,
        gpu: inventory_pb2.Gpu,
        profiles: Mapping[int, inventory_pb2.MigProfile],
        path: str,
    ) -> None:
        """Existing GPU instances: known profiles, allowed placements, no overlap, within budget."""
        n = self.bounded(gpu.gpu_instances, COMPUTE_SLICES, f"{path}.gpu_instances")
        ids: set[int] = set()
        occupied = 0
        compute = 0
        for j, gi in enumerate(gpu.gpu_instances[:n]):
            gpath = f"{path}.gpu_instances[{j}]"
            if self.at_most(gi.id, MAX_MIG_INSTANCE_ID, f"{gpath}.id") and gi.id in ids:
                self.add(f"{gpath}.id", f"GPU instance {gi.id} is listed twice")
            ids.add(gi.id)
            profile = profiles.get(gi.profile_id)
            sound = self.placement(gi.placement, f"{gpath}.placement")
            if profile is None:
                self.add(
                    f"{gpath}.profile_id",
                    f"{gi.profile_id:,} is not a profile among the GPU's mig_profiles",
                )
            elif sound:
                where = (gi.placement.start, gi.placement.size)
                allowed = [(pl.start, pl.size) for pl in profile.placements]
                if where not in allowed:
                    self.add(
                        f"{gpath}.placement",
                        f"{where} is not a placement {shown(profile.name)} allows",
                    )
                compute += profile.slice_count
            if sound:
                mask = ((1 << gi.placement.size) - 1) << gi.placement.start
                if occupied & mask:
                    self.add(f"{gpath}.placement", "overlaps another GPU instance")
                occupied |= mask
            c = self.bounded(gi.compute_instances, COMPUTE_SLICES, f"{gpath}.compute_instances")
            ci_ids: set[int] = set()
            for q, ci in enumerate(gi.compute_instances[:c]):
                cpath = f"{gpath}.compute_instances[{q}]"
                if self.at_most(ci.id, MAX_MIG_INSTANCE_ID, f"{cpath}.id") and ci.id in ci_ids:
                    self.add(f"{cpath}.id", f"compute instance {ci.id} is listed twice")
                ci_ids.add(ci.id)
                self.at_most(ci.profile_id, MAX_MIG_PROFILE_ID, f"{cpath}.profile_id")
                self.pattern(ci.uuid, _NVML_UUID, MAX_NVML_STRING, f"{cpath}.uuid", "a MIG UUID")
        if compute > COMPUTE_SLICES:
            self.add(
                f"{path}.gpu_instances",
                f"use {compute} compute slices; a GPU has {COMPUTE_SLICES}",
            )
        per_profile = Counter(gi.profile_id for gi in gpu.gpu_instances[:n])
        for profile_id, count in sorted(per_profile.items()):
            limit = DEFAULT_INSTANCE_LIMITS.get(profile_id)
            if limit is not None and count > limit:
                self.add(
                    f"{path}.gpu_instances",
                    f"{count} instances of profile id {profile_id}; a GPU holds at most {limit}",
                )

    def labels_and_notes(self, inv: inventory_pb2.HostInventory) -> None:
        p = self.prefix
        if self.bounded(inv.labels, MAX_LABELS, f"{p}.labels") < len(inv.labels):
            labels = list(islice(inv.labels.items(), MAX_LABELS))
        else:
            labels = sorted(inv.labels.items())
        for key, value in labels:
            for v in validate_identifier(key, f"{p}.labels"):
                self.add(v.field, f"key: {v.message}")
            if len(key) <= MAX_IDENT:
                self.text(value, MAX_TEXT, f"{p}.labels[{shown(key)}]")
        n = self.bounded(inv.notes, MAX_NOTES, f"{p}.notes")
        for i, note in enumerate(inv.notes[:n]):
            self.text(note, MAX_NOTE, f"{p}.notes[{i}]")
