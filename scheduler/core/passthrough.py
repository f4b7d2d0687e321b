"""Whole-device VFIO passthrough placement: filter, then choose.

This is the foundation's picker. For each host it filters the devices a claim
could take (kind, selector, IOMMU isolation, migratability), then searches for
an assignment of every claim unit to a distinct, entirely free IOMMU group that
honours the request's NUMA policy and required PCIe affinities. Among hosts
that fit it picks the most allocated one (best fit), so that empty hosts stay
empty for large requests. Pure: snapshot in, plan out.

Forms other than whole-device (VF, mdev, MIG) and exclusivity domains wider
than the device are placed by the CP-SAT engine of a later increment; asked for
alone, they are refused as unsupported rather than silently ignored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from scheduler.core.host import (
    HANDOVER_GROUP_HOLDS_HOST_DEVICE,
    HANDOVER_IN_USE_BY_HOST,
    HostView,
    PciFunctionView,
)
from scheduler.core.identity import IommuGroupNumber, SlotKey, iommu_group_slot, vfio_group_path
from scheduler.core.plan import Plan, Rejection, Unschedulable, WholeDeviceAssignment
from scheduler.core.request import (
    Affinity,
    AffinityScope,
    Claim,
    DeviceForm,
    ExclusivityDomain,
    NumaPolicy,
    PlacementRequest,
)
from scheduler.core.snapshot import ClusterSnapshot, HostState

# Named rejection reasons, so an operator can grep for them.
REASON_LEASE_EXPIRED = "lease-expired"
REASON_LABELS_MISMATCH = "labels-mismatch"
REASON_NO_IOMMU = "no-iommu"
REASON_NO_MATCHING_DEVICE = "no-matching-device"
REASON_NOT_MIGRATABLE = "passthrough-not-migratable"
REASON_NO_GROUP = "device-without-iommu-group"
REASON_GROUP_ALLOCATED = "iommu-group-allocated"
REASON_PF_HAS_VFS = "pf-has-vfs-enabled"
REASON_GROUP_HOLDS_HOST_DEVICE = HANDOVER_GROUP_HOLDS_HOST_DEVICE
REASON_IN_USE_BY_HOST = HANDOVER_IN_USE_BY_HOST
REASON_TOO_FEW_DEVICES = "too-few-free-devices"
REASON_TOPOLOGY = "no-assignment-meets-topology"

#: Upper bound on search steps per host, so a pathological request cannot
#: stall the scheduler; hosts have tens of devices, so this is never reached
#: in practice.
_SEARCH_BUDGET = 20_000


@dataclass(frozen=True)
class Unsupported:
    """The request needs a capability this scheduler does not place yet."""

    field: str
    message: str


@dataclass(frozen=True)
class _Candidate:
    device: PciFunctionView
    group: IommuGroupNumber


class _Rejections:
    """Counts rejections by (plugin, reason) across hosts and devices."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.details: dict[tuple[str, str], str] = {}

    def add(self, plugin: str, reason: str, detail: str = "") -> None:
        self.counts[(plugin, reason)] += 1
        if detail:
            self.details.setdefault((plugin, reason), detail)

    def as_tuple(self) -> tuple[Rejection, ...]:
        return tuple(
            Rejection(plugin, reason, n, self.details.get((plugin, reason), ""))
            for (plugin, reason), n in sorted(self.counts.items())
        )


def check_supported(request: PlacementRequest) -> Unsupported | None:
    """Refuse what this picker cannot place instead of ignoring it."""
    for i, claim in enumerate(request.claims):
        if DeviceForm.WHOLE_DEVICE not in claim.accepted_forms():
            forms = ", ".join(sorted(f.value for f in claim.accepted_forms()))
            return Unsupported(
                f"claims[{i}].forms",
                f"only whole-device passthrough is placed by this version; "
                f"claim {claim.name!r} accepts only {forms}",
            )
    if request.exclusivity not in (ExclusivityDomain.NONE, ExclusivityDomain.DEVICE):
        return Unsupported(
            "exclusivity",
            f"exclusivity domain {request.exclusivity.value} is not enforced by this version; "
            "whole-device passthrough already gives DEVICE exclusivity",
        )
    return None


