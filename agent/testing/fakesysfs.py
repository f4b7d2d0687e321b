"""Builds a fake ``/sys`` (and ``/dev``) tree laid out exactly where Linux puts things.

A :class:`FakeSysfs` collects a host description (NUMA nodes, PCI root buses,
functions, drivers, SR-IOV and mdev capabilities) and :meth:`FakeSysfs.build`
writes it as real files and *relative* symlinks under ``root/sys``, the way
``drivers/pci/pci-sysfs.c``, ``drivers/pci/iov.c``, ``drivers/iommu/iommu.c``,
``drivers/vfio/mdev/mdev_sysfs.c`` and ``drivers/base/node.c`` show them. The
layout follows ``sample_tree_virt.txt`` of the reference material; formats
follow HW_FACTS §1-§8 and ``sysfs_formats.json``.

What the tree cannot say (driver id tables, ACS and multifunction bits, the
SR-IOV geometry a PF would create, mdev capacities) goes into the marker file
``root/.tessera-fake-host`` as JSON, so that any process handed the root can
drive it with :class:`agent.testing.kernel.KernelEmulator`. Everything that
changes at run time (bindings, overrides, VFs, mdevs, groups) lives in the
tree itself; the marker only changes for ``new_id``/``remove_id``.

Marker schema (``format`` 1)::

    {"format": 1, "iommu": bool, "iommu_vendor": "intel"|"amd",
     "default_domain": "DMA", "nr_cpu_ids": int,
     "drivers": {name: {"ids": [PciId...], "dynamic_ids": [PciId...],
                        "sriov_configure": bool, "driver_managed_dma": bool,
                        "vfio": bool}},               # registration order
     "vfio_denylist": [[vendor, device], ...],
     "functions": {bdf: {"role": str, "pcie": bool, "acs": bool,
                         "multifunction": bool, "reset_methods": [str...]}},
     "sriov": {pf_bdf: {"total", "offset", "stride", "vf_device", "vf_driver"}},
     "mdev": {parent_bdf: {"driver": str, "single_type": bool,
                           "types": [{"id", "name", "description",
                                      "device_api", "max_instances"}]}}}

with ``PciId`` = ``{"vendor", "device" (null = any), "class", "class_mask",
"override_only"}``.
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tessera.agent.sysfs import FAKE_HOST_MARKER

#: Version of the marker's JSON schema.
MARKER_FORMAT = 1

#: vfio-pci refuses these (``vfio_pci_dev_in_denylist`` in
#: ``drivers/vfio/pci/vfio_pci.c``, with ``disable_denylist=0``): Intel QAT
#: C3xxx, C62x and DH895xCC PFs and VFs, which the QAT driver must own. [I]
VFIO_PCI_DENYLIST: tuple[tuple[int, int], ...] = (
    (0x8086, 0x19E2),
    (0x8086, 0x19E3),
    (0x8086, 0x37C8),
    (0x8086, 0x37C9),
    (0x8086, 0x0435),
    (0x8086, 0x0443),
)

_BDF_RE = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{2}):([0-1][0-9a-f])\.([0-7])$")
_ROOT_BUS_RE = re.compile(r"^pci([0-9a-f]{4}):([0-9a-f]{2})$")

#: File modes as sysfs shows them (sysfs_formats.json legend).
MODE_RO = 0o444
MODE_RW = 0o644
MODE_WO = 0o200

#: Reserved regions of every PCI group (HW_FACTS §5, real dumps).
_RESERVED_REGIONS = {
    "intel": "0x00000000fee00000 0x00000000feefffff msi\n",
    "amd": (
        "0x00000000fee00000 0x00000000feefffff msi\n"
        "0x000000fd00000000 0x000000ffffffffff reserved\n"
    ),
}


class Role(enum.StrEnum):
    """What a PCI function is, as the PCIe capability's port type says (HW_FACTS §4)."""

    ENDPOINT = "endpoint"
    RCIEP = "rciep"
    ROOT_PORT = "root_port"
    SWITCH_UPSTREAM = "switch_upstream"
    SWITCH_DOWNSTREAM = "switch_downstream"
    #: A PCIe-to-PCI or conventional PCI bridge: everything below it DMA-aliases to it.
    PCI_BRIDGE = "pci_bridge"

    @property
    def is_bridge(self) -> bool:
        """Whether the function has a type-1 (bridge) header."""
        return self in _BRIDGE_ROLES


_BRIDGE_ROLES = frozenset(
    {Role.ROOT_PORT, Role.SWITCH_UPSTREAM, Role.SWITCH_DOWNSTREAM, Role.PCI_BRIDGE}
)


@dataclass(frozen=True)
class PciLink:
    """A PCIe link as ``current_link_*`` / ``max_link_*`` show it.

    Attributes:
        cur_speed: e.g. ``"16.0 GT/s PCIe"``.
        cur_width: negotiated lanes.
        max_speed: the capability's maximum speed.
        max_width: the capability's maximum width.
    """

    cur_speed: str = "16.0 GT/s PCIe"
    cur_width: int = 16
    max_speed: str = "16.0 GT/s PCIe"
    max_width: int = 16


#: What VFs show: they have no link of their own (sysfs_formats.json ``sriov_vf``). [I]
VF_LINK = PciLink("Unknown", 0, "Unknown", 0)


