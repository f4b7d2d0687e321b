"""The cluster's PCIe topology as a graph, with the indexes placement reads.

One directed graph holds every host, shaped as the hardware is::

    host -> NUMA node -> PCIe root bus -> root port -> switch upstream port
         -> switch downstream port -> ... -> IOMMU group -> PCI function
                                                 PF -> IOMMU group -> VF

``TopologyGraph`` is a typed facade over a ``networkx.DiGraph``: node ids are
typed tuples and node data is a frozen ``TopologyNode``, so callers never read
raw attribute dicts. Hosts are upserted one at a time and only that host's
subgraph is rebuilt, because inventories change one host at a time while
requests read the whole cluster.

Pure: no I/O and nothing outside the scheduling core.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

import networkx as nx

from tessera.scheduler.core.host import HostView, PciFunctionView
from tessera.scheduler.core.identity import HostId, IommuGroupNumber, PciAddress
from tessera.scheduler.core.request import DeviceKind

# -- node ids ----------------------------------------------------------------

#: The host itself.
HostNodeId = tuple[Literal["host"], HostId]
#: A NUMA node of a host; -1 is the kernel's "no affinity".
NumaNodeId = tuple[Literal["numa"], HostId, int]
#: A PCIe root bus (host bridge), named as sysfs names it: "pci0000:40".
RootBusNodeId = tuple[Literal["rootbus"], HostId, str]
#: A PCI function, bridge or not: one node per address.
PciNodeId = tuple[Literal["pci"], HostId, PciAddress]
#: An IOMMU group of a host.
GroupNodeId = tuple[Literal["group"], HostId, IommuGroupNumber]
#: Any node of the graph.
NodeId = HostNodeId | NumaNodeId | RootBusNodeId | PciNodeId | GroupNodeId

#: The single attribute key the facade stores node data under.
_DATA: Final = "data"
#: The NUMA node of functions the kernel gives no affinity.
NO_NUMA: Final = -1


def host_node(host: HostId) -> HostNodeId:
    """Id of a host's node."""
    return ("host", host)


def numa_node(host: HostId, node: int) -> NumaNodeId:
    """Id of a NUMA node's node."""
    return ("numa", host, node)


def root_bus_node(host: HostId, root_bus: str) -> RootBusNodeId:
    """Id of a PCIe root bus's node."""
    return ("rootbus", host, root_bus)


def pci_node(host: HostId, address: PciAddress) -> PciNodeId:
    """Id of a PCI function's node (bridges included)."""
    return ("pci", host, address)


def group_node(host: HostId, group: IommuGroupNumber) -> GroupNodeId:
    """Id of an IOMMU group's node."""
    return ("group", host, group)


class NodeKind(enum.Enum):
    """What a node of the graph stands for."""

    HOST = "host"
    NUMA = "numa"
    ROOT_BUS = "root-bus"
    BRIDGE = "bridge"
    IOMMU_GROUP = "iommu-group"
    FUNCTION = "function"


@dataclass(frozen=True)
class TopologyNode:
    """The data of one node.

    Attributes:
        id: the node's id.
        kind: what the node stands for.
        host: the host it belongs to.
        function: the PCI function's view, for BRIDGE and FUNCTION nodes the
            inventory lists; None for bridges only known from a bridge chain
            (inventories may leave bridges out) and for every other kind.
    """

    id: NodeId
    kind: NodeKind
    host: HostId
    function: PciFunctionView | None = None


class Locality(enum.IntEnum):
    """How far apart two PCI functions are, as ``nvidia-smi topo -m`` says it.

    Ordered: a smaller value is closer, so ``a <= Locality.PXB`` reads as
    "no further than a switch fabric".
    """

    #: The same function ("X" in nvidia-smi).
    SELF = 0
    #: Through at most one bridge: below one switch (or one root port).
    PIX = 1
    #: Through several bridges, never the host bridge: nested switches.
    PXB = 2
    #: Through one PCIe host bridge: same root bus, different root ports.
    PHB = 3
    #: Between host bridges of one NUMA node.
    NODE = 4
    #: Across the SMP interconnect between NUMA nodes.
    SYS = 5