def _selector_matches(claim: Claim, device: PciFunctionView) -> bool:
    sel = claim.selector
    if sel.vendor_id and device.vendor_id != sel.vendor_id:
        return False
    if sel.device_ids and device.device_id not in sel.device_ids:
        return False
    return not sel.models or (device.model is not None and device.model in sel.models)


def _candidates(state: HostState, claim: Claim, rejections: _Rejections) -> list[_Candidate]:
    """Devices of the host that could serve one unit of the claim."""
    view = state.view
    taken = set(state.allocations)
    out: list[_Candidate] = []
    for device in view.whole_devices(claim.kind):
        if not _selector_matches(claim, device):
            continue
        if claim.migratable:
            # Plain vfio-pci passthrough cannot be live-migrated.
            rejections.add("migratability", REASON_NOT_MIGRATABLE, device.address)
            continue
        if device.iommu_group is None:
            rejections.add("iommu-isolation", REASON_NO_GROUP, device.address)
            continue
        if iommu_group_slot(device.iommu_group) in taken:
            rejections.add("capacity", REASON_GROUP_ALLOCATED, device.address)
            continue
        blocker = view.handover_blocker(device.address)
        if blocker is not None:
            reason, detail = blocker
            plugin = "host-use" if reason == REASON_IN_USE_BY_HOST else "iommu-isolation"
            rejections.add(plugin, reason, detail)
            continue
        if device.num_vfs > 0:
            # vfio-pci refuses a PF with SR-IOV enabled (EBUSY).
            rejections.add("iommu-isolation", REASON_PF_HAS_VFS, device.address)
            continue
        out.append(_Candidate(device, device.iommu_group))
    out.sort(key=lambda c: (c.device.numa_node, c.device.address))
    return out


def _within_scope(a: PciFunctionView, b: PciFunctionView, scope: AffinityScope) -> bool:
    if scope is AffinityScope.SAME_NUMA_NODE:
        return a.numa_node >= 0 and a.numa_node == b.numa_node
    if scope is AffinityScope.SAME_ROOT_PORT:
        return a.root_port is not None and a.root_port == b.root_port
    return a.switch is not None and a.switch == b.switch