@dataclass(frozen=True)
class PciId:
    """One entry of a driver's id table (``struct pci_device_id``).

    Attributes:
        vendor: vendor id; None is ``PCI_ANY_ID``.
        device: device id; None is ``PCI_ANY_ID``.
        class_code: 24-bit class, compared under ``class_mask``.
        class_mask: bits of the class that must match; 0 ignores the class.
        override_only: a ``PCI_DRIVER_OVERRIDE_DEVICE_VFIO`` entry: it only
            matches when ``driver_override`` names the driver (HW_FACTS §2).
    """

    vendor: int | None
    device: int | None = None
    class_code: int = 0
    class_mask: int = 0
    override_only: bool = False

    def to_json(self) -> dict[str, Any]:
        """The marker form."""
        return {
            "vendor": self.vendor,
            "device": self.device,
            "class": self.class_code,
            "class_mask": self.class_mask,
            "override_only": self.override_only,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PciId:
        """Read the marker form."""
        return cls(
            vendor=None if data["vendor"] is None else int(data["vendor"]),
            device=None if data["device"] is None else int(data["device"]),
            class_code=int(data["class"]),
            class_mask=int(data["class_mask"]),
            override_only=bool(data["override_only"]),
        )

    def matches(self, vendor: int, device: int, class_code: int) -> bool:
        """``pci_match_one_device`` with subsystem ids left at ``PCI_ANY_ID``."""
        return (
            (self.vendor is None or self.vendor == vendor)
            and (self.device is None or self.device == device)
            and ((self.class_code ^ class_code) & self.class_mask) == 0
        )


@dataclass(frozen=True)
class MdevType:
    """One ``mdev_supported_types/<id>/`` directory (HW_FACTS §7).

    Attributes:
        type_id: ``<parent driver>-<vendor type name>``, e.g. ``nvidia-63``.
        name: pretty name, e.g. ``GRID P4-1Q``.
        max_instances: ``available_instances`` with no mdev created.
        description: vendor text; None when the driver has no
            ``show_description`` (the file is then absent, as for mtty).
        device_api: e.g. ``vfio-pci``.
    """

    type_id: str
    name: str
    max_instances: int
    description: str | None = None
    device_api: str = "vfio-pci"


@dataclass
class _Function:
    bdf: str
    root_bus: str
    parent: str | None
    vendor: int
    device: int
    class_code: int
    subsystem_vendor: int
    subsystem_device: int
    revision: int
    driver: str | None
    numa_node: int
    role: Role
    pcie: bool
    acs: bool
    multifunction: bool
    link: PciLink | None
    reset_methods: tuple[str, ...]


@dataclass
class _Driver:
    name: str
    ids: list[PciId] = field(default_factory=list)
    sriov_configure: bool = False
    driver_managed_dma: bool = False

    @property
    def vfio(self) -> bool:
        return is_vfio_driver(self.name)


@dataclass(frozen=True)
class _Sriov:
    pf: str
    total: int
    offset: int
    stride: int
    vf_device: int
    vf_driver: str | None
    numvfs: int
    autoprobe: bool


@dataclass(frozen=True)
class _NumaNode:
    node: int
    cpus: frozenset[int]
    distances: tuple[int, ...]
    mem_total_kb: int


# --------------------------------------------------------------------------
# Small format helpers shared with the emulator.


def parse_bdf(bdf: str) -> tuple[int, int, int, int]:
    """Split ``DDDD:BB:DD.F`` into (domain, bus, device, function).

    Raises:
        ValueError: not a lower-case sysfs PCI address.
    """
    m = _BDF_RE.match(bdf)
    if m is None or int(m.group(3), 16) > 0x1F:
        raise ValueError(f"not a PCI address: {bdf!r}")
    return int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16), int(m.group(4))


def is_bdf(text: str) -> bool:
    """Whether ``text`` is a sysfs PCI address (``0000:31:00.0``)."""
    try:
        parse_bdf(text)
    except ValueError:
        return False
    return True


def format_bdf(domain: int, bus: int, devfn: int) -> str:
    """``DDDD:BB:DD.F`` of a devfn (``devfn = device << 3 | function``)."""
    return f"{domain:04x}:{bus:02x}:{devfn >> 3:02x}.{devfn & 7}"


def is_vfio_driver(name: str) -> bool:
    """vfio-pci or a vfio-pci variant driver (``*_vfio_pci``, HW_FACTS §10)."""
    return name == "vfio-pci" or name.endswith("_vfio_pci")


