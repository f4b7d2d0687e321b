"""A host's topology as the dashboard draws it, and who holds what in it.

Spec (``scheduler.dashboard.topology_tree``):

* One root per NUMA node, in order; below it the root bus, the bridges from
  the root port down (switch ports included), the IOMMU group, then the
  functions. VFs are no nodes of their own: they are listed on their PF.
* Each function says who holds it: ``free``, ``held`` (whole, or every unit
  of it), ``partly``, ``host`` (the host uses it), ``quarantined`` (a
  placement holding it failed its teardown) or ``other`` (offered to nobody).
  Its holders name the placement, its tenant and its state.
* An SR-IOV PF lists each VF with its holder; an mdev parent each type with
  its instances, live or allocated, each once (a live one nobody placed has
  no holder); a MIG GPU its 8 memory slices as runs (free, or an instance
  with its holder) and, per profile of its table (the ``+me`` variants
  aside), how many more fit alone and at which first slices. A GPU in MIG
  mode handed over whole has no slices to offer, so no MIG map.

Most tests draw ``mixed()`` of ``tests/scheduler/core/checker_topologies``::

    NUMA 0: root 00:01.0 ─ USP 01:00.0 ─┬ DSP 02:00.0 ─ GPU 03:00.0 (group 10)
                                         └ DSP 02:01.0 ─ GPU 04:00.0 (group 11)
            root 00:06.0 ─ GPU 40:00.0 (group 50, the host's boot display)
            root 00:07.0 ─ GPU 50:00.0 + USB 50:01.0 (group 60)
    NUMA 1: root 00:02.0 ─ NIC PF 10:00.0 (group 20, SR-IOV, 8 VFs, none enabled)
            root 00:03.0 ─ NIC PF 11:00.0 (group 21, VFs 11:00.1 group 22 and
                           11:00.2 group 23 enabled)
    NUMA 2: root 00:04.0 ─ GPU 20:00.0 (group 30, mdev parent: nvidia-1, nvidia-2)
            root 00:05.0 ─ GPU 21:00.0 (group 31, mdev parent, one live nvidia-1)
            root 00:08.0 ─ GPU 30:00.0 (group 40, H100 in MIG mode, a live
                           3g.40gb on slices 4-7)

MIG expectations are worked out by hand from the tables in
``scheduler/core/mig.py``: a 1g (profile 19) goes at any one slice 0-6, a
1g double-memory (15) at 0, 2, 4 or 6 on two slices, a 2g (14) at 0, 2 or 4
on two, a 3g (9) at 0 or 4 on four, a 4g (5) at 0 on four, a 7g (0) at 0 on
all eight; 7 compute slices per GPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

from tessera.scheduler.core.host import GpuView, HostView
from tessera.scheduler.core.host_usage import host_usage
from tessera.scheduler.core.identity import (
    IommuGroupNumber,
    PciAddress,
    PlacementId,
    SlotKey,
    TenantName,
    iommu_group_slot,
)
from tessera.scheduler.core.mig import MIG_TABLES, GpuInstance
from tessera.scheduler.core.mig_geometry import MEMORY_SLICES, MigLayout
from tessera.scheduler.core.occupancy import build_occupancy
from tessera.scheduler.core.slots import MigSlot, mdev_slot, mig_slot, parse_slot, vf_slot
from tessera.scheduler.core.snapshot import HostState
from tessera.scheduler.dashboard.topology_tree import (
    Holder,
    MdevTypeRow,
    MigCell,
    MigFit,
    MigMap,
    TreeNode,
    VfCell,
    host_tree,
    mig_map,
)

from ..core.checker_topologies import (
    A100,
    GPU_A,
    GPU_B,
    GPU_HOST_USE,
    GPU_WITH_USB,
    LIVE_MDEV_UUID,
    MDEV_GPU,
    MDEV_SINGLE,
    MIG_GPU,
    PF_EMPTY,
    PF_ENABLED,
    USB,
    VF_0,
    VF_1,
    gpu_host,
    mixed,
)

#: The first GPU of a ``gpu_host`` (group 100).
FIRST_GPU = PciAddress("0000:81:00.0")

#: The profiles a map lists: the table's, less the media-extension variants.
H100_LISTED = [str(p.name) for p in MIG_TABLES["H100-80GB"] if "+" not in p.name]
A100_40_LISTED = [str(p.name) for p in MIG_TABLES["A100-SXM4-40GB"] if "+" not in p.name]


def state_of(
    view: HostView,
    allocations: Mapping[str, str] | None = None,
    tenants: Mapping[str, str] | None = None,
) -> HostState:
    """``view`` with slots held (slot -> placement) by tenants (placement -> tenant)."""
    return HostState(
        view,
        1,
        allocations={SlotKey(k): PlacementId(p) for k, p in (allocations or {}).items()},
        tenants={PlacementId(p): TenantName(t) for p, t in (tenants or {}).items()},
    )


def tree(state: HostState, placement_states: Mapping[str, str] | None = None) -> list[TreeNode]:
    occupancy = build_occupancy(state)
    return host_tree(state, occupancy, host_usage(state, occupancy), placement_states or {})


def walk(nodes: Sequence[TreeNode]) -> Iterator[TreeNode]:
    for node in nodes:
        yield node
        yield from walk(node.children)


def leaf(nodes: Sequence[TreeNode], address: str) -> TreeNode:
    [found] = [n for n in walk(nodes) if n.kind == "function" and n.label == address]
    return found


def outline(node: TreeNode, depth: int = 0) -> list[str]:
    """The tree as indented lines: ``kind label``, and ``[status]`` for functions."""
    status = f" [{node.status}]" if node.status else ""
    lines = ["  " * depth + f"{node.kind} {node.label}{status}"]
    for child in node.children:
        lines += outline(child, depth + 1)
    return lines


def holder(placement: str, tenant: str, state: str = "ready") -> Holder:
    return Holder(PlacementId(placement), TenantName(tenant), state)


def group(number: int) -> str:
    return iommu_group_slot(IommuGroupNumber(number))


def a100_in_mig_mode(instances: tuple[GpuInstance, ...] = ()) -> HostView:
    """One A100-SXM4-40GB in MIG mode, alone on its root port (group 100)::

    NUMA 0: root 00:01.0 ─ GPU 81:00.0 (group 100, A100 40GB, MIG on)
    """
    view = gpu_host("a100", mig=[instances])
    gpu = GpuView(
        FIRST_GPU,
        A100,
        mig_enabled=True,
        mig_profiles=MIG_TABLES["A100-SXM4-40GB"],
        gpu_instances=instances,
    )
    fn = replace(view.functions[FIRST_GPU], model=A100)
    return replace(view, functions={**view.functions, FIRST_GPU: fn}, gpus={FIRST_GPU: gpu})


# -- the levels ----------------------------------------------------------------------


def test_the_tree_goes_numa_node_root_bus_bridges_group_function() -> None:
    """NUMA node 0 of ``mixed()``: a switch under root port 00:01.0, two plain root ports.

    The GPU at 03:00.0 is held whole; the USB controller shares group 60 with
    a GPU but is offered to nobody (``other``).
    """
    roots = tree(state_of(mixed(), {group(10): "pl-1"}, {"pl-1": "acme"}), {"pl-1": "ready"})
    assert [r.label for r in roots] == ["NUMA node 0", "NUMA node 1", "NUMA node 2"]
    assert all(r.kind == "numa" for r in roots)
    assert outline(roots[0]) == [
        "numa NUMA node 0",
        "  bus root bus pci0000:00",
        "    bridge 0000:00:01.0",
        "      bridge 0000:01:00.0",
        "        bridge 0000:02:00.0",
        "          group IOMMU group 10",
        f"            function {GPU_A} [held]",
        "        bridge 0000:02:01.0",
        "          group IOMMU group 11",
        f"            function {GPU_B} [free]",
        "    bridge 0000:00:06.0",
        "      group IOMMU group 50",
        f"        function {GPU_HOST_USE} [host]",
        "    bridge 0000:00:07.0",
        "      group IOMMU group 60",
        f"        function {GPU_WITH_USB} [free]",
        f"        function {USB} [other]",
    ]
    # A bridge says what it is.
    details = {n.label: n.detail for n in walk(roots) if n.kind == "bridge"}
    assert details["0000:00:01.0"] == "root-port"
    assert details["0000:01:00.0"] == "switch-upstream"
    assert details["0000:02:00.0"] == details["0000:02:01.0"] == "switch-downstream"


def test_bridges_are_drawn_as_levels_not_as_functions_and_vfs_only_on_their_pf() -> None:
    roots = tree(state_of(mixed()))
    functions = {n.label for n in walk(roots) if n.kind == "function"}
    assert functions == {
        GPU_A, GPU_B, GPU_HOST_USE, GPU_WITH_USB, USB,
        PF_EMPTY, PF_ENABLED, MDEV_GPU, MDEV_SINGLE, MIG_GPU,
    }  # fmt: skip
    assert VF_0 not in functions and VF_1 not in functions
    assert outline(roots[1]) == [
        "numa NUMA node 1",
        "  bus root bus pci0000:00",
        "    bridge 0000:00:02.0",
        "      group IOMMU group 20",
        f"        function {PF_EMPTY} [free]",
        "    bridge 0000:00:03.0",
        "      group IOMMU group 21",
        f"        function {PF_ENABLED} [partly]",  # VFs enabled: it cannot go whole
    ]


def test_a_function_on_no_numa_node_is_drawn_under_numa_node_minus_1_first() -> None:
    """Two A100s; the kernel knows no NUMA node for the second (``numa_node`` -1)."""
    view = gpu_host("h", plain=2)
    second = PciAddress("0000:82:00.0")
    loose = replace(view.functions[second], numa_node=-1)
    roots = tree(state_of(replace(view, functions={**view.functions, second: loose})))
    assert [r.label for r in roots] == ["NUMA node -1", "NUMA node 0"]
    assert outline(roots[0]) == [
        "numa NUMA node -1",
        "  bus root bus pci0000:00",
        "    bridge 0000:00:02.0",
        "      group IOMMU group 101",
        f"        function {second} [free]",
    ]


def test_a_function_in_no_iommu_group_is_drawn_under_no_iommu_group() -> None:
    """A host without an IOMMU: its functions have no group (nothing can be passed through)."""
    view = gpu_host("h", plain=1)
    bare = replace(view.functions[FIRST_GPU], iommu_group=None)
    view = replace(view, functions={**view.functions, FIRST_GPU: bare}, iommu_groups={})
    assert outline(tree(state_of(view))[0]) == [
        "numa NUMA node 0",
        "  bus root bus pci0000:00",
        "    bridge 0000:00:01.0",
        "      group no IOMMU group",
        f"        function {FIRST_GPU} [free]",
    ]


# -- who holds a function ------------------------------------------------------------


def test_a_function_held_whole_shows_held_with_its_tenant_and_placement() -> None:
    state = state_of(mixed(), {group(10): "pl-1"}, {"pl-1": "acme"})
    gpu = leaf(tree(state, {"pl-1": "ready"}), GPU_A)
    assert gpu.status == "held"
    assert gpu.holders == (holder("pl-1", "acme"),)
    assert not gpu.holders[0].quarantined
    assert A100 in gpu.detail
    # Its neighbours are untouched.
    assert leaf(tree(state, {"pl-1": "ready"}), GPU_B).holders == ()


def test_a_held_placement_whose_teardown_failed_shows_quarantined() -> None:
    state = state_of(mixed(), {group(10): "pl-1"}, {"pl-1": "acme"})
    gpu = leaf(tree(state, {"pl-1": "failed"}), GPU_A)
    assert gpu.status == "quarantined"
    assert gpu.holders == (holder("pl-1", "acme", "failed"),)
    assert gpu.holders[0].quarantined


def test_one_failed_placement_among_several_on_a_pf_quarantines_it() -> None:
    state = state_of(
        mixed(),
        {vf_slot(PF_ENABLED, 0): "pl-ok", vf_slot(PF_ENABLED, 1): "pl-bad"},
        {"pl-ok": "acme", "pl-bad": "blue"},
    )
    pf = leaf(tree(state, {"pl-ok": "ready", "pl-bad": "failed"}), PF_ENABLED)
    assert pf.status == "quarantined"
    assert pf.holders == (holder("pl-bad", "blue", "failed"), holder("pl-ok", "acme"))
    # Once both are ready it is simply partly held (2 of its 8 VFs).
    pf = leaf(tree(state, {"pl-ok": "ready", "pl-bad": "ready"}), PF_ENABLED)
    assert pf.status == "partly"


def test_the_host_s_own_device_shows_host_and_no_holder() -> None:
    display = leaf(tree(state_of(mixed())), GPU_HOST_USE)
    assert (display.status, display.holders) == ("host", ())
    assert "boot display" in display.detail


# -- SR-IOV --------------------------------------------------------------------------


def test_an_sriov_pf_lists_each_vf_with_its_holder() -> None:
    state = state_of(mixed(), {vf_slot(PF_ENABLED, 1): "pl-vf"}, {"pl-vf": "blue"})
    pf = leaf(tree(state, {"pl-vf": "ready"}), PF_ENABLED)
    assert pf.vfs == (
        VfCell(0, VF_0, 22, None),
        VfCell(1, VF_1, 23, holder("pl-vf", "blue")),
    )
    assert pf.status == "partly"  # one VF of eight
    assert pf.holders == (holder("pl-vf", "blue"),)


def test_a_pf_with_no_vf_enabled_lists_none_and_other_functions_carry_no_vfs() -> None:
    roots = tree(state_of(mixed()))
    assert leaf(roots, PF_EMPTY).vfs == ()
    assert leaf(roots, GPU_A).vfs == ()


# -- mdev ----------------------------------------------------------------------------


def test_an_mdev_parent_lists_its_types_and_instances_with_their_holders() -> None:
    """GPU 21:00.0: a live nvidia-1 someone made outside Tessera, and one Tessera placed."""
    state = state_of(mixed(), {mdev_slot(MDEV_SINGLE, "nvidia-1", "u-2"): "pl-m"}, {"pl-m": "acme"})
    parent = leaf(tree(state, {"pl-m": "ready"}), MDEV_SINGLE)
    assert [(r.type_id, r.max_instances) for r in parent.mdev] == [("nvidia-1", 4), ("nvidia-2", 2)]
    nvidia_1, nvidia_2 = parent.mdev
    assert nvidia_1.instances == ((LIVE_MDEV_UUID, None), ("u-2", holder("pl-m", "acme")))
    assert nvidia_2.instances == ()
    assert parent.status == "partly"  # two of four nvidia-1
    assert parent.holders == (holder("pl-m", "acme"),)


def test_an_mdev_the_agent_made_for_a_placement_is_listed_once_with_its_holder() -> None:
    state = state_of(
        mixed(), {mdev_slot(MDEV_SINGLE, "nvidia-1", LIVE_MDEV_UUID): "pl-m"}, {"pl-m": "acme"}
    )
    parent = leaf(tree(state, {"pl-m": "ready"}), MDEV_SINGLE)
    assert parent.mdev[0].instances == ((LIVE_MDEV_UUID, holder("pl-m", "acme")),)


def test_an_untouched_mdev_parent_lists_its_types_without_instances() -> None:
    parent = leaf(tree(state_of(mixed())), MDEV_GPU)
    assert parent.status == "free"
    assert [(r.type_id, r.max_instances, r.instances) for r in parent.mdev] == [
        ("nvidia-1", 4, ()),
        ("nvidia-2", 2, ()),
    ]
    assert all(isinstance(r, MdevTypeRow) for r in parent.mdev)


# -- MIG -----------------------------------------------------------------------------


def covers_every_slice(cells: Sequence[MigCell]) -> bool:
    """Runs in order, end to end, from slice 0 to slice 7."""
    at = 0
    for cell in cells:
        if cell.start != at or cell.size < 1:
            return False
        at += cell.size
    return at == MEMORY_SLICES


def test_a_mig_gpu_shows_its_slices_the_instances_placed_and_what_more_fits() -> None:
    """The H100 of ``mixed()``: a live 3g.40gb on 4-7, and a 1g.10gb Tessera placed on 0::

    slice:  0 | 1 2 3 | 4 5 6 7
            1g  free    3g.40gb (live, nobody's)
    """
    state = state_of(mixed(), {mig_slot(MIG_GPU, 19, 0, 1): "pl-g"}, {"pl-g": "cyan"})
    gpu = leaf(tree(state, {"pl-g": "ready"}), MIG_GPU)
    assert gpu.mig is not None
    assert gpu.mig.cells == (
        MigCell(0, 1, "1g.10gb", holder("pl-g", "cyan")),
        MigCell(1, 3),
        MigCell(4, 4, "3g.40gb", None),
    )
    assert covers_every_slice(gpu.mig.cells)
    assert [c.free for c in gpu.mig.cells] == [False, True, False]
    assert gpu.mig.compute_used == 1 + 3
    assert [f.profile for f in gpu.mig.fits] == H100_LISTED
    assert gpu.mig.fits == (
        # Slices 1, 2, 3 are free; 3 compute slices are left.
        MigFit("1g.10gb", 3, (1, 2, 3)),
        MigFit("1g.20gb", 1, (2,)),  # (0,2) is half taken, (4,2) and (6,2) by the 3g
        MigFit("2g.20gb", 1, (2,)),
        MigFit("3g.40gb", 0, ()),  # (0,4) overlaps the 1g, (4,4) is the 3g's
        MigFit("4g.40gb", 0, ()),
        MigFit("7g.80gb", 0, ()),
    )
    assert gpu.status == "partly"
    assert gpu.holders == (holder("pl-g", "cyan"),)


def test_a_mig_instance_of_a_failed_placement_quarantines_its_gpu() -> None:
    state = state_of(mixed(), {mig_slot(MIG_GPU, 19, 0, 1): "pl-g"}, {"pl-g": "cyan"})
    gpu = leaf(tree(state, {"pl-g": "failed"}), MIG_GPU)
    assert gpu.status == "quarantined"
    assert gpu.mig is not None
    assert gpu.mig.cells[0].holder == holder("pl-g", "cyan", "failed")


def test_an_idle_a100_40gb_offers_every_profile_at_every_start_of_its_table() -> None:
    gpu = leaf(tree(state_of(a100_in_mig_mode())), FIRST_GPU)
    assert gpu.status == "free"
    assert gpu.mig == MigMap(
        cells=(MigCell(0, 8),),
        fits=(
            MigFit("1g.5gb", 7, (0, 1, 2, 3, 4, 5, 6)),  # never at slice 7
            MigFit("1g.10gb", 4, (0, 2, 4, 6)),
            MigFit("2g.10gb", 3, (0, 2, 4)),
            MigFit("3g.20gb", 2, (0, 4)),
            MigFit("4g.20gb", 1, (0,)),
            MigFit("7g.40gb", 1, (0,)),
        ),
        compute_used=0,
    )
    assert [f.profile for f in gpu.mig.fits] == A100_40_LISTED


def test_an_a100_with_a_4g_placed_offers_only_the_upper_half() -> None:
    """A 4g.20gb (4 compute slices) Tessera placed on 0-3; 3 compute slices left::

    slice:  0 1 2 3 | 4 5 6 7
            4g.20gb   free
    """
    state = state_of(a100_in_mig_mode(), {mig_slot(FIRST_GPU, 5, 0, 4): "pl-4g"}, {"pl-4g": "acme"})
    gpu = leaf(tree(state, {"pl-4g": "ready"}), FIRST_GPU)
    assert gpu.mig is not None
    assert gpu.mig.cells == (MigCell(0, 4, "4g.20gb", holder("pl-4g", "acme")), MigCell(4, 4))
    assert gpu.mig.compute_used == 4
    assert gpu.mig.fits == (
        MigFit("1g.5gb", 3, (4, 5, 6)),
        MigFit("1g.10gb", 2, (4, 6)),
        MigFit("2g.10gb", 1, (4,)),  # two would need 4 compute slices
        MigFit("3g.20gb", 1, (4,)),
        MigFit("4g.20gb", 0, ()),
        MigFit("7g.40gb", 0, ()),
    )


def test_a_full_mig_gpu_is_held_and_fits_nothing() -> None:
    seven = GpuInstance(start=0, size=8, profile_id=0, slices=7)
    state = state_of(gpu_host("h", mig=[()]), {mig_slot(FIRST_GPU, 0, 0, 8): "pl-7"}, {"pl-7": "a"})
    gpu = leaf(tree(state, {"pl-7": "ready"}), FIRST_GPU)
    assert gpu.status == "held"  # 7 of 7 compute slices
    assert gpu.mig is not None
    assert gpu.mig.cells == (MigCell(0, 8, "7g.80gb", holder("pl-7", "a")),)
    assert all(f.more == 0 and f.starts == () for f in gpu.mig.fits)
    # The same GPU with the 7g live and nobody's shows it without a holder.
    live = leaf(tree(state_of(gpu_host("h", mig=[(seven,)]))), FIRST_GPU)
    assert live.mig is not None and live.mig.cells == (MigCell(0, 8, "7g.80gb", None),)


def test_a_mig_mode_gpu_handed_over_whole_shows_no_mig_map() -> None:
    state = state_of(gpu_host("h", mig=[()]), {group(100): "pl-1"}, {"pl-1": "acme"})
    gpu = leaf(tree(state, {"pl-1": "ready"}), FIRST_GPU)
    assert gpu.status == "held"
    assert gpu.holders == (holder("pl-1", "acme"),)
    assert gpu.mig is None
    # Free, the same GPU offers its slices.
    free = leaf(tree(state_of(gpu_host("h", mig=[()]))), FIRST_GPU)
    assert free.mig is not None and free.mig.cells == (MigCell(0, 8),)


def test_a_gpu_not_in_mig_mode_and_other_functions_have_no_mig_map() -> None:
    roots = tree(state_of(mixed()))
    assert leaf(roots, GPU_A).mig is None
    assert leaf(roots, MDEV_GPU).mig is None
    assert leaf(roots, PF_ENABLED).mig is None


def test_mig_map_alone_matches_holders_by_gpu_and_slices() -> None:
    """Two H100s; the holder of a 1g on the other GPU's slice 0 is not this GPU's."""
    gpu = GpuView(FIRST_GPU, "H100", mig_enabled=True, mig_profiles=MIG_TABLES["H100-80GB"])
    layout = MigLayout((GpuInstance(0, 1, 19, 1), GpuInstance(2, 2, 14, 2)))
    other = PciAddress("0000:82:00.0")
    held: list[tuple[MigSlot, Holder]] = []
    for key, who in (
        (mig_slot(other, 19, 0, 1), holder("pl-x", "blue")),
        (mig_slot(FIRST_GPU, 14, 2, 2), holder("pl-y", "acme")),
    ):
        slot = parse_slot(key)
        assert isinstance(slot, MigSlot)
        held.append((slot, who))
    got = mig_map(gpu, layout, held)
    assert got.cells == (
        MigCell(0, 1, "1g.10gb", None),
        MigCell(1, 1),
        MigCell(2, 2, "2g.20gb", holder("pl-y", "acme")),
        MigCell(4, 4),
    )
    assert covers_every_slice(got.cells)
    assert got.compute_used == 3
    fits = {f.profile: (f.more, f.starts) for f in got.fits}
    assert fits["1g.10gb"] == (4, (1, 4, 5, 6))
    assert fits["1g.20gb"] == (2, (4, 6))
    assert fits["2g.20gb"] == (1, (4,))  # compute would allow two, memory allows one
    assert fits["3g.40gb"] == (1, (4,))
    assert fits["4g.40gb"] == (0, ())
