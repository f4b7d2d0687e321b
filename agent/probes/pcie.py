"""The PCIe hierarchy: root buses, bridge chains, port roles and locality.

``realpath /sys/bus/pci/devices/<address>`` walks from the host bridge down
(HW_FACTS §4): ``/sys/devices/pci0000:4a/0000:4a:01.0/0000:4b:00.0`` is the GPU
``4b:00.0`` below root port ``4a:01.0`` on root bus ``pci0000:4a``.

The port type is not a sysfs attribute. It is read from the PCIe capability in
``config`` when the agent may read past the first 64 bytes (root); otherwise
it is inferred from the tree: a bridge directly on a root bus is a root port,
a function there that is not a bridge is an RCiEP, and below a root port the
ports alternate switch-upstream / switch-downstream. A subtractive bridge
(class 0x060401), a bridge with no PCIe link attributes, anything below a
conventional bridge, and a would-be upstream port whose children are not
bridges are conventional PCI bridges.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tessera.agent.probes.pci import PciAddress, PciFunction, is_pci_address
from tessera.agent.sysfs import Sysfs

_ROOT_BUS = re.compile(r"^pci[0-9a-f]{4,}:[0-9a-f]{2}$")

#: Subtractive-decode PCI-to-PCI bridge: always conventional PCI.
_SUBTRACTIVE_BRIDGE_CLASS = 0x060401

#: PCI Express capability id and the config-space layout used to find it
#: (``include/uapi/linux/pci_regs.h``).
_CAP_ID_EXP = 0x10
_CAPABILITY_LIST = 0x34
_STATUS = 0x06
_STATUS_CAP_LIST = 0x10
#: Where capabilities may start: after the 64-byte standard header.
_FIRST_CAPABILITY = 0x40
#: Bound on the capability walk, so a corrupt (looping) list cannot hang us.
_MAX_CAPABILITIES = 48


class PciRole(enum.Enum):
    """Where a function sits in the PCIe hierarchy."""

    ENDPOINT = "endpoint"
    RCIEP = "rciep"
    ROOT_PORT = "root-port"
    SWITCH_UPSTREAM = "switch-upstream"
    SWITCH_DOWNSTREAM = "switch-downstream"
    PCI_BRIDGE = "pci-bridge"

    @property
    def is_bridge(self) -> bool:
        """Ports and bridges: they stay on their driver under passthrough."""
        return self not in (PciRole.ENDPOINT, PciRole.RCIEP)


#: PCIe capability "Device/Port Type" (flags bits 7:4) to role.
_PORT_TYPES: Mapping[int, PciRole] = {
    0x0: PciRole.ENDPOINT,
    0x1: PciRole.ENDPOINT,  # legacy endpoint
    0x4: PciRole.ROOT_PORT,
    0x5: PciRole.SWITCH_UPSTREAM,
    0x6: PciRole.SWITCH_DOWNSTREAM,
    0x7: PciRole.PCI_BRIDGE,  # PCIe-to-PCI bridge
    0x8: PciRole.PCI_BRIDGE,  # PCI-to-PCIe bridge: sits on conventional PCI
    0x9: PciRole.RCIEP,
    0xA: PciRole.RCIEP,  # root complex event collector: integrated, no port
}


class Locality(enum.IntEnum):
    """How two functions reach each other, as ``nvidia-smi topo -m`` says.

    Values are NVML's ``NVML_TOPOLOGY_*`` levels, so a smaller value is closer
    and levels compare with ``<``.
    """

    #: At most one PCIe bridge between them: one switch, or one device.
    PIX = 10
    #: Several bridges, but not the host bridge: nested switches.
    PXB = 20
    #: Through the CPU's host bridge: same root bus, different root ports.
    PHB = 30
    #: Between host bridges (root buses) of one NUMA node.
    NODE = 40
    #: Across the inter-socket link: different NUMA nodes.
    SYS = 50


@dataclass(frozen=True)
class TreePosition:
    """One function's place in the hierarchy.

    Attributes:
        address: the function.
        root_bus: the root bus it hangs off, ``pci0000:4a``; empty when the
            function is not below a PCI root bus in ``/sys/devices``.
        bridge_chain: the bridges above it, root port first, direct parent
            last.
        role: its role.
        numa_node: its NUMA node, -1 when unknown.
    """

    address: PciAddress
    root_bus: str
    bridge_chain: tuple[PciAddress, ...]
    role: PciRole
    numa_node: int


def locality(a: TreePosition, b: TreePosition) -> Locality:
    """The NVML topology level between two functions (HW_FACTS §4).

    Functions on different root buses are NODE apart when both are on one
    NUMA node and SYS otherwise; a node of -1 (unknown) matches only another
    -1, so an unknown node never reads closer than it may be. On one root bus,
    the bridges strictly between the two are counted: none or one is PIX,
    more is PXB, and a path with no common bridge goes through the host
    bridge (PHB).
    """
    if not a.root_bus or a.root_bus != b.root_bus:
        return Locality.NODE if a.numa_node == b.numa_node else Locality.SYS
    path_a = (*a.bridge_chain, a.address)
    path_b = (*b.bridge_chain, b.address)
    common = 0
    for x, y in zip(path_a, path_b, strict=False):
        if x != y:
            break
        common += 1
    if common == 0:
        return Locality.PHB
    # The lowest common ancestor and everything below it on either side,
    # minus the two functions themselves, is what a transfer crosses.
    between = (set(path_a[common - 1 :]) | set(path_b[common - 1 :])) - {a.address, b.address}
    return Locality.PIX if len(between) <= 1 else Locality.PXB


@dataclass(frozen=True)
class PcieTree:
    """Every function's position, with locality between any two.

    Attributes:
        positions: by address.
    """

    positions: Mapping[PciAddress, TreePosition]

    def position(self, address: PciAddress) -> TreePosition | None:
        """Where ``address`` sits, or None for an unknown function."""
        return self.positions.get(address)

    def locality(self, a: PciAddress, b: PciAddress) -> Locality:
        """The topology level between two functions.

        Raises:
            KeyError: either address is not a PCI function of this host.
        """
        return locality(self.positions[a], self.positions[b])

    def children(self, bridge: PciAddress) -> tuple[PciAddress, ...]:
        """Functions whose direct parent is ``bridge``."""
        return tuple(
            sorted(
                p.address
                for p in self.positions.values()
                if p.bridge_chain and p.bridge_chain[-1] == bridge
            )
        )


def _split_path(path: tuple[str, ...]) -> tuple[str, tuple[PciAddress, ...]]:
    """Root bus and bridge chain from a ``device_path``.

    The last ``pciDDDD:BB`` component is the root bus: behind an Intel VMD
    controller a second root bus (``pci10000:e0``) nests below an endpoint,
    and the devices there hang off that one.
    """
    root_at = -1
    for i, part in enumerate(path[:-1]):
        if _ROOT_BUS.match(part):
            root_at = i
    if root_at < 0:
        return "", ()
    chain = tuple(PciAddress(p) for p in path[root_at + 1 : -1] if is_pci_address(p))
    return path[root_at], chain


def config_port_role(config: bytes | None) -> PciRole | None:
    """The role a function's PCIe capability declares, if config space says.

    Only a root reader sees past the 64-byte header, where capabilities live;
    any shorter or malformed config space gives None.
    """
    if config is None or len(config) < 0x100:
        return None
    if not config[_STATUS] & _STATUS_CAP_LIST:
        return None
    pointer = config[_CAPABILITY_LIST] & 0xFC
    for _ in range(_MAX_CAPABILITIES):
        if pointer < _FIRST_CAPABILITY or pointer + 3 >= len(config):
            return None
        if config[pointer] == _CAP_ID_EXP:
            flags = config[pointer + 2] | (config[pointer + 3] << 8)
            return _PORT_TYPES.get((flags >> 4) & 0xF)
        pointer = config[pointer + 1] & 0xFC
    return None


def _tree_role(
    function: PciFunction,
    parent_role: PciRole | None,
    has_bridge_child: bool,
    has_child: bool,
) -> PciRole:
    """Role inferred from the tree alone (no config space)."""
    on_root_bus = parent_role is None
    if not function.is_bridge:
        return PciRole.RCIEP if on_root_bus else PciRole.ENDPOINT
    if (
        function.class_code == _SUBTRACTIVE_BRIDGE_CLASS
        or function.link is None
        or parent_role is PciRole.PCI_BRIDGE
    ):
        return PciRole.PCI_BRIDGE
    if on_root_bus:
        return PciRole.ROOT_PORT
    if parent_role is PciRole.SWITCH_UPSTREAM:
        return PciRole.SWITCH_DOWNSTREAM
    # Below a root or downstream port: a switch's upstream port, whose
    # children are its downstream ports. A PCIe-to-PCI bridge sits at the
    # same place but has conventional endpoints below it.
    if has_child and not has_bridge_child:
        return PciRole.PCI_BRIDGE
    return PciRole.SWITCH_UPSTREAM


def probe_tree(sysfs: Sysfs, functions: Iterable[PciFunction]) -> PcieTree:
    """Classify every function and record its root bus and bridge chain."""
    by_address = {f.address: f for f in functions}
    split = {a: _split_path(f.device_path) for a, f in by_address.items()}
    children: dict[PciAddress, list[PciAddress]] = {}
    for address, (_, chain) in split.items():
        if chain:
            children.setdefault(chain[-1], []).append(address)

    roles: dict[PciAddress, PciRole] = {}

    def role_of(address: PciAddress) -> PciRole:
        # Parents are classified first: a chain is root-port-first, so the
        # recursion depth is the depth of the hierarchy (a handful).
        if address in roles:
            return roles[address]
        function = by_address[address]
        declared = config_port_role(
            sysfs.read_bytes(sysfs.path("bus", "pci", "devices", address, "config"))
        )
        if declared is not None:
            roles[address] = declared
            return declared
        _, chain = split[address]
        parent = chain[-1] if chain else None
        parent_role = role_of(parent) if parent in by_address and parent is not None else None
        kids = children.get(address, [])
        role = _tree_role(
            function,
            parent_role,
            has_bridge_child=any(by_address[k].is_bridge for k in kids),
            has_child=bool(kids),
        )
        roles[address] = role
        return role

    positions = {
        address: TreePosition(
            address=address,
            root_bus=split[address][0],
            bridge_chain=split[address][1],
            role=role_of(address),
            numa_node=by_address[address].numa_node,
        )
        for address in sorted(by_address)
    }
    return PcieTree(positions)