def parse_cpulist(text: str) -> set[int]:
    """CPUs of a list like ``0-31,64-95`` (``bitmap_list_string`` format)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return cpus


def format_cpulist(cpus: Iterable[int]) -> str:
    """``bitmap_list_string``: ranges joined by commas, no newline."""
    out: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def format_cpumask(cpus: Iterable[int], nr_cpu_ids: int) -> str:
    """``bitmap_string`` (HW_FACTS §1 ``local_cpus``), no newline.

    32-bit chunks, most significant first, comma separated; the first chunk is
    only as wide as the bits it holds need.
    """
    mask = 0
    for cpu in cpus:
        mask |= 1 << cpu
    chunks = max(1, (nr_cpu_ids + 31) // 32)
    first_bits = nr_cpu_ids % 32 or 32
    parts = []
    for k in range(chunks - 1, -1, -1):
        value = (mask >> (32 * k)) & 0xFFFFFFFF
        width = (first_bits + 3) // 4 if k == chunks - 1 else 8
        parts.append(f"{value:0{width}x}")
    return ",".join(parts)


def modalias(vendor: int, device: int, sub_vendor: int, sub_device: int, class_code: int) -> str:
    """The ``modalias`` line of a PCI function, no newline."""
    return (
        f"pci:v{vendor:08X}d{device:08X}sv{sub_vendor:08X}sd{sub_device:08X}"
        f"bc{class_code >> 16:02X}sc{(class_code >> 8) & 0xFF:02X}i{class_code & 0xFF:02X}"
    )


def relative_link(link: Path, target: Path) -> str:
    """The relative target sysfs stores for a link at ``link`` to ``target``."""
    return os.path.relpath(target, link.parent)


def write_attr(path: Path, content: str, mode: int) -> None:
    """Write an attribute file whole and give it its sysfs mode.

    The content is replaced through a rename so that a concurrent reader (the
    agent is another process) never sees a half-written file, and so that a
    read-only mode does not stop the emulator from updating it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(content)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def create_attr(path: Path, content: str, mode: int) -> None:
    """Create a new attribute file in an existing directory (the builder's fast path)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, content.encode())
        os.fchmod(fd, mode)  # the umask must not change what sysfs would show
    finally:
        os.close(fd)


def make_link(link: Path, target: Path) -> None:
    """Create (or replace) a relative symlink at ``link`` pointing to ``target``."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(relative_link(link, target), link)


def node_list(nodes: Iterable[int]) -> str:
    """A node list file's content, e.g. ``0-1`` and a newline."""
    return format_cpulist(nodes) + "\n"


@dataclass(frozen=True)
class DeviceAttrs:
    """Everything the per-device attribute files of one PCI function hold.

    Used by the builder and by the emulator when it creates VFs, so both write
    the same files.
    """

    vendor: int
    device: int
    class_code: int
    subsystem_vendor: int
    subsystem_device: int
    revision: int
    numa_node: int
    local_cpus: str
    local_cpulist: str
    link: PciLink | None
    reset_methods: tuple[str, ...]
    bridge_buses: tuple[int, int] | None = None

    def files(self) -> dict[str, tuple[str, int]]:
        """File name -> (content, mode) for the device directory."""
        out: dict[str, tuple[str, int]] = {
            "vendor": (f"0x{self.vendor:04x}\n", MODE_RO),
            "device": (f"0x{self.device:04x}\n", MODE_RO),
            "subsystem_vendor": (f"0x{self.subsystem_vendor:04x}\n", MODE_RO),
            "subsystem_device": (f"0x{self.subsystem_device:04x}\n", MODE_RO),
            "revision": (f"0x{self.revision:02x}\n", MODE_RO),
            "class": (f"0x{self.class_code:06x}\n", MODE_RO),
            "modalias": (
                modalias(
                    self.vendor,
                    self.device,
                    self.subsystem_vendor,
                    self.subsystem_device,
                    self.class_code,
                )
                + "\n",
                MODE_RO,
            ),
            "numa_node": (f"{self.numa_node}\n", MODE_RW),
            "local_cpus": (self.local_cpus + "\n", MODE_RO),
            "local_cpulist": (self.local_cpulist + "\n", MODE_RO),
            "enable": ("0\n", MODE_RW),
            "driver_override": ("(null)\n", MODE_RW),
            "remove": ("", MODE_WO),
            "rescan": ("", MODE_WO),
            "reset": ("", MODE_WO),
        }
        if self.reset_methods:
            out["reset_method"] = (" ".join(self.reset_methods) + "\n", MODE_RW)
        if self.link is not None:
            out["current_link_speed"] = (self.link.cur_speed + "\n", MODE_RO)
            out["current_link_width"] = (f"{self.link.cur_width}\n", MODE_RO)
            out["max_link_speed"] = (self.link.max_speed + "\n", MODE_RO)
            out["max_link_width"] = (f"{self.link.max_width}\n", MODE_RO)
        if self.bridge_buses is not None:
            out["secondary_bus_number"] = (f"{self.bridge_buses[0]}\n", MODE_RO)
            out["subordinate_bus_number"] = (f"{self.bridge_buses[1]}\n", MODE_RO)
        return out


def sriov_pf_files(
    total: int, offset: int, stride: int, vf_device: int, autoprobe: bool
) -> dict[str, tuple[str, int]]:
    """The SR-IOV files of a PF with no VFs enabled (HW_FACTS §3)."""
    return {
        "sriov_totalvfs": (f"{total}\n", MODE_RO),
        "sriov_numvfs": ("0\n", MODE_RW),
        "sriov_offset": (f"{offset}\n", MODE_RO),
        "sriov_stride": (f"{stride}\n", MODE_RO),
        # No 0x here, unlike the VF's own device file.
        "sriov_vf_device": (f"{vf_device:x}\n", MODE_RO),
        "sriov_drivers_autoprobe": (f"{int(autoprobe)}\n", MODE_RW),
    }