_EMPTY_CANDIDATES: Mapping[HostId, tuple[PciAddress, ...]] = MappingProxyType({})
_EMPTY_COUNTS: Mapping[HostId, int] = MappingProxyType({})


class UnknownHostError(KeyError):
    """A host the graph does not hold."""


class UnknownFunctionError(KeyError):
    """A PCI address the host's inventory does not list."""


class TopologyGraph:
    """Every host's PCIe topology, and the indexes requests read.

    Not thread-safe for concurrent writers. Readers get immutable results:
    the candidate indexes are replaced, never mutated, on upsert and remove,
    so a mapping handed to a scheduling pass stays consistent while the graph
    changes under it.
    """

    def __init__(self) -> None:
        """An empty graph."""
        self._g = nx.DiGraph()
        self._views: dict[HostId, HostView] = {}
        # Every node a host owns, so removal is O(host), not O(cluster).
        self._host_nodes: dict[HostId, frozenset[NodeId]] = {}
        # kind -> host -> whole-device addresses; copy-on-write (see class doc).
        self._candidates: dict[DeviceKind, Mapping[HostId, tuple[PciAddress, ...]]] = {}
        self._counts: dict[DeviceKind, Mapping[HostId, int]] = {}
        # host -> group -> members, every member the inventory places there.
        self._groups: dict[HostId, Mapping[IommuGroupNumber, tuple[PciAddress, ...]]] = {}

    # -- writes --------------------------------------------------------------

    def upsert_host(self, view: HostView) -> None:
        """Add a host, or replace everything known about it.

        Only the host's own nodes are removed and rebuilt; other hosts' nodes
        and index entries are left as they are.

        Args:
            view: the host's inventory as the scheduler sees it.
        """
        host = view.host_id
        if host in self._views:
            self._drop_graph(host)
        nodes = _build_host(view)
        for node_id, data, parents in nodes:
            self._g.add_node(node_id, **{_DATA: data})
            for parent in parents:
                self._g.add_edge(parent, node_id)
        self._host_nodes[host] = frozenset(n for n, _, _ in nodes)
        self._views[host] = view
        self._groups[host] = _group_members(view)
        for kind in DeviceKind:
            addrs = tuple(sorted(f.address for f in view.whole_devices(kind)))
            self._set_candidates(kind, host, addrs)

    def remove_host(self, host: HostId) -> None:
        """Forget a host: its nodes and its index entries.

        Args:
            host: the host to forget; unknown hosts are ignored, so removal
                is idempotent (a lease may expire twice).
        """
        if host not in self._views:
            return
        self._drop_graph(host)
        del self._views[host]
        del self._groups[host]
        for kind in DeviceKind:
            self._set_candidates(kind, host, ())

    def _drop_graph(self, host: HostId) -> None:
        self._g.remove_nodes_from(self._host_nodes.pop(host, frozenset()))

    def _set_candidates(
        self, kind: DeviceKind, host: HostId, addrs: tuple[PciAddress, ...]
    ) -> None:
        # Copy-on-write: O(hosts) per upsert, which is rare, so that reads
        # stay O(1) and a mapping already handed out never changes.
        old = self._candidates.get(kind, {})
        if old.get(host, ()) == addrs:
            return
        cands = dict(old)
        counts = dict(self._counts.get(kind, {}))
        if addrs:
            cands[host] = addrs
            counts[host] = len(addrs)
        else:
            # Hosts without candidates are left out, so a pass iterating the
            # index never visits a host that cannot serve the kind.
            cands.pop(host, None)
            counts.pop(host, None)
        self._candidates[kind] = MappingProxyType(cands)
        self._counts[kind] = MappingProxyType(counts)

    # -- hosts and nodes -----------------------------------------------------

    def hosts(self) -> tuple[HostId, ...]:
        """Hosts in the graph, sorted."""
        return tuple(sorted(self._views))

    def view(self, host: HostId) -> HostView:
        """The inventory a host was last upserted with.

        Raises:
            UnknownHostError: the host is not in the graph.
        """
        try:
            return self._views[host]
        except KeyError:
            raise UnknownHostError(host) from None

    def __contains__(self, node: object) -> bool:
        return node in self._g

    def node(self, node: NodeId) -> TopologyNode:
        """The data of a node.

        Raises:
            KeyError: no such node.
        """
        data: TopologyNode = self._g.nodes[node][_DATA]
        return data

    def nodes(self, host: HostId | None = None) -> frozenset[NodeId]:
        """Ids of one host's nodes, or of every node."""
        if host is None:
            return frozenset(self._g.nodes)
        return self._host_nodes.get(host, frozenset())

    def node_count(self, host: HostId | None = None) -> int:
        """How many nodes one host, or the whole graph, has."""
        if host is None:
            return int(self._g.number_of_nodes())
        return len(self._host_nodes.get(host, ()))

    def children(self, node: NodeId) -> tuple[NodeId, ...]:
        """Nodes directly below a node, sorted."""
        return tuple(sorted(self._g.successors(node)))

    def parents(self, node: NodeId) -> tuple[NodeId, ...]:
        """Nodes directly above a node, sorted.

        Usually one; an IOMMU group spanning several bridges (no ACS between
        them) has one per bridge.
        """
        return tuple(sorted(self._g.predecessors(node)))

    def ancestors(self, node: NodeId) -> frozenset[NodeId]:
        """Every node above a node, up to its host."""
        return frozenset(nx.ancestors(self._g, node))

    # -- accessors -----------------------------------------------------------

    def function(self, host: HostId, address: PciAddress) -> PciFunctionView:
        """The view of one PCI function.

        Raises:
            UnknownHostError: the host is not in the graph.
            UnknownFunctionError: the host's inventory does not list it.
        """
        try:
            return self.view(host).functions[address]
        except KeyError:
            raise UnknownFunctionError(f"{host}/{address}") from None

    def iommu_group_of(self, host: HostId, address: PciAddress) -> IommuGroupNumber | None:
        """The IOMMU group of a function; None when it has none (no IOMMU)."""
        return self.function(host, address).iommu_group

    def numa_of(self, host: HostId, address: PciAddress) -> int:
        """The NUMA node of a function; ``NO_NUMA`` when it has no affinity."""
        return self.function(host, address).numa_node

    def group_members(self, host: HostId, group: IommuGroupNumber) -> tuple[PciAddress, ...]:
        """Every member of an IOMMU group, bridges included, sorted.

        Bridges are included because they are what makes a group unsplittable;
        ``HostView.group_endpoints`` gives what passthrough binds.
        """
        self.view(host)
        return self._groups[host].get(group, ())

    def devices(self, host: HostId, kind: DeviceKind | None = None) -> tuple[PciAddress, ...]:
        """Non-bridge functions of a host, VFs included, sorted.

        Args:
            host: the host.
            kind: only functions of this kind; None for every non-bridge
                function, those of no tenant-facing kind (audio) included.
        """
        fns = self.view(host).functions.values()
        return tuple(
            sorted(
                f.address for f in fns if not f.role.is_bridge and (kind is None or f.kind is kind)
            )
        )

    def common_switch(self, host: HostId, a: PciAddress, b: PciAddress) -> PciAddress | None:
        """The nearest PCIe switch both functions sit below.

        Returns:
            The switch's upstream port, or None when the two meet no lower
            than a root port (or not at all).
        """
        fa, fb = self.function(host, a), self.function(host, b)
        shared = _common_prefix(self._path(host, fa), self._path(host, fb))
        # Switch upstream ports sit at odd indexes of a path (see
        # PciFunctionView.switch); the nearest shared one is the last.
        for i in range(len(shared) - 1, 0, -1):
            if i % 2 == 1:
                return shared[i]
        return None

    def pcie_distance(self, host: HostId, a: PciAddress, b: PciAddress) -> Locality:
        """How far apart two functions of a host are.

        Levels are those of ``nvidia-smi topo -m``, decided by where the two
        paths from the root meet:

        * below one shared bridge: PIX when the path crosses one bridge unit
          and PXB when it crosses several. A switch (its upstream port and
          downstream ports) counts as one unit, as NVML's "single PCIe
          switch" does: two GPUs on two downstream ports of one switch cross
          three bridge functions but are PIX. A root port counts as one unit.
        * same root bus, different root ports: PHB.
        * different root buses on the same NUMA node: NODE.
        * different NUMA nodes: SYS, also between nodes of one socket, since
          the path crosses the inter-node fabric all the same. A function
          with no NUMA affinity cannot be shown to share a node, so it is
          SYS from anything on another root bus.

        A bridge function counts as sitting below itself, so a root port is
        PIX from the functions directly below it.

        Raises:
            UnknownHostError: the host is not in the graph.
            UnknownFunctionError: either function is not in its inventory.
        """
        return pcie_distance(self.view(host), a, b)

    def _path(self, host: HostId, f: PciFunctionView) -> tuple[PciAddress, ...]:
        return _path(self.view(host), f)

    # -- hot-path indexes ----------------------------------------------------

    def whole_device_candidates(self, kind: DeviceKind) -> Mapping[HostId, tuple[PciAddress, ...]]:
        """Host -> functions of a kind that can be handed over whole, sorted.

        Whole means not a VF and not a bridge, as ``HostView.whole_devices``
        defines it. Hosts with none are absent. The mapping is immutable and
        is not changed by later upserts: O(1), taken once per request.
        """
        return self._candidates.get(kind, _EMPTY_CANDIDATES)

    def candidate_counts(self, kind: DeviceKind) -> Mapping[HostId, int]:
        """Host -> how many whole devices of a kind it has; hosts with none absent.

        Lets a request drop hosts with too few devices before looking at any.
        """
        return self._counts.get(kind, _EMPTY_COUNTS)