def _numa_domains(view: HostView, policy: NumaPolicy) -> Iterator[frozenset[int] | None]:
    """The sets of NUMA nodes an assignment may span, in order of preference.

    None means "any node". Devices with an unknown node (-1) fit only None.
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


def _search(
    units: Sequence[Claim],
    candidates: Mapping[str, list[_Candidate]],
    affinities: Sequence[Affinity],
    domain: frozenset[int] | None,
) -> list[_Candidate] | None:
    """Depth-first assignment of units to distinct groups, or None."""
    chosen: list[_Candidate] = []
    used: set[IommuGroupNumber] = set()
    steps = 0

    def consistent(claim: Claim, cand: _Candidate) -> bool:
        for aff in affinities:
            if claim.name not in (aff.claim_a, aff.claim_b):
                continue
            other = aff.claim_b if claim.name == aff.claim_a else aff.claim_a
            for unit, placed in zip(units, chosen, strict=False):
                if unit.name == other and not _within_scope(cand.device, placed.device, aff.scope):
                    return False
        return True

    def step(i: int) -> bool:
        nonlocal steps
        if i == len(units):
            return True
        for cand in candidates[units[i].name]:
            steps += 1
            if steps > _SEARCH_BUDGET:
                return False
            if cand.group in used:
                continue
            if domain is not None and cand.device.numa_node not in domain:
                continue
            if not consistent(units[i], cand):
                continue
            chosen.append(cand)
            used.add(cand.group)
            if step(i + 1):
                return True
            chosen.pop()
            used.discard(cand.group)
        return False

    return chosen if step(0) else None


def _place_on_host(
    state: HostState, request: PlacementRequest, rejections: _Rejections
) -> list[_Candidate] | None:
    view = state.view
    if not state.schedulable:
        rejections.add("host", REASON_LEASE_EXPIRED, view.host_id)
        return None
    if any(view.labels.get(k) != v for k, v in request.host_selector.items()):
        rejections.add("host-selector", REASON_LABELS_MISMATCH, view.host_id)
        return None
    if not view.iommu_present:
        rejections.add("iommu-isolation", REASON_NO_IOMMU, view.host_id)
        return None
    candidates = {c.name: _candidates(state, c, rejections) for c in request.claims}
    for claim in request.claims:
        groups = {c.group for c in candidates[claim.name]}
        if not groups:
            if not any(_selector_matches(claim, f) for f in view.whole_devices(claim.kind)):
                # Only when nothing even matched: otherwise the filter that
                # rejected the matching devices has already said why.
                rejections.add(
                    "capacity", REASON_NO_MATCHING_DEVICE, f"{view.host_id}: {claim.name}"
                )
            return None
        if len(groups) < claim.count:
            rejections.add(
                "capacity",
                REASON_TOO_FEW_DEVICES,
                f"{view.host_id}: {claim.name} needs {claim.count}, {len(groups)} free",
            )
            return None
    units = [c for c in request.claims for _ in range(c.count)]
    required = [a for a in request.affinities if a.required]
    preferred_too = list(request.affinities)
    for domain in _numa_domains(view, request.numa_policy):
        # Try with preferred affinities honoured first, then only the required.
        for affinities in (preferred_too, required) if preferred_too != required else (required,):
            found = _search(units, candidates, affinities, domain)
            if found is not None:
                return found
    rejections.add(
        "topology",
        REASON_TOPOLOGY,
        f"{view.host_id}: numa_policy={request.numa_policy.value}, "
        f"{len(required)} required affinities",
    )
    return None


def _free_groups(state: HostState) -> int:
    # Every allocation slot of whole-device passthrough is one group.
    return len(state.view.iommu_groups) - len(state.allocations)


def schedule(snapshot: ClusterSnapshot, request: PlacementRequest) -> Plan | Unschedulable:
    """Choose a host and devices for a whole-device passthrough request.

    The caller has validated the request and checked :func:`check_supported`.

    Returns:
        A plan against the snapshot's allocation generation of the chosen
        host, or the reasons no host fits.
    """
    rejections = _Rejections()
    feasible: list[tuple[int, str, HostState, list[_Candidate]]] = []
    for host_id in sorted(snapshot.hosts):
        state = snapshot.hosts[host_id]
        found = _place_on_host(state, request, rejections)
        if found is not None:
            feasible.append((_free_groups(state), host_id, state, found))
    if not feasible:
        wanted = ", ".join(f"{c.count}x {c.kind.value} ({c.name})" for c in request.claims)
        return Unschedulable(
            f"no host can take {wanted} as whole devices with entirely free IOMMU groups "
            f"({len(snapshot.hosts)} hosts considered)",
            rejections.as_tuple(),
        )
    # Best fit: fewest free groups left, so large requests still find empty hosts.
    _, _, state, chosen = min(feasible, key=lambda f: (f[0], f[1]))
    units = [c for c in request.claims for _ in range(c.count)]
    assignments = tuple(
        WholeDeviceAssignment(
            claim=unit.name,
            address=cand.device.address,
            iommu_group=cand.group,
            group_endpoints=state.view.group_endpoints(cand.group),
            numa_node=cand.device.numa_node,
            vfio_path=vfio_group_path(cand.group),
        )
        for unit, cand in zip(units, chosen, strict=True)
    )
    slots: tuple[SlotKey, ...] = tuple(iommu_group_slot(c.group) for c in chosen)
    return Plan(
        host_id=state.view.host_id,
        expected_alloc_generation=state.alloc_generation,
        slots=slots,
        assignments=assignments,
    )