def mdev_type_files(t: dict[str, Any], available: int) -> dict[str, tuple[str, int]]:
    """The files of one ``mdev_supported_types/<id>/`` directory (marker form of ``t``)."""
    out = {
        "name": (f"{t['name']}\n", MODE_RO),
        "device_api": (f"{t['device_api']}\n", MODE_RO),
        "available_instances": (f"{available}\n", MODE_RO),
        "create": ("", MODE_WO),
    }
    if t["description"] is not None:
        out["description"] = (f"{t['description']}\n", MODE_RO)
    return out


def group_files(iommu_vendor: str, default_domain: str | None) -> dict[str, tuple[str, int]]:
    """``type`` and ``reserved_regions`` of a group; None domain = an mdev's group."""
    if default_domain is None:
        # An mdev's group has no default domain and no reserved regions.
        return {"type": ("unknown\n", MODE_RW), "reserved_regions": ("", MODE_RO)}
    return {
        "type": (f"{default_domain}\n", MODE_RW),
        "reserved_regions": (_RESERVED_REGIONS[iommu_vendor], MODE_RO),
    }


# --------------------------------------------------------------------------
# IOMMU group formation (HW_FACTS §5, drivers/iommu/iommu.c pci_device_group).


@dataclass(frozen=True)
class GroupingNode:
    """What group formation needs to know about one function.

    Attributes:
        bdf: the address.
        parent: the bridge above it, or None on a root bus.
        role: port type.
        pcie: has a PCIe capability (a conventional PCI device does not).
        acs: the ACS capability has SV, RR, CR and UF enabled.
        multifunction: the header's multifunction bit.
        is_vf: an SR-IOV VF.
    """

    bdf: str
    parent: str | None
    role: Role
    pcie: bool
    acs: bool
    multifunction: bool
    is_vf: bool = False


def acs_enabled(node: GroupingNode) -> bool:
    """``pci_acs_enabled(pdev, REQ_ACS_FLAGS)`` without device quirks."""
    if not node.pcie or node.role is Role.PCI_BRIDGE:
        # Conventional PCI and PCIe-to-PCI bridges cannot isolate.
        return False
    if node.role in (Role.ROOT_PORT, Role.SWITCH_DOWNSTREAM):
        return node.acs
    if node.multifunction and not node.is_vf:
        return node.acs
    # Single-function endpoints and upstream ports pass (PCIe 6.12.1.3).
    return True


def _acs_path_enabled(bdf: str, nodes: dict[str, GroupingNode]) -> bool:
    cur: str | None = bdf
    while cur is not None:
        if not acs_enabled(nodes[cur]):
            return False
        cur = nodes[cur].parent
    return True


def _dma_aliases(node: GroupingNode, nodes: dict[str, GroupingNode]) -> list[str]:
    """The device and every bridge its DMA is seen as (``pci_for_each_dma_alias``)."""
    out = [node.bdf]
    cur = node.parent
    while cur is not None:
        bridge = nodes[cur]
        if bridge.role is Role.PCI_BRIDGE or not bridge.pcie:
            out.append(cur)
        cur = bridge.parent
    return out


def _slot(bdf: str) -> tuple[int, int, int]:
    domain, bus, dev, _ = parse_bdf(bdf)
    return domain, bus, dev


def assign_group(
    node: GroupingNode,
    nodes: dict[str, GroupingNode],
    groups: dict[str, int],
    allocate: Callable[[], int],
) -> int:
    """The group ``node`` joins, as ``pci_device_group()`` decides it.

    Args:
        node: the function being added (must be in ``nodes``).
        nodes: every known function, the new one included.
        groups: group of every function already added; not modified.
        allocate: called with no argument to get a fresh group number.

    Returns:
        An existing group number or a freshly allocated one.
    """
    # 1. A DMA alias that already has a group decides.
    aliases = _dma_aliases(node, nodes)
    for alias in aliases:
        if alias in groups:
            return groups[alias]
    pdev = aliases[-1]
    # 2. Walk upstream while the path above is not ACS-isolated.
    parent = nodes[pdev].parent
    while parent is not None:
        if _acs_path_enabled(parent, nodes):
            break
        pdev = parent
        if pdev in groups:
            return groups[pdev]
        parent = nodes[pdev].parent
    # Devices already grouped that alias to pdev.
    for other, number in groups.items():
        if other in nodes and pdev in _dma_aliases(nodes[other], nodes):
            return number
    # 3. Non-isolated functions of one multifunction slot share a group.
    top = nodes[pdev]
    if top.multifunction and not acs_enabled(top):
        for other, number in sorted(groups.items()):
            o = nodes.get(other)
            if o is not None and not o.is_vf and other != pdev and _slot(other) == _slot(pdev):
                return number
    # 4. A new group.
    return allocate()


# --------------------------------------------------------------------------
# The builder.


