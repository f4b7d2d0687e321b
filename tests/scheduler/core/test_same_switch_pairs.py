"""A required same-switch GPU+NIC request is refused only where no legal pair is free.

Hosts are generated as domain views in the HGX style: PCIe switches under
root ports, each holding GPUs (directly, or one switch further down, as on
HGX baseboards) and NICs in any number, beside GPUs and NICs on bare root
ports; some devices are already taken. Whether a free legal pair exists is
worked out here from the bridge chains alone (the two devices meet under a
switch's upstream port), not by the engine's plugins.

* One request at a time: whenever such a pair is free, the engine places the
  request on the host, on a legal pair.
* A batch of as many requests as the free pairs can serve at once (a
  maximum matching): every one is placed, on distinct legal pairs.
"""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.scheduler.core.checker import check_placements
from tessera.scheduler.core.engine.batch import BatchSettings, solve_batch
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.host import (
    HostView,
    IommuGroupView,
    NumaNodeView,
    PciFunctionView,
    PciRole,
)
from tessera.scheduler.core.identity import (
    HostId,
    IommuGroupNumber,
    PciAddress,
    PlacementId,
    RequestId,
    SlotKey,
    TenantName,
    iommu_group_slot,
)
from tessera.scheduler.core.plan import Plan, Unschedulable, WholeDeviceAssignment
from tessera.scheduler.core.request import (
    Affinity,
    AffinityScope,
    Claim,
    DeviceKind,
    PlacementRequest,
)
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState

_GPU_CLASS = 0x030200
_NIC_CLASS = 0x020000
_BRIDGE_CLASS = 0x060400
_KINDS = (DeviceKind.GPU, DeviceKind.NIC)


class _Board:
    """Builds a host view function by function, numbering buses and groups."""

    def __init__(self) -> None:
        self.functions: list[PciFunctionView] = []
        self._bus = 0

    def address(self) -> str:
        self._bus += 1
        return f"0000:{self._bus:02x}:00.0"

    def add(self, address: str, class_code: int, chain: tuple[str, ...], role: PciRole) -> None:
        group = len(self.functions) + 1
        self.functions.append(
            PciFunctionView(
                address=PciAddress(address),
                vendor_id=0x10DE if class_code == _GPU_CLASS else 0x15B3,
                device_id=0x2330 if class_code == _GPU_CLASS else 0x1021,
                class_code=class_code,
                driver="nvidia" if class_code == _GPU_CLASS else "mlx5_core",
                numa_node=0,
                iommu_group=IommuGroupNumber(group),
                role=role,
                root_bus="pci0000:" + (chain[0] if chain else address)[5:7],
                bridge_chain=tuple(PciAddress(c) for c in chain),
            )
        )

    def bridge(self, chain: tuple[str, ...], role: PciRole) -> str:
        address = self.address()
        self.add(address, _BRIDGE_CLASS, chain, role)
        return address

    def device(self, kind: DeviceKind, chain: tuple[str, ...]) -> None:
        code = _GPU_CLASS if kind is DeviceKind.GPU else _NIC_CLASS
        self.add(self.address(), code, chain, PciRole.ENDPOINT)


@st.composite
def boards(draw: st.DrawFn) -> HostView:
    """An HGX-style host: switches with GPUs (some a switch deeper) and NICs, and bare ports."""
    board = _Board()
    for _ in range(draw(st.integers(1, 4))):
        root = board.bridge((), PciRole.ROOT_PORT)
        upstream = board.bridge((root,), PciRole.SWITCH_UPSTREAM)
        for kind, deeper in draw(
            st.lists(st.tuples(st.sampled_from(_KINDS), st.booleans()), max_size=4)
        ):
            down = board.bridge((root, upstream), PciRole.SWITCH_DOWNSTREAM)
            chain: tuple[str, ...] = (root, upstream, down)
            if deeper:
                # A second switch below the first, as HGX puts its GPUs.
                inner = board.bridge(chain, PciRole.SWITCH_UPSTREAM)
                chain = (*chain, inner, board.bridge((*chain, inner), PciRole.SWITCH_DOWNSTREAM))
            board.device(kind, chain)
    for kind in draw(st.lists(st.sampled_from(_KINDS), max_size=2)):
        # Alone under a root port: no switch, so never part of a pair.
        board.device(kind, (board.bridge((), PciRole.ROOT_PORT),))
    functions = {f.address: f for f in board.functions}
    return HostView(
        host_id=HostId("hgx"),
        functions=functions,
        iommu_groups={
            f.iommu_group: IommuGroupView(f.iommu_group, (f.address,))
            for f in board.functions
            if f.iommu_group is not None
        },
        numa_nodes=(NumaNodeView(0, (10,)),),
    )


