"""The topology graph, as the spec states it, on the named test hosts."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.scheduler.core.host import (
    HostView,
    IommuGroupView,
    NumaNodeView,
    PciFunctionView,
    PciRole,
)
from tessera.scheduler.core.identity import HostId, IommuGroupNumber, PciAddress
from tessera.scheduler.core.request import DeviceKind
from tessera.scheduler.core.topology import (
    Locality,
    NodeKind,
    TopologyGraph,
    UnknownFunctionError,
    UnknownHostError,
    group_node,
    host_node,
    numa_node,
    pci_node,
    root_bus_node,
)

from .topologies import dgx, workstation

A = PciAddress
H = HostId
G = IommuGroupNumber

DGX = H("dgx")
WS = H("ws")
LAB = H("lab")


def fn(
    address: str,
    *,
    class_code: int = 0x030200,
    group: int | None = None,
    numa: int = 0,
    chain: tuple[str, ...] = (),
    role: PciRole = PciRole.ENDPOINT,
    root_bus: str | None = None,
    physfn: str | None = None,
) -> PciFunctionView:
    return PciFunctionView(
        address=A(address),
        vendor_id=0x10DE,
        device_id=0x20B0,
        class_code=class_code,
        driver="vfio-pci",
        numa_node=numa,
        iommu_group=G(group) if group is not None else None,
        role=role,
        root_bus=root_bus or "pci0000:" + address[5:7],
        bridge_chain=tuple(A(c) for c in chain),
        physfn=A(physfn) if physfn else None,
    )


def host(host_id: str, fns: list[PciFunctionView], numa: int = 1) -> HostView:
    groups: dict[IommuGroupNumber, list[PciAddress]] = {}
    for f in fns:
        if f.iommu_group is not None:
            groups.setdefault(f.iommu_group, []).append(f.address)
    dist = [tuple(10 if m == n else 21 for m in range(numa)) for n in range(numa)]
    return HostView(
        host_id=H(host_id),
        functions={f.address: f for f in fns},
        iommu_groups={g: IommuGroupView(g, tuple(m)) for g, m in groups.items()},
        numa_nodes=tuple(NumaNodeView(n, d) for n, d in enumerate(dist)),
    )


def lab(host_id: str = "lab") -> HostView:
    """A host with what the named ones lack.

    NUMA 0, root bus pci0000:00:
      00:01.0 ─ USP 01:00.0 ─ DSP 02:00.0 ─ GPU 03:00.0
                            └ DSP 02:01.0 ─ USP 04:00.0 ─ DSP 05:00.0 ─ GPU 06:00.0
    NUMA 0, root bus pci0000:40 (a second host bridge on the same node):
      40:01.0 ─ GPU 41:00.0
    NUMA 1, root bus pci0000:80:
      80:01.0 ─ NIC PF 81:00.0 (2 VFs 81:00.1, 81:00.2, a group each)
    No NUMA affinity, root bus pci0000:c0:
      c0:01.0 ─ accelerator c1:00.0
    """
    sw = ("0000:00:01.0", "0000:01:00.0")
    return host(
        host_id,
        [
            fn("0000:03:00.0", group=1, chain=(*sw, "0000:02:00.0"), root_bus="pci0000:00"),
            fn(
                "0000:06:00.0",
                group=2,
                chain=(*sw, "0000:02:01.0", "0000:04:00.0", "0000:05:00.0"),
                root_bus="pci0000:00",
            ),
            fn("0000:41:00.0", group=3, chain=("0000:40:01.0",), root_bus="pci0000:40"),
            fn("0000:81:00.0", class_code=0x020000, group=4, numa=1, chain=("0000:80:01.0",)),
            fn("0000:81:00.1", class_code=0x020000, group=5, numa=1, physfn="0000:81:00.0"),
            fn("0000:81:00.2", class_code=0x020000, group=6, numa=1, physfn="0000:81:00.0"),
            fn("0000:c1:00.0", class_code=0x120000, group=7, numa=-1, chain=("0000:c0:01.0",)),
        ],
        numa=2,
    )


def graph(*views: HostView) -> TopologyGraph:
    g = TopologyGraph()
    for v in views:
        g.upsert_host(v)
    return g


# -- locality ----------------------------------------------------------------


def test_dgx_pair_under_one_switch_is_pix() -> None:
    # 07 and 0f sit on two downstream ports of one switch: three bridge
    # functions between them, one switch, and a switch counts as one bridge.
    g = graph(dgx())
    assert g.pcie_distance(DGX, A("0000:07:00.0"), A("0000:0f:00.0")) is Locality.PIX
    assert g.common_switch(DGX, A("0000:07:00.0"), A("0000:0f:00.0")) == A("0000:07:f0.0")


def test_a_dgx_pair_hangs_off_the_root_bus_of_its_root_port() -> None:
    v = dgx()
    assert v.functions[A("0000:07:00.0")].root_bus == v.functions[A("0000:0f:00.0")].root_bus
    g = graph(v)
    bus = root_bus_node(DGX, "pci0000:00")
    for gpu in ("0000:07:00.0", "0000:0f:00.0"):
        assert bus in g.ancestors(pci_node(DGX, A(gpu)))
    assert g.parents(bus) == (numa_node(DGX, 3),)


def test_dgx_gpus_on_two_numa_nodes_of_one_socket_are_sys() -> None:
    # Every dgx pair has its own NUMA node, so no two dgx GPUs are NODE:
    # nodes 3 and 1 share a socket, but the path still crosses the fabric.
    v = dgx()
    g = graph(v)
    assert v.socket_of(3) == v.socket_of(1)
    assert g.pcie_distance(DGX, A("0000:07:00.0"), A("0000:47:00.0")) is Locality.SYS
    gpus = g.devices(DGX, DeviceKind.GPU)
    levels = {g.pcie_distance(DGX, a, b) for a in gpus for b in gpus if a != b}
    assert levels == {Locality.PIX, Locality.SYS}


def test_dgx_gpus_on_two_sockets_are_sys() -> None:
    v = dgx()
    assert v.socket_of(3) != v.socket_of(7)
    g = graph(v)
    assert g.pcie_distance(DGX, A("0000:07:00.0"), A("0000:87:00.0")) is Locality.SYS
    assert g.common_switch(DGX, A("0000:07:00.0"), A("0000:87:00.0")) is None


def test_workstation_gpus_on_two_root_ports_of_one_host_bridge_are_phb() -> None:
    g = graph(workstation())
    assert g.pcie_distance(WS, A("0000:01:00.0"), A("0000:02:00.0")) is Locality.PHB
    assert g.common_switch(WS, A("0000:01:00.0"), A("0000:02:00.0")) is None


def test_functions_of_one_device_and_their_root_port_are_pix() -> None:
    g = graph(workstation())
    assert g.pcie_distance(WS, A("0000:01:00.0"), A("0000:01:00.1")) is Locality.PIX
    assert g.pcie_distance(WS, A("0000:00:01.0"), A("0000:01:00.0")) is Locality.PIX
    assert g.pcie_distance(WS, A("0000:01:00.0"), A("0000:01:00.0")) is Locality.SELF


def test_nested_switches_are_pxb() -> None:
    g = graph(lab())
    assert g.pcie_distance(LAB, A("0000:03:00.0"), A("0000:06:00.0")) is Locality.PXB
    # The nearest switch both are below is the outer one.
    assert g.common_switch(LAB, A("0000:03:00.0"), A("0000:06:00.0")) == A("0000:01:00.0")


def test_two_host_bridges_of_one_numa_node_are_node() -> None:
    g = graph(lab())
    assert g.pcie_distance(LAB, A("0000:03:00.0"), A("0000:41:00.0")) is Locality.NODE


def test_no_numa_affinity_is_never_shown_to_be_node() -> None:
    g = graph(lab())
    assert g.pcie_distance(LAB, A("0000:41:00.0"), A("0000:c1:00.0")) is Locality.SYS


def test_a_vf_is_pix_from_its_pf_and_its_sibling() -> None:
    g = graph(lab())
    assert g.pcie_distance(LAB, A("0000:81:00.0"), A("0000:81:00.1")) is Locality.PIX
    assert g.pcie_distance(LAB, A("0000:81:00.1"), A("0000:81:00.2")) is Locality.PIX
    assert g.pcie_distance(LAB, A("0000:81:00.1"), A("0000:03:00.0")) is Locality.SYS


def test_locality_is_symmetric_and_ordered() -> None:
    g = graph(lab())
    fns = g.devices(LAB)
    for a in fns:
        for b in fns:
            assert g.pcie_distance(LAB, a, b) == g.pcie_distance(LAB, b, a)
    assert Locality.PIX < Locality.PXB < Locality.PHB < Locality.NODE < Locality.SYS


# -- shape and accessors -----------------------------------------------------


def test_dgx_gpu_hangs_below_its_bridges_and_group() -> None:
    g = graph(dgx())
    gpu = pci_node(DGX, A("0000:07:00.0"))
    assert g.node(gpu).kind is NodeKind.FUNCTION
    assert g.parents(gpu) == (group_node(DGX, G(11)),)
    assert g.parents(group_node(DGX, G(11))) == (pci_node(DGX, A("0000:07:f1.0")),)
    chain = [pci_node(DGX, A(a)) for a in ("0000:00:01.1", "0000:07:f0.0", "0000:07:f1.0")]
    for b in chain:
        # Bridges the inventory leaves out are still nodes, with no view.
        assert g.node(b).kind is NodeKind.BRIDGE
        assert g.node(b).function is None
    assert g.ancestors(gpu) == {
        host_node(DGX),
        numa_node(DGX, 3),
        root_bus_node(DGX, "pci0000:00"),
        group_node(DGX, G(11)),
        *chain,
    }


def test_vfs_hang_under_their_pf() -> None:
    g = graph(lab())
    pf = pci_node(LAB, A("0000:81:00.0"))
    vf = pci_node(LAB, A("0000:81:00.1"))
    assert g.parents(vf) == (group_node(LAB, G(5)),)
    assert g.parents(group_node(LAB, G(5))) == (pf,)
    assert pf in g.ancestors(vf)


def test_a_listed_bridge_stays_in_the_pcie_tree_though_it_shares_a_group() -> None:
    # Workstation root ports share their GPU's group (no ACS); the port is
    # the group's parent, not its child, so the graph has no cycle.
    g = graph(workstation())
    port = pci_node(WS, A("0000:00:01.0"))
    assert g.node(port).kind is NodeKind.BRIDGE
    assert g.node(port).function is not None
    assert g.parents(group_node(WS, G(1))) == (port,)
    assert port not in g.ancestors(port)


def test_accessors() -> None:
    g = graph(workstation(), dgx())
    assert g.hosts() == (DGX, WS)
    assert g.iommu_group_of(WS, A("0000:01:00.1")) == 1
    assert g.numa_of(DGX, A("0000:b7:00.0")) == 5
    assert g.group_members(WS, G(1)) == (
        A("0000:00:01.0"),
        A("0000:01:00.0"),
        A("0000:01:00.1"),
    )
    assert g.group_members(WS, G(99)) == ()
    assert g.devices(WS) == (
        A("0000:01:00.0"),
        A("0000:01:00.1"),
        A("0000:02:00.0"),
        A("0000:02:00.1"),
    )
    assert g.devices(WS, DeviceKind.GPU) == (A("0000:01:00.0"), A("0000:02:00.0"))
    assert g.devices(WS, DeviceKind.NIC) == ()


def test_unknown_host_and_function_raise() -> None:
    g = graph(workstation())
    with pytest.raises(UnknownHostError):
        g.devices(DGX)
    with pytest.raises(UnknownFunctionError):
        g.numa_of(WS, A("0000:99:00.0"))
    with pytest.raises(UnknownHostError):
        g.group_members(DGX, G(1))


# -- incremental maintenance -------------------------------------------------


def test_upserting_a_changed_host_replaces_only_its_nodes() -> None:
    g = graph(workstation(), dgx())
    dgx_nodes = g.nodes(DGX)
    dgx_data = {n: g.node(n) for n in dgx_nodes}
    total = g.node_count()

    g.upsert_host(workstation())
    assert g.node_count() == total  # same inventory, same graph

    ws = workstation()
    moved = replace(ws.functions[A("0000:02:00.0")], numa_node=1)
    g.upsert_host(replace(ws, functions={**ws.functions, moved.address: moved}))
    assert g.nodes(DGX) == dgx_nodes
    assert all(g.node(n) is dgx_data[n] for n in dgx_nodes)  # not rebuilt
    assert g.numa_of(WS, A("0000:02:00.0")) == 1
    assert numa_node(WS, 1) in g.ancestors(pci_node(WS, A("0000:02:00.0")))
    # The NUMA node appears and no other node does.
    assert g.node_count() == total + 1


def test_removing_a_host_leaves_nothing_of_it() -> None:
    g = graph(workstation(), dgx())
    dgx_count = g.node_count(DGX)
    g.remove_host(WS)
    assert all(g.node(n).host == DGX for n in g.nodes())
    assert g.node_count() == dgx_count
    assert g.hosts() == (DGX,)
    assert WS not in g.whole_device_candidates(DeviceKind.GPU)
    assert WS not in g.candidate_counts(DeviceKind.GPU)
    g.remove_host(WS)  # idempotent
    g.remove_host(DGX)
    assert g.node_count() == 0
    assert g.whole_device_candidates(DeviceKind.GPU) == {}


def test_candidate_index_handed_out_does_not_change_under_the_reader() -> None:
    g = graph(workstation())
    before = g.whole_device_candidates(DeviceKind.GPU)
    g.upsert_host(dgx())
    g.remove_host(WS)
    assert dict(before) == {WS: (A("0000:01:00.0"), A("0000:02:00.0"))}
    assert set(g.whole_device_candidates(DeviceKind.GPU)) == {DGX}
    assert g.candidate_counts(DeviceKind.GPU) == {DGX: 8}


def test_candidates_leave_out_vfs_bridges_and_hosts_without_any() -> None:
    g = graph(lab(), workstation())
    assert g.whole_device_candidates(DeviceKind.NIC) == {LAB: (A("0000:81:00.0"),)}
    assert g.whole_device_candidates(DeviceKind.ACCELERATOR) == {LAB: (A("0000:c1:00.0"),)}
    assert g.candidate_counts(DeviceKind.GPU) == {LAB: 3, WS: 2}


# -- indexes agree with a scan -----------------------------------------------

_HOSTS = {v.host_id: v for v in (workstation(), dgx(), lab())}


def _subset(view: HostView, keep: frozenset[PciAddress]) -> HostView:
    fns = {a: f for a, f in view.functions.items() if a in keep}
    groups = {
        g: IommuGroupView(g, tuple(m for m in gv.members if m in keep))
        for g, gv in view.iommu_groups.items()
    }
    return replace(view, functions=fns, iommu_groups=groups)


def _scan(views: dict[HostId, HostView], kind: DeviceKind) -> dict[HostId, tuple[PciAddress, ...]]:
    out = {}
    for h, v in views.items():
        addrs = tuple(
            sorted(
                f.address
                for f in v.functions.values()
                if f.physfn is None and not f.role.is_bridge and f.kind is kind
            )
        )
        if addrs:
            out[h] = addrs
    return out


@st.composite
def _ops(draw: st.DrawFn) -> list[tuple[HostId, HostView | None]]:
    """Upserts of random subsets of the named hosts' functions, and removals."""
    ops: list[tuple[HostId, HostView | None]] = []
    for _ in range(draw(st.integers(1, 8))):
        h = draw(st.sampled_from(sorted(_HOSTS)))
        if draw(st.booleans()) and draw(st.booleans()):
            ops.append((h, None))
            continue
        keep = draw(st.sets(st.sampled_from(sorted(_HOSTS[h].functions))))
        ops.append((h, _subset(_HOSTS[h], frozenset(keep))))
    return ops


@settings(max_examples=200, deadline=None)
@given(_ops())
def test_indexes_agree_with_a_brute_force_scan(ops: list[tuple[HostId, HostView | None]]) -> None:
    g = TopologyGraph()
    live: dict[HostId, HostView] = {}
    for h, v in ops:
        if v is None:
            g.remove_host(h)
            live.pop(h, None)
        else:
            g.upsert_host(v)
            live[h] = v
    assert g.hosts() == tuple(sorted(live))
    for kind in DeviceKind:
        expected = _scan(live, kind)
        assert dict(g.whole_device_candidates(kind)) == expected
        assert dict(g.candidate_counts(kind)) == {h: len(a) for h, a in expected.items()}
    # The graph matches a graph built from scratch from what is live: no
    # node of a removed or replaced inventory lingers.
    fresh = graph(*live.values())
    assert g.nodes() == fresh.nodes()
    for h, v in live.items():
        for a, f in v.functions.items():
            assert g.iommu_group_of(h, a) == f.iommu_group
            assert host_node(h) in g.ancestors(pci_node(h, a))
            members = g.group_members(h, f.iommu_group) if f.iommu_group is not None else ()
            assert f.iommu_group is None or a in members