class FakeSysfs:
    """Builder of one fake host tree under ``root``.

    Describe the host with the ``add_*``/``register_*`` methods, then call
    :meth:`build` once. Functions are registered (and get IOMMU group numbers)
    in the order they are added, so add them in bus-scan order (ascending BDF
    per root bus) for kernel-like numbering.

    Args:
        root: directory that will hold ``sys/``, ``dev/`` and the marker.
        iommu_vendor: ``intel`` or ``amd``: the ``reserved_regions`` lines.
        default_domain: what every PCI group's ``type`` reads (``DMA``,
            ``DMA-FQ``, ``identity``).
    """

    def __init__(
        self,
        root: Path,
        *,
        iommu_vendor: Literal["intel", "amd"] = "intel",
        default_domain: str = "DMA",
    ) -> None:
        self.root = root
        self.sys = root / "sys"
        self._iommu = True
        self._iommu_vendor = iommu_vendor
        self._default_domain = default_domain
        self._numa: dict[int, _NumaNode] = {}
        self._root_buses: dict[str, int] = {}
        self._functions: dict[str, _Function] = {}
        self._drivers: dict[str, _Driver] = {}
        self._sriov: dict[str, _Sriov] = {}
        self._mdev: dict[str, tuple[tuple[MdevType, ...], bool]] = {}
        self._built = False
        # Bus drivers every host has. vfio-pci only binds through
        # driver_override (its one id entry is override-only, any device);
        # pcieport takes PCIe bridges (class 0x060400 exactly).
        self.register_driver("pcieport", [PciId(None, None, 0x060400, 0xFFFFFF)])
        self.register_driver("vfio-pci", [], driver_managed_dma=True)

    # -- description -------------------------------------------------------

    def no_iommu(self) -> None:
        """Describe a host without an IOMMU: no ``iommu_groups``, no group links."""
        self._iommu = False

    def add_numa_node(
        self,
        node: int,
        cpulist: str,
        distances: Sequence[int],
        mem_total_kb: int = 263_000_000,
    ) -> None:
        """Add ``/sys/devices/system/node/node<N>``.

        Args:
            node: node id.
            cpulist: its CPUs, e.g. ``0-31,64-95``.
            distances: SLIT row over all nodes (``10 21``).
            mem_total_kb: ``MemTotal`` of its ``meminfo``.
        """
        self._numa[node] = _NumaNode(
            node, frozenset(parse_cpulist(cpulist)), tuple(distances), mem_total_kb
        )

    def add_root_bus(self, name: str, numa_node: int) -> None:
        """Add a PCI root bus (host bridge) ``/sys/devices/pci<DDDD>:<BB>``.

        Args:
            name: ``pci0000:30``.
            numa_node: node of the host bridge; functions below default to it.
        """
        if not _ROOT_BUS_RE.match(name):
            raise ValueError(f"root bus must look like pci0000:30, got {name!r}")
        self._root_buses[name] = numa_node

    def add_function(
        self,
        bdf: str,
        *,
        vendor: int,
        device: int,
        class_code: int,
        root_bus: str | None = None,
        parent: str | None = None,
        driver: str | None = None,
        numa_node: int | None = None,
        role: Role | str = Role.ENDPOINT,
        pcie: bool = True,
        acs: bool = False,
        multifunction: bool = False,
        link: PciLink | None = None,
        subsystem_vendor: int | None = None,
        subsystem_device: int = 0,
        revision: int = 0,
        reset_methods: Sequence[str] | None = None,
    ) -> None:
        """Add one PCI function.

        Args:
            bdf: ``0000:31:00.0``.
            vendor: vendor id.
            device: device id.
            class_code: 24-bit class (``0x030200``).
            root_bus: ``pci0000:30``; defaults to the parent's.
            parent: the bridge above it, or None on the root bus.
            driver: driver bound at boot (registered with this device's id if
                unknown, so a reprobe finds it again).
            numa_node: defaults to the root bus's node; -1 is NUMA_NO_NODE.
            role: port type; see :class:`Role`.
            pcie: has a PCIe capability (False for conventional PCI).
            acs: ACS isolation enabled (meaningful for root/downstream ports
                and multifunction devices).
            multifunction: the header's multifunction bit.
            link: PCIe link; defaults to Gen4 x16 for PCIe functions that are
                not RCiEPs, None otherwise.
            subsystem_vendor: defaults to ``vendor``.
            subsystem_device: subsystem device id.
            revision: revision id.
            reset_methods: ``reset_method`` content; by default ``flr bus``
                (``bus`` for display controllers and conventional PCI, ``flr``
                for RCiEPs, none for bridges), the builder's [S] defaults.
        """
        parse_bdf(bdf)
        if bdf in self._functions:
            raise ValueError(f"{bdf} added twice")
        role = Role(role)
        if parent is not None:
            if parent not in self._functions:
                raise ValueError(f"{bdf}: parent {parent} must be added first")
            if not self._functions[parent].role.is_bridge:
                raise ValueError(f"{bdf}: parent {parent} is not a bridge")
            root_bus = root_bus or self._functions[parent].root_bus
        if root_bus is None or root_bus not in self._root_buses:
            raise ValueError(f"{bdf}: unknown root bus {root_bus!r}")
        if numa_node is None:
            numa_node = self._root_buses[root_bus]
        if link is None and pcie and role is not Role.RCIEP:
            link = PciLink()
        if not pcie:
            link = None
        if reset_methods is None:
            if role.is_bridge:
                reset_methods = ()
            elif role is Role.RCIEP:
                reset_methods = ("flr",)
            elif (class_code >> 16) == 0x03 or not pcie:
                reset_methods = ("bus",)
            else:
                reset_methods = ("flr", "bus")
        self._functions[bdf] = _Function(
            bdf=bdf,
            root_bus=root_bus,
            parent=parent,
            vendor=vendor,
            device=device,
            class_code=class_code,
            subsystem_vendor=vendor if subsystem_vendor is None else subsystem_vendor,
            subsystem_device=subsystem_device,
            revision=revision,
            driver=driver,
            numa_node=numa_node,
            role=role,
            pcie=pcie,
            acs=acs,
            multifunction=multifunction,
            link=link,
            reset_methods=tuple(reset_methods),
        )
        if driver is not None:
            self._ensure_driver_matches(driver, vendor, device, class_code)

    def register_driver(
        self,
        name: str,
        ids: Iterable[PciId] = (),
        *,
        sriov_configure: bool = False,
        driver_managed_dma: bool | None = None,
    ) -> None:
        """Register a PCI driver (``/sys/bus/pci/drivers/<name>/``).

        Registering a name again adds ids and may turn ``sriov_configure`` on.

        Args:
            name: driver name as the ``driver`` link shows it.
            ids: its id table, in order.
            sriov_configure: the driver implements ``sriov_configure``, so
                ``sriov_numvfs`` works on PFs bound to it.
            driver_managed_dma: leaves DMA ownership to userspace (vfio
                drivers, pci-stub, pcieport); defaults to True for vfio drivers.
        """
        drv = self._drivers.setdefault(name, _Driver(name))
        for pid in ids:
            if pid not in drv.ids:
                drv.ids.append(pid)
        drv.sriov_configure = drv.sriov_configure or sriov_configure
        if driver_managed_dma is not None:
            drv.driver_managed_dma = driver_managed_dma
        elif is_vfio_driver(name) or name in ("pci-stub", "pcieport"):
            drv.driver_managed_dma = True

    def _ensure_driver_matches(self, name: str, vendor: int, device: int, class_code: int) -> None:
        """Make sure a reprobe finds ``name`` again for a function booted on it."""
        if is_vfio_driver(name):
            # Boot-time vfio binding comes from ids= (a dynamic id) or an
            # override; giving vfio-pci a static id would let it steal devices.
            return
        drv = self._drivers.setdefault(name, _Driver(name))
        if not any(not i.override_only and i.matches(vendor, device, class_code) for i in drv.ids):
            drv.ids.append(PciId(vendor, device))

    def add_sriov(
        self,
        pf: str,
        *,
        total: int,
        offset: int,
        stride: int,
        vf_device: int,
        vf_driver: str | None,
        numvfs: int = 0,
        autoprobe: bool = True,
    ) -> None:
        """Make ``pf`` an SR-IOV PF (HW_FACTS §3).

        The PF's boot driver is marked as implementing ``sriov_configure``.

        Args:
            pf: PF address (already added).
            total: ``sriov_totalvfs``.
            offset: First VF Offset.
            stride: VF Stride.
            vf_device: the VFs' device id.
            vf_driver: the driver VFs bind to when probed (registered with the
                VF id if needed); None leaves them unbound.
            numvfs: VFs to enable at build time (through the emulator, so they
                get groups after every boot-time function).
            autoprobe: ``sriov_drivers_autoprobe``.
        """
        fn = self._functions[pf]
        if fn.role.is_bridge:
            raise ValueError(f"{pf}: a bridge cannot be an SR-IOV PF")
        self._sriov[pf] = _Sriov(pf, total, offset, stride, vf_device, vf_driver, numvfs, autoprobe)
        if fn.driver is not None:
            self.register_driver(fn.driver, sriov_configure=True)
        if vf_driver is not None:
            self._ensure_driver_matches(vf_driver, fn.vendor, vf_device, fn.class_code)

    def add_mdev_parent(
        self, bdf: str, types: Sequence[MdevType], *, single_type: bool = False
    ) -> None:
        """Make ``bdf`` an mdev parent while it is bound to its boot driver (HW_FACTS §7).

        Args:
            bdf: the parent function (already added, with a driver).
            types: its supported types.
            single_type: every mdev on it must be of one type (pre-Ampere
                NVIDIA time-sliced vGPU): once one exists, the other types'
                ``available_instances`` read 0 until the last one goes.
        """
        fn = self._functions[bdf]
        if fn.driver is None:
            raise ValueError(f"{bdf}: an mdev parent needs its vendor driver bound")
        self._mdev[bdf] = (tuple(types), single_type)

    # -- writing -----------------------------------------------------------

    def _nr_cpu_ids(self) -> int:
        return max((max(n.cpus, default=0) for n in self._numa.values()), default=0) + 1

    def _online_cpus(self) -> set[int]:
        return set().union(*(n.cpus for n in self._numa.values()))

    def _bridge_buses(self, bdf: str) -> tuple[int, int]:
        """Secondary and subordinate bus numbers of a bridge."""
        below: list[int] = []
        stack = [c for c in self._functions.values() if c.parent == bdf]
        direct = [parse_bdf(c.bdf)[1] for c in stack]
        while stack:
            c = stack.pop()
            _, bus, dev, fn = parse_bdf(c.bdf)
            below.append(bus)
            sriov = self._sriov.get(c.bdf)
            if sriov is not None and sriov.total:
                # The bus range reserves room for the last VF's bus.
                rid = (dev << 3 | fn) + sriov.offset + sriov.stride * (sriov.total - 1)
                below.append(bus + (rid >> 8))
            stack.extend(x for x in self._functions.values() if x.parent == c.bdf)
        own_bus = parse_bdf(bdf)[1]
        secondary = min(direct) if direct else own_bus + 1
        return secondary, max([secondary, *below])

    def _grouping_nodes(self) -> dict[str, GroupingNode]:
        return {
            f.bdf: GroupingNode(f.bdf, f.parent, f.role, f.pcie, f.acs, f.multifunction)
            for f in self._functions.values()
        }

    def compute_groups(self) -> dict[str, int]:
        """The IOMMU group of every function, numbered in registration order.

        Returns:
            BDF -> group number; empty without an IOMMU.
        """
        if not self._iommu:
            return {}
        nodes = self._grouping_nodes()
        groups: dict[str, int] = {}
        counter = iter(range(1 << 20))
        for bdf in self._functions:
            groups[bdf] = assign_group(nodes[bdf], nodes, groups, lambda: next(counter))
        return groups

    def _device_dir(self, bdf: str) -> Path:
        fn = self._functions[bdf]
        parts = [bdf]
        cur = fn.parent
        while cur is not None:
            parts.append(cur)
            cur = self._functions[cur].parent
        return self.sys.joinpath("devices", fn.root_bus, *reversed(parts))

    def _marker(self) -> dict[str, Any]:
        return {
            "format": MARKER_FORMAT,
            "iommu": self._iommu,
            "iommu_vendor": self._iommu_vendor,
            "default_domain": self._default_domain,
            "nr_cpu_ids": self._nr_cpu_ids(),
            "drivers": {
                d.name: {
                    "ids": [i.to_json() for i in d.ids],
                    "dynamic_ids": [],
                    "sriov_configure": d.sriov_configure,
                    "driver_managed_dma": d.driver_managed_dma,
                    "vfio": d.vfio,
                }
                for d in self._drivers.values()
            },
            "vfio_denylist": [list(x) for x in VFIO_PCI_DENYLIST],
            "functions": {
                f.bdf: {
                    "role": str(f.role),
                    "pcie": f.pcie,
                    "acs": f.acs,
                    "multifunction": f.multifunction,
                    "reset_methods": list(f.reset_methods),
                }
                for f in self._functions.values()
            },
            "sriov": {
                s.pf: {
                    "total": s.total,
                    "offset": s.offset,
                    "stride": s.stride,
                    "vf_device": s.vf_device,
                    "vf_driver": s.vf_driver,
                }
                for s in self._sriov.values()
            },
            "mdev": {
                bdf: {
                    "driver": self._functions[bdf].driver,
                    "single_type": single,
                    "types": [
                        {
                            "id": t.type_id,
                            "name": t.name,
                            "description": t.description,
                            "device_api": t.device_api,
                            "max_instances": t.max_instances,
                        }
                        for t in types
                    ],
                }
                for bdf, (types, single) in self._mdev.items()
            },
        }

    def _write_numa(self) -> None:
        base = self.sys / "devices" / "system" / "node"
        nodes = sorted(self._numa)
        nr = self._nr_cpu_ids()
        for name in ("online", "possible"):
            write_attr(base / name, node_list(nodes), MODE_RO)
        write_attr(base / "has_cpu", node_list(n for n in nodes if self._numa[n].cpus), MODE_RO)
        for name in ("has_memory", "has_normal_memory"):
            write_attr(
                base / name, node_list(n for n in nodes if self._numa[n].mem_total_kb), MODE_RO
            )
        for n in nodes:
            info = self._numa[n]
            d = base / f"node{n}"
            write_attr(d / "cpulist", format_cpulist(info.cpus) + "\n", MODE_RO)
            write_attr(d / "cpumap", format_cpumask(info.cpus, nr) + "\n", MODE_RO)
            write_attr(d / "distance", " ".join(map(str, info.distances)) + "\n", MODE_RO)
            write_attr(d / "meminfo", _meminfo(n, info.mem_total_kb), MODE_RO)

    def _device_attrs(self, fn: _Function) -> DeviceAttrs:
        nr = self._nr_cpu_ids()
        cpus = self._numa[fn.numa_node].cpus if fn.numa_node >= 0 else self._online_cpus()
        return DeviceAttrs(
            vendor=fn.vendor,
            device=fn.device,
            class_code=fn.class_code,
            subsystem_vendor=fn.subsystem_vendor,
            subsystem_device=fn.subsystem_device,
            revision=fn.revision,
            numa_node=fn.numa_node,
            local_cpus=format_cpumask(cpus, nr),
            local_cpulist=format_cpulist(cpus),
            link=fn.link,
            reset_methods=fn.reset_methods,
            bridge_buses=self._bridge_buses(fn.bdf) if fn.role.is_bridge else None,
        )

    def _validate(self) -> None:
        if not self._numa:
            raise ValueError("add at least one NUMA node")
        for bus, node in self._root_buses.items():
            if node >= 0 and node not in self._numa:
                raise ValueError(f"{bus}: unknown NUMA node {node}")
        for fn in self._functions.values():
            if fn.numa_node >= 0 and fn.numa_node not in self._numa:
                raise ValueError(f"{fn.bdf}: unknown NUMA node {fn.numa_node}")

    def build(self) -> None:
        """Write the tree and the marker under ``root`` (which must not hold a tree yet).

        Raises:
            ValueError: inconsistent description.
            FileExistsError: ``root`` already holds a fake host.
        """
        if self._built:
            raise RuntimeError("build() runs once")
        self._validate()
        if (self.root / FAKE_HOST_MARKER).exists() or self.sys.exists():
            raise FileExistsError(f"{self.root} already holds a tree")
        self._built = True
        groups = self.compute_groups()
        self.root.mkdir(parents=True, exist_ok=True)
        sysd = self.sys
        (self.root / "dev").mkdir(exist_ok=True)
        pci = sysd / "bus" / "pci"
        (pci / "devices").mkdir(parents=True, exist_ok=True)
        write_attr(pci / "drivers_probe", "", MODE_WO)
        write_attr(pci / "rescan", "", MODE_WO)
        (sysd / "bus" / "mdev" / "devices").mkdir(parents=True, exist_ok=True)
        (sysd / "class" / "mdev_bus").mkdir(parents=True, exist_ok=True)
        for name in self._drivers:
            for attr in ("bind", "unbind", "new_id", "remove_id"):
                write_attr(pci / "drivers" / name / attr, "", MODE_WO)
        for bus in self._root_buses:
            (sysd / "devices" / bus).mkdir(parents=True, exist_ok=True)
        self._write_numa()
        for fn in self._functions.values():
            d = self._device_dir(fn.bdf)
            d.mkdir(parents=True, exist_ok=True)
            for name, (content, mode) in self._device_attrs(fn).files().items():
                create_attr(d / name, content, mode)
            os.symlink(relative_link(pci / "devices" / fn.bdf, d), pci / "devices" / fn.bdf)
            if fn.driver is not None:
                drv_dir = pci / "drivers" / fn.driver
                os.symlink(relative_link(d / "driver", drv_dir), d / "driver")
                os.symlink(relative_link(drv_dir / fn.bdf, d), drv_dir / fn.bdf)
                create_attr(d / "enable", "1\n", MODE_RW)
            sriov = self._sriov.get(fn.bdf)
            if sriov is not None:
                files = sriov_pf_files(
                    sriov.total, sriov.offset, sriov.stride, sriov.vf_device, sriov.autoprobe
                )
                for name, (content, mode) in files.items():
                    create_attr(d / name, content, mode)
            if fn.bdf in groups:
                gdir = sysd / "kernel" / "iommu_groups" / str(groups[fn.bdf])
                if not gdir.exists():
                    (gdir / "devices").mkdir(parents=True)
                    for name, (content, mode) in group_files(
                        self._iommu_vendor, self._default_domain
                    ).items():
                        create_attr(gdir / name, content, mode)
                os.symlink(relative_link(gdir / "devices" / fn.bdf, d), gdir / "devices" / fn.bdf)
                os.symlink(relative_link(d / "iommu_group", gdir), d / "iommu_group")
        for bdf, (types, _single) in self._mdev.items():
            d = self._device_dir(bdf)
            for t in types:
                tdir = d / "mdev_supported_types" / t.type_id
                marker_t = {
                    "name": t.name,
                    "description": t.description,
                    "device_api": t.device_api,
                }
                for name, (content, mode) in mdev_type_files(marker_t, t.max_instances).items():
                    write_attr(tdir / name, content, mode)
                (tdir / "devices").mkdir(exist_ok=True)
            make_link(sysd / "class" / "mdev_bus" / bdf, d)
        # The marker goes last: a tree with a marker is complete.
        tmp = self.root / f".{FAKE_HOST_MARKER}.tmp"
        tmp.write_text(json.dumps(self._marker(), indent=1) + "\n")
        os.replace(tmp, self.root / FAKE_HOST_MARKER)
        # Boot-time VFs come up after every function has been enumerated.
        pending = [s for s in self._sriov.values() if s.numvfs]
        if pending:
            from tessera.agent.testing.kernel import KernelEmulator

            emulator = KernelEmulator(self.root)
            for s in pending:
                emulator.write(self._device_dir(s.pf) / "sriov_numvfs", f"{s.numvfs}\n")


def _meminfo(node: int, total_kb: int) -> str:
    """A ``nodeN/meminfo`` with the leading fields of ``node_read_meminfo``."""
    free = total_kb * 9 // 10
    fields = [
        ("MemTotal", total_kb),
        ("MemFree", free),
        ("MemUsed", total_kb - free),
        ("SwapCached", 0),
        ("Active", (total_kb - free) // 2),
        ("Inactive", (total_kb - free) // 4),
    ]
    lines = [f"Node {node} {name + ':':<15} {value:>8} kB" for name, value in fields]
    lines += [
        f"Node {node} {name + ':':<17}{0:>5}"
        for name in ("HugePages_Total", "HugePages_Free", "HugePages_Surp")
    ]
    return "\n".join(lines) + "\n"