# -- distances without the graph ---------------------------------------------


def pcie_distance(view: HostView, a: PciAddress, b: PciAddress) -> Locality:
    """How far apart two functions of one host are, from its inventory alone.

    What :meth:`TopologyGraph.pcie_distance` answers (the levels are
    documented there), without a graph: the answer depends only on the
    functions' bridge chains, root buses and NUMA nodes, all in the view. So
    the placement engine computes it once per hardware class (every host of
    a class has the same PCIe tree) and never builds a graph on the hot path.

    Raises:
        UnknownFunctionError: either function is not in the view.
    """
    try:
        fa, fb = view.functions[a], view.functions[b]
    except KeyError as missing:
        raise UnknownFunctionError(f"{view.host_id}/{missing.args[0]}") from None
    if a == b:
        return Locality.SELF
    pa, pb = _path(view, fa), _path(view, fb)
    shared = len(_common_prefix(pa, pb))
    if shared:
        # The path crosses the meeting bridge and everything below it.
        units = {_unit(pa, i) for i in range(shared - 1, len(pa))}
        units |= {_unit(pb, i) for i in range(shared - 1, len(pb))}
        return Locality.PIX if len(units) <= 1 else Locality.PXB
    if _root_bus(view, fa) == _root_bus(view, fb):
        return Locality.PHB
    if fa.numa_node == fb.numa_node and fa.numa_node != NO_NUMA:
        return Locality.NODE
    return Locality.SYS