def _devices(view: HostView, code: int) -> list[PciFunctionView]:
    return [f for f in view.functions.values() if f.class_code == code]


def _share_a_switch(view: HostView, a: PciFunctionView, b: PciFunctionView) -> bool:
    """Whether two devices meet below a switch: a common upstream port in their chains."""
    ups = {c for c in a.bridge_chain if view.functions[c].role is PciRole.SWITCH_UPSTREAM}
    return any(c in ups for c in b.bridge_chain)


def _free_pairs(view: HostView, taken: set[PciAddress]) -> dict[PciAddress, set[PciAddress]]:
    """Per free GPU, the free NICs it shares a switch with."""
    nics = [n for n in _devices(view, _NIC_CLASS) if n.address not in taken]
    return {
        g.address: {n.address for n in nics if _share_a_switch(view, g, n)}
        for g in _devices(view, _GPU_CLASS)
        if g.address not in taken
    }


def _matching(pairs: Mapping[PciAddress, set[PciAddress]]) -> int:
    """The most GPU+NIC pairs usable at once (augmenting paths)."""
    nic_of: dict[PciAddress, PciAddress] = {}

    def augment(gpu: PciAddress, seen: set[PciAddress]) -> bool:
        for nic in sorted(pairs[gpu]):
            if nic in seen:
                continue
            seen.add(nic)
            if nic not in nic_of or augment(nic_of[nic], seen):
                nic_of[nic] = gpu
                return True
        return False

    return sum(1 for gpu in sorted(pairs) if augment(gpu, set()))


def _pair_request(i: int) -> PlacementRequest:
    return PlacementRequest(
        request_id=RequestId(f"pair-{i}"),
        tenant=TenantName("a"),
        claims=(Claim("gpu", DeviceKind.GPU, 1), Claim("nic", DeviceKind.NIC, 1)),
        affinities=(Affinity("gpu", "nic", AffinityScope.SAME_SWITCH, required=True),),
    )


@st.composite
def hosts_with_some_taken(draw: st.DrawFn) -> tuple[HostView, set[PciAddress]]:
    """A board and the devices already passed through to someone."""
    view = draw(boards())
    endpoints = sorted(a for a, f in view.functions.items() if f.role is PciRole.ENDPOINT)
    taken = set(draw(st.lists(st.sampled_from(endpoints), unique=True))) if endpoints else set()
    return view, {PciAddress(a) for a in taken}


def _snapshot(view: HostView, taken: set[PciAddress]) -> ClusterSnapshot:
    allocations: dict[SlotKey, PlacementId] = {}
    for address in sorted(taken):
        group = view.functions[address].iommu_group
        assert group is not None
        allocations[iommu_group_slot(group)] = PlacementId(f"held-{address}")
    return ClusterSnapshot(
        hosts={view.host_id: HostState(view, alloc_generation=1, allocations=allocations)}
    )


def _pair_of(plan: Plan) -> tuple[PciAddress, PciAddress]:
    by_claim = {
        a.claim: a.address for a in plan.assignments if isinstance(a, WholeDeviceAssignment)
    }
    return by_claim["gpu"], by_claim["nic"]


SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(SLOW, max_examples=300)
@given(host=hosts_with_some_taken())
def test_a_free_legal_pair_is_never_refused(host: tuple[HostView, set[PciAddress]]) -> None:
    view, taken = host
    pairs = _free_pairs(view, taken)
    result = Engine().schedule(_snapshot(view, taken), _pair_request(0))
    if not any(pairs.values()):
        assert isinstance(result, Unschedulable)
        return
    assert isinstance(result, Plan), f"refused with a free legal pair: {result}"
    gpu, nic = _pair_of(result)
    assert nic in pairs[gpu], f"{gpu} and {nic} share no switch"


@settings(SLOW, max_examples=100)
@given(host=hosts_with_some_taken())
def test_a_batch_places_as_many_pairs_as_the_free_ones_allow(
    host: tuple[HostView, set[PciAddress]],
) -> None:
    view, taken = host
    pairs = _free_pairs(view, taken)
    most = _matching(pairs)
    requests = [_pair_request(i) for i in range(most)]
    snapshot = _snapshot(view, taken)
    result = solve_batch(Engine(), snapshot, requests, BatchSettings(workers=1, seed=0))
    assert set(result.plans) == {r.request_id for r in requests}, result.unplaced
    made = [(r, result.plans[r.request_id]) for r in requests]
    assert check_placements(snapshot, made) == []
    used = [_pair_of(plan) for _, plan in made]
    assert all(nic in pairs[gpu] for gpu, nic in used)