# -- building one host's subgraph --------------------------------------------


def _root_bus(view: HostView, f: PciFunctionView) -> str:
    """The root bus a function sits below.

    A root port sits on its root bus by definition, so below a root port the
    port decides: its own view's ``root_bus`` when listed, else the bus of
    its address. That keeps all functions behind one port on one root bus
    even when an inventory's per-function ``root_bus`` disagrees (the test
    topologies derive it from each function's own bus). A VF follows its PF.
    """
    chain = _chain(view, f)
    if not chain:
        return f.root_bus
    port = view.functions.get(chain[0])
    if port is not None and not port.bridge_chain:
        return port.root_bus
    return f"pci{chain[0][:4]}:{chain[0][5:7]}"


def _chain(view: HostView, f: PciFunctionView) -> tuple[PciAddress, ...]:
    # A VF sits where its PF does; inventories may leave its chain empty.
    if f.physfn is not None and not f.bridge_chain:
        pf = view.functions.get(f.physfn)
        if pf is not None:
            return pf.bridge_chain
    return f.bridge_chain


def _path(view: HostView, f: PciFunctionView) -> tuple[PciAddress, ...]:
    """Bridges from the root bus down to a function, the function if a bridge."""
    chain = _chain(view, f)
    return (*chain, f.address) if f.role.is_bridge else chain


def _common_prefix(a: tuple[PciAddress, ...], b: tuple[PciAddress, ...]) -> tuple[PciAddress, ...]:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def _unit(path: tuple[PciAddress, ...], i: int) -> PciAddress:
    """The bridge unit of position i: a root port, or a switch by its upstream port.

    Paths alternate root port, upstream, downstream, upstream, ...; a
    downstream port belongs to the upstream port just above it.
    """
    if i == 0 or i % 2 == 1:
        return path[i]
    return path[i - 1]


def _group_members(view: HostView) -> Mapping[IommuGroupNumber, tuple[PciAddress, ...]]:
    members: dict[IommuGroupNumber, set[PciAddress]] = {}
    for g, gv in view.iommu_groups.items():
        members.setdefault(g, set()).update(gv.members)
    # Functions are the authority on their own group even if the group table
    # lags them (it is read from a different sysfs tree).
    for f in view.functions.values():
        if f.iommu_group is not None:
            members.setdefault(f.iommu_group, set()).add(f.address)
    return MappingProxyType({g: tuple(sorted(m)) for g, m in members.items()})


_Built = tuple[NodeId, TopologyNode, tuple[NodeId, ...]]


def _build_host(view: HostView) -> list[_Built]:
    """Nodes of one host, each with its parents."""
    host = view.host_id
    out: dict[NodeId, tuple[TopologyNode, set[NodeId]]] = {}

    def add(node: NodeId, data: TopologyNode, parents: Iterable[NodeId] = ()) -> None:
        entry = out.setdefault(node, (data, set()))
        if entry[0].function is None and data.function is not None:
            # A bridge first met in a chain, then in the function list.
            out[node] = (data, entry[1])
        out[node][1].update(parents)

    hid = host_node(host)
    add(hid, TopologyNode(hid, NodeKind.HOST, host))
    for n in view.numa_nodes:
        nid = numa_node(host, n.node_id)
        add(nid, TopologyNode(nid, NodeKind.NUMA, host), (hid,))

    fns = view.functions
    bridges = {a for f in fns.values() for a in f.bridge_chain}
    bridges |= {a for a, f in fns.items() if f.role.is_bridge}

    def pci_data(addr: PciAddress) -> TopologyNode:
        kind = NodeKind.BRIDGE if addr in bridges else NodeKind.FUNCTION
        return TopologyNode(pci_node(host, addr), kind, host, fns.get(addr))

    # PCIe parent of each function: the PF for a VF, else the last bridge of
    # its chain, else its root bus.
    pcie_parent: dict[PciAddress, NodeId] = {}
    for addr in sorted(fns):
        f = fns[addr]
        nid = numa_node(host, f.numa_node)
        add(nid, TopologyNode(nid, NodeKind.NUMA, host), (hid,))
        bus = root_bus_node(host, _root_bus(view, f))
        add(bus, TopologyNode(bus, NodeKind.ROOT_BUS, host), (nid,))
        above: NodeId = bus
        for b in _chain(view, f):
            bid = pci_node(host, b)
            add(bid, pci_data(b), (above,))
            above = bid
        if f.physfn is not None:
            pf = pci_node(host, f.physfn)
            # A PF the inventory leaves out still anchors its VFs.
            add(pf, pci_data(f.physfn), (above,))
            above = pf
        pcie_parent[addr] = above

    for addr in sorted(fns):
        f = fns[addr]
        fid = pci_node(host, addr)
        if f.role.is_bridge or f.iommu_group is None:
            # A bridge stays in the PCIe tree even when it shares a group:
            # hanging it under its group would loop through its own children.
            add(fid, pci_data(addr), (pcie_parent[addr],))
            continue
        gid = group_node(host, f.iommu_group)
        add(gid, TopologyNode(gid, NodeKind.IOMMU_GROUP, host), (pcie_parent[addr],))
        add(fid, pci_data(addr), (gid,))

    # Groups whose members are all bridges hang where those bridges do.
    for g, members in _group_members(view).items():
        gid = group_node(host, g)
        if gid not in out:
            parents = [pcie_parent[m] for m in members if m in pcie_parent]
            add(gid, TopologyNode(gid, NodeKind.IOMMU_GROUP, host), parents or (hid,))

    return [(n, data, tuple(sorted(parents))) for n, (data, parents) in out.items()]
