"""An independent validity checker for placements.

Given a cluster snapshot and a sequence of placements made on top of it, each
a ``(PlacementRequest, Plan)`` pair, :func:`check_placements` lists every
violated invariant. It is deliberately separate from the placement engine: it
reads only the domain model (views, requests, plans, the slot-key grammar and
the MIG profile tables) and re-derives every rule on its own, so that property
tests can run it on whatever the engine produces.

Two kinds of checks run:

* **plan checks** judge one plan against its request and its host's view
  (slots implied by the assignments, device match, forms, migratability, NUMA,
  affinity, host selector, whole-device group rules);
* **state checks** judge a host's holdings as a whole: the snapshot's
  allocations plus every new placement so far (slot uniqueness, one mode per
  device, IOMMU group isolation, capacity, mdev homogeneity, exclusivity).

New placements are added one at a time; a state violation that appears when a
placement is added is that placement's. State violations already present in the
snapshot before any new placement carry ``request_id=None``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import combinations

from tessera.scheduler.core.host import HostView, PciFunctionView
from tessera.scheduler.core.identity import (
    IommuGroupNumber,
    PciAddress,
    RequestId,
    SlotKey,
    TenantName,
    iommu_group_slot,
)
from tessera.scheduler.core.plan import (
    Assignment,
    MdevAssignment,
    MigAssignment,
    Plan,
    VfAssignment,
    WholeDeviceAssignment,
    assignment_device,
)
from tessera.scheduler.core.request import (
    AffinityScope,
    Claim,
    DeviceForm,
    ExclusivityDomain,
    NumaPolicy,
    PlacementRequest,
)
from tessera.scheduler.core.slots import (
    ExclusiveSlot,
    GroupSlot,
    HostShareSlot,
    MdevSlot,
    MigSlot,
    ParsedSlot,
    VfSlot,
    exclusive_slot,
    host_share_slot,
    mdev_slot,
    mig_slot,
    parse_slot,
    vf_slot,
)
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState

__all__ = [
    "ALL_RULES",
    "RULE_AFFINITY",
    "RULE_CAPACITY",
    "RULE_DEVICE_MATCH",
    "RULE_EXCLUSIVITY",
    "RULE_HOST_SELECTOR",
    "RULE_INTERFERENCE",
    "RULE_IOMMU_ISOLATION",
    "RULE_MDEV_HOMOGENEITY",
    "RULE_MIGRATABILITY",
    "RULE_NUMA",
    "RULE_SLOTS",
    "Violation",
    "check_placements",
]

RULE_SLOTS = "slots"
RULE_IOMMU_ISOLATION = "iommu-isolation"
RULE_DEVICE_MATCH = "device-match"
RULE_INTERFERENCE = "interference"
RULE_CAPACITY = "capacity"
RULE_MDEV_HOMOGENEITY = "mdev-homogeneity"
RULE_MIGRATABILITY = "migratability"
RULE_NUMA = "numa"
RULE_AFFINITY = "affinity"
RULE_EXCLUSIVITY = "exclusivity"
RULE_HOST_SELECTOR = "host-selector"

#: Every rule name, in the order the invariants are listed.
ALL_RULES: tuple[str, ...] = (
    RULE_SLOTS,
    RULE_IOMMU_ISOLATION,
    RULE_DEVICE_MATCH,
    RULE_INTERFERENCE,
    RULE_CAPACITY,
    RULE_MDEV_HOMOGENEITY,
    RULE_MIGRATABILITY,
    RULE_NUMA,
    RULE_AFFINITY,
    RULE_EXCLUSIVITY,
    RULE_HOST_SELECTOR,
)

#: Memory slices of a MIG GPU; placements count these.
_MIG_MEMORY_SLICES = 8
#: Compute slices of a MIG GPU; profiles use these.
_MIG_COMPUTE_SLICES = 7
#: Per-GPU GPU-instance limit by MIG profile id.
_MIG_INSTANCE_LIMITS: Mapping[int, int] = {19: 7, 20: 1, 15: 4, 14: 3, 9: 2, 5: 1, 0: 1}
#: The plain VFIO driver, which cannot live-migrate a VF.
_PLAIN_VFIO = "vfio-pci"

#: A (rule, detail) pair before it is attributed to a request.
_Finding = tuple[str, str]


@dataclass(frozen=True)
class Violation:
    """One violated invariant.

    Attributes:
        request_id: the placement's request that violates it; None for a
            violation already present in the snapshot's own allocations.
        rule: the invariant's stable kebab-case name (one of ``ALL_RULES``).
        detail: what exactly is wrong, for humans.
    """

    request_id: RequestId | None
    rule: str
    detail: str


@dataclass(frozen=True)
class _Holding:
    """One slot held on a host, by whom."""

    key: SlotKey
    slot: ParsedSlot | None
    owner: str
    tenant: TenantName


@dataclass(frozen=True)
class _Hold:
    """An exclusive hold on a domain instance."""

    domain: ExclusivityDomain
    instance: str
    owner: str
    tenant: TenantName


@dataclass
class _Ledger:
    """What one host holds: the snapshot's allocations plus new placements."""

    state: HostState
    holdings: list[_Holding] = field(default_factory=list)
    holds: list[_Hold] = field(default_factory=list)


def check_placements(
    snapshot: ClusterSnapshot,
    placements: Sequence[tuple[PlacementRequest, Plan]],
) -> list[Violation]:
    """Every invariant the snapshot plus the placements violate.

    Args:
        snapshot: the cluster state the placements were made on.
        placements: new placements in the order they were made; each is
            added to its host's state before the next one is judged.

    Returns:
        The violations, empty when everything is valid. Those already in the
        snapshot come first (``request_id=None``), then each placement's in
        order.
    """
    ledgers = {host_id: _ledger_of(state) for host_id, state in snapshot.hosts.items()}
    out: list[Violation] = []
    for existing in ledgers.values():
        for rule, detail in sorted(_state_findings(existing)):
            out.append(Violation(None, rule, detail))
    for request, plan in placements:
        rid = request.request_id
        ledger = ledgers.get(plan.host_id)
        if ledger is None:
            out.append(Violation(rid, RULE_SLOTS, f"host {plan.host_id} is not in the snapshot"))
            continue
        for rule, detail in _plan_findings(ledger.state, request, plan):
            out.append(Violation(rid, rule, detail))
        before = _state_findings(ledger)
        _add_placement(ledger, request, plan)
        for rule, detail in sorted(_state_findings(ledger) - before):
            out.append(Violation(rid, rule, detail))
    return out


# --- building the ledger ---------------------------------------------------


def _ledger_of(state: HostState) -> _Ledger:
    ledger = _Ledger(state)
    for key, pid in sorted(state.allocations.items()):
        owner = f"placement:{pid}"
        # A placement whose tenant the store does not say is a stranger to all.
        tenant = state.tenants.get(pid, TenantName(owner))
        slot = parse_slot(key)
        ledger.holdings.append(_Holding(key, slot, owner, tenant))
        if isinstance(slot, ExclusiveSlot):
            ledger.holds.append(_Hold(slot.domain, slot.instance, owner, tenant))
    return ledger


def _share_slots(request: PlacementRequest) -> list[SlotKey]:
    """The host-share slot a request's host CPU and memory imply, if it asks for any."""
    if not request.cpu_milli and not request.memory_mib:
        return []
    return [
        host_share_slot(request.cpu_milli, request.memory_mib, request.tenant, request.request_id)
    ]


def _add_placement(ledger: _Ledger, request: PlacementRequest, plan: Plan) -> None:
    owner = f"request:{request.request_id}"
    tenant = request.tenant
    # Host CPU and memory are held whether or not the plan wrote their slot.
    implied = [_unit_slot(a) for a in plan.assignments] + _share_slots(request)
    implied_set = set(implied)
    keys = implied + [k for k in plan.slots if k not in implied_set]
    for key in keys:
        slot = parse_slot(key)
        ledger.holdings.append(_Holding(key, slot, owner, tenant))
        if isinstance(slot, ExclusiveSlot):
            ledger.holds.append(_Hold(slot.domain, slot.instance, owner, tenant))
    domain = request.exclusivity
    if domain is not ExclusivityDomain.NONE:
        # Held whether or not the plan wrote its exclusive slots.
        view = ledger.state.view
        for a in plan.assignments:
            instance = _domain_instance(view, _device_of(a), domain)
            if instance is not None:
                ledger.holds.append(_Hold(domain, instance, owner, tenant))


# --- topology helpers ------------------------------------------------------


#: The physical device an assignment lives on (a plan's own vocabulary).
_device_of = assignment_device


def _form_of(a: Assignment) -> DeviceForm:
    if isinstance(a, WholeDeviceAssignment):
        return DeviceForm.WHOLE_DEVICE
    if isinstance(a, VfAssignment):
        return DeviceForm.VF
    if isinstance(a, MdevAssignment):
        return DeviceForm.MDEV
    return DeviceForm.MIG


def _unit_slot(a: Assignment) -> SlotKey:
    """The slot key one assignment takes."""
    if isinstance(a, WholeDeviceAssignment):
        return iommu_group_slot(a.iommu_group)
    if isinstance(a, VfAssignment):
        return vf_slot(a.pf_address, a.vf_index)
    if isinstance(a, MdevAssignment):
        return mdev_slot(a.parent_address, a.type_id, a.uuid)
    return mig_slot(a.gpu_address, a.profile_id, a.start, a.size)


def _domain_instance(view: HostView, address: PciAddress, domain: ExclusivityDomain) -> str | None:
    """The instance of ``domain`` a device lies in; None when it cannot be told."""
    if domain is ExclusivityDomain.DEVICE:
        return address
    if domain is ExclusivityDomain.HOST:
        return view.host_id
    fn = view.functions.get(address)
    if fn is None:
        return None
    if domain is ExclusivityDomain.PCIE_SWITCH:
        chain = fn.bridge_chain
        # Chains run root port, switch upstream, switch downstream, ...: the
        # switches' upstream ports are the odd-indexed bridges; the domain is
        # the outermost switch, whose upstream link nested levels share.
        upstream = [chain[i] for i in range(1, len(chain), 2)]
        if upstream:
            return upstream[0]
        if chain:
            return chain[0]
        return fn.root_bus or address
    if domain is ExclusivityDomain.NUMA_NODE:
        return str(fn.numa_node)
    return None


def _endpoints(view: HostView, group: IommuGroupNumber) -> list[PciAddress]:
    """Members of a group that are not bridges (unknown functions excluded)."""
    g = view.iommu_groups.get(group)
    if g is None:
        return []
    out = []
    for m in g.members:
        fn = view.functions.get(m)
        if fn is not None and not fn.role.is_bridge:
            out.append(m)
    return sorted(out)


def _touched(view: HostView, slot: ParsedSlot | None) -> list[PciAddress]:
    """The physical devices a slot puts its holder on."""
    if isinstance(slot, GroupSlot):
        return _endpoints(view, slot.group)
    if isinstance(slot, VfSlot):
        return [slot.pf]
    if isinstance(slot, MdevSlot):
        return [slot.parent]
    if isinstance(slot, MigSlot):
        return [slot.gpu]
    return []


def _sockets(view: HostView) -> dict[int, int]:
    """Socket index per NUMA node: nodes nearer than the farthest SLIT distance share one."""
    ids = sorted(n.node_id for n in view.numa_nodes)
    dist: dict[tuple[int, int], int] = {}
    for n in view.numa_nodes:
        for i, d in enumerate(n.distances):
            if i < len(ids) and ids[i] != n.node_id:
                dist[(n.node_id, ids[i])] = d
    far = max(dist.values(), default=0)
    parent = {i: i for i in ids}

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for (a, b), d in dist.items():
        if d < far:
            parent[root(a)] = root(b)
    roots = sorted({root(i) for i in ids})
    return {i: roots.index(root(i)) for i in ids}


def _selector_ok(claim: Claim, fn: PciFunctionView) -> bool:
    sel = claim.selector
    if sel.vendor_id and fn.vendor_id != sel.vendor_id:
        return False
    if sel.device_ids and fn.device_id not in sel.device_ids:
        return False
    return not sel.models or (fn.model is not None and fn.model in sel.models)


# --- plan checks ------------------------------------------------------------


def _plan_findings(state: HostState, request: PlacementRequest, plan: Plan) -> list[_Finding]:
    view = state.view
    out: list[_Finding] = []
    out += _check_plan_slots(state, request, plan)
    claims = {c.name: c for c in request.claims}
    if not view.iommu_present and any(not isinstance(a, MigAssignment) for a in plan.assignments):
        # VFIO (whole devices, VFs, mdevs) needs an IOMMU; a MIG instance is
        # isolated by the GPU itself.
        out.append((RULE_IOMMU_ISOLATION, f"host {view.host_id} has no IOMMU"))
    for k, v in sorted(request.host_selector.items()):
        if view.labels.get(k) != v:
            got = view.labels.get(k)
            out.append((RULE_HOST_SELECTOR, f"host {view.host_id} label {k}={got!r}, wanted {v!r}"))
    for a in plan.assignments:
        claim = claims.get(a.claim)
        if claim is None:
            continue
        out += _check_assignment(view, claim, a)
    out += _check_numa(view, request, plan)
    out += _check_affinity(view, request, plan)
    return out


def _check_plan_slots(state: HostState, request: PlacementRequest, plan: Plan) -> list[_Finding]:
    view = state.view
    out: list[_Finding] = []
    if not state.schedulable:
        out.append((RULE_SLOTS, f"host {view.host_id} is not schedulable"))
    claims = {c.name: c for c in request.claims}
    per_claim = Counter(a.claim for a in plan.assignments)
    for name in sorted(per_claim):
        if name not in claims:
            out.append((RULE_SLOTS, f"assignment names claim {name!r}, not in the request"))
    for c in request.claims:
        if per_claim[c.name] != c.count:
            out.append(
                (
                    RULE_SLOTS,
                    f"claim {c.name!r} has {per_claim[c.name]} assignments, wants {c.count}",
                )
            )
    implied = [_unit_slot(a) for a in plan.assignments]
    if request.exclusivity is not ExclusivityDomain.NONE:
        exclusive: set[SlotKey] = set()
        for a in plan.assignments:
            instance = _domain_instance(view, _device_of(a), request.exclusivity)
            if instance is not None:
                exclusive.add(exclusive_slot(request.exclusivity, instance, request.request_id))
        implied += sorted(exclusive)
    implied += _share_slots(request)
    want, got = Counter(implied), Counter(plan.slots)
    for key in sorted(want - got):
        out.append((RULE_SLOTS, f"slot {key} implied by the assignments is missing from the plan"))
    for key in sorted(got - want):
        out.append((RULE_SLOTS, f"slot {key} is not implied by the assignments"))
    return out


def _check_assignment(view: HostView, claim: Claim, a: Assignment) -> list[_Finding]:
    out: list[_Finding] = []
    device = _device_of(a)
    form = _form_of(a)
    what = f"claim {claim.name!r} {form.value} on {device}"
    if form not in claim.accepted_forms():
        out.append((RULE_INTERFERENCE, f"{what}: form not accepted by the claim"))
    fn = view.functions.get(device)
    if fn is None:
        out.append((RULE_DEVICE_MATCH, f"{what}: device not on host {view.host_id}"))
    else:
        if fn.kind is not claim.kind:
            kind = fn.kind.value if fn.kind is not None else None
            out.append((RULE_DEVICE_MATCH, f"{what}: device kind {kind}, wants {claim.kind.value}"))
        if not _selector_ok(claim, fn):
            out.append((RULE_DEVICE_MATCH, f"{what}: device does not match the selector"))
        if a.numa_node != fn.numa_node:
            out.append((RULE_NUMA, f"{what}: numa_node {a.numa_node}, device is on {fn.numa_node}"))
    if isinstance(a, WholeDeviceAssignment):
        out += _check_whole(view, claim, a, fn, what)
    elif isinstance(a, VfAssignment):
        out += _check_vf(view, claim, a, what)
    elif isinstance(a, MdevAssignment):
        out += _check_mdev(view, claim, a, what)
    else:
        out += _check_mig(view, claim, a, what)
    return out


def _check_whole(
    view: HostView,
    claim: Claim,
    a: WholeDeviceAssignment,
    fn: PciFunctionView | None,
    what: str,
) -> list[_Finding]:
    out: list[_Finding] = []
    if claim.migratable:
        out.append((RULE_MIGRATABILITY, f"{what}: whole-device passthrough cannot migrate"))
    if fn is not None and fn.is_vf:
        out.append((RULE_DEVICE_MATCH, f"{what}: a VF is not a whole device"))
    if fn is not None and fn.iommu_group != a.iommu_group:
        out.append(
            (
                RULE_IOMMU_ISOLATION,
                f"{what}: device is in group {fn.iommu_group}, not {a.iommu_group}",
            )
        )
    if a.iommu_group not in view.iommu_groups:
        out.append((RULE_IOMMU_ISOLATION, f"{what}: no IOMMU group {a.iommu_group} on the host"))
        return out
    endpoints = _endpoints(view, a.iommu_group)
    if sorted(a.group_endpoints) != endpoints:
        out.append(
            (
                RULE_IOMMU_ISOLATION,
                f"{what}: group_endpoints {list(a.group_endpoints)}, group has {endpoints}",
            )
        )
    if a.address not in a.group_endpoints:
        out.append((RULE_IOMMU_ISOLATION, f"{what}: device is not among its group_endpoints"))
    slot = a.address.rsplit(".", 1)[0]
    for e in endpoints:
        other = view.functions[e]
        # Passthrough takes the whole group: offered devices and the device's
        # own companion functions may go along, nothing the host owns.
        if e != a.address and other.kind is None and e.rsplit(".", 1)[0] != slot:
            out.append(
                (RULE_IOMMU_ISOLATION, f"{what}: group {a.iommu_group} holds host device {e}")
            )
    return out


def _check_vf(view: HostView, claim: Claim, a: VfAssignment, what: str) -> list[_Finding]:
    out: list[_Finding] = []
    pf = view.sriov_pfs.get(a.pf_address)
    vf = None
    if pf is not None:
        vf = next((v for v in pf.vfs if v.index == a.vf_index), None)
        if not a.vf_index < a.num_vfs <= pf.total_vfs:
            out.append(
                (
                    RULE_CAPACITY,
                    f"{what}: VF {a.vf_index} with num_vfs {a.num_vfs} "
                    f"(PF has total_vfs {pf.total_vfs})",
                )
            )
    if vf is not None and a.vf_address is not None and a.vf_address != vf.address:
        out.append(
            (RULE_DEVICE_MATCH, f"{what}: VF {a.vf_index} is {vf.address}, not {a.vf_address}")
        )
    if claim.migratable:
        driver = a.vfio_driver
        if not driver or driver == _PLAIN_VFIO:
            out.append((RULE_MIGRATABILITY, f"{what}: driver {driver!r} cannot migrate a VF"))
        elif vf is not None:
            vf_fn = view.functions.get(vf.address)
            if vf_fn is not None and vf_fn.migration_driver != driver:
                out.append(
                    (
                        RULE_MIGRATABILITY,
                        f"{what}: driver {driver!r}, VF migrates with {vf_fn.migration_driver!r}",
                    )
                )
        elif pf is not None and pf.num_vfs == 0 and pf.vf_migration_driver != driver:
            # The VF is created on Prepare: the PF says what its VFs migrate with.
            out.append(
                (
                    RULE_MIGRATABILITY,
                    f"{what}: driver {driver!r}, VFs of {pf.address} migrate with "
                    f"{pf.vf_migration_driver!r}",
                )
            )
    return out


def _check_mdev(view: HostView, claim: Claim, a: MdevAssignment, what: str) -> list[_Finding]:
    out: list[_Finding] = []
    if claim.mdev_types and a.type_id not in claim.mdev_types:
        out.append((RULE_CAPACITY, f"{what}: type {a.type_id} not among the claim's mdev_types"))
    parent = view.mdev_parents.get(a.parent_address)
    offered = parent.types.get(a.type_id) if parent is not None else None
    if parent is None:
        out.append((RULE_DEVICE_MATCH, f"{what}: device is not an mdev parent"))
    if claim.migratable and (offered is None or not offered.migratable):
        out.append((RULE_MIGRATABILITY, f"{what}: type {a.type_id} is not migratable"))
    return out


def _check_mig(view: HostView, claim: Claim, a: MigAssignment, what: str) -> list[_Finding]:
    out: list[_Finding] = []
    if claim.migratable:
        out.append((RULE_MIGRATABILITY, f"{what}: a MIG instance cannot migrate"))
    if claim.mig_profiles and a.profile_name not in claim.mig_profiles:
        out.append(
            (RULE_CAPACITY, f"{what}: profile {a.profile_name} not among the claim's mig_profiles")
        )
    gpu = view.gpus.get(a.gpu_address)
    if gpu is not None:
        profile = next((p for p in gpu.mig_profiles if p.profile_id == a.profile_id), None)
        if profile is not None and profile.name != a.profile_name:
            out.append(
                (
                    RULE_CAPACITY,
                    f"{what}: profile {a.profile_id} is {profile.name}, not {a.profile_name}",
                )
            )
    return out


def _check_numa(view: HostView, request: PlacementRequest, plan: Plan) -> list[_Finding]:
    nodes = sorted({a.numa_node for a in plan.assignments})
    policy = request.numa_policy
    if policy is NumaPolicy.SINGLE_NUMA_NODE:
        if len(nodes) > 1 or any(n < 0 for n in nodes):
            return [(RULE_NUMA, f"single-numa-node request spans NUMA nodes {nodes}")]
    elif policy is NumaPolicy.SOCKET:
        sockets = _sockets(view)
        unknown = [n for n in nodes if n not in sockets]
        if unknown:
            return [(RULE_NUMA, f"socket request on NUMA nodes {unknown} of no known socket")]
        if len({sockets[n] for n in nodes}) > 1:
            return [(RULE_NUMA, f"socket request spans sockets: NUMA nodes {nodes}")]
    return []


def _check_affinity(view: HostView, request: PlacementRequest, plan: Plan) -> list[_Finding]:
    out: list[_Finding] = []
    units = list(enumerate(plan.assignments))
    for aff in request.affinities:
        if not aff.required:
            continue
        for (i, a), (j, b) in combinations(units, 2):
            if {a.claim, b.claim} != {aff.claim_a, aff.claim_b}:
                continue
            fa = view.functions.get(_device_of(a))
            fb = view.functions.get(_device_of(b))
            if fa is None or fb is None:
                ok = False
            elif aff.scope is AffinityScope.SAME_NUMA_NODE:
                ok = fa.numa_node >= 0 and fa.numa_node == fb.numa_node
            elif aff.scope is AffinityScope.SAME_ROOT_PORT:
                ok = fa.root_port is not None and fa.root_port == fb.root_port
            else:
                # Under one switch (PIX/PXB): any switch upstream port in common.
                ups_a = {fa.bridge_chain[k] for k in range(1, len(fa.bridge_chain), 2)}
                ups_b = {fb.bridge_chain[k] for k in range(1, len(fb.bridge_chain), 2)}
                ok = bool(ups_a & ups_b)
            if not ok:
                out.append(
                    (
                        RULE_AFFINITY,
                        f"{aff.scope.value} between {aff.claim_a!r} and {aff.claim_b!r}: "
                        f"units {i} on {_device_of(a)} and {j} on {_device_of(b)}",
                    )
                )
    return out


# --- state checks -----------------------------------------------------------


def _state_findings(ledger: _Ledger) -> set[_Finding]:
    view = ledger.state.view
    out: set[_Finding] = set()
    out |= _dup_slots(ledger.holdings)
    modes = _modes(view, ledger.holdings)
    out |= _isolation(view, ledger.holdings, modes)
    out |= _interference(view, ledger.holdings, modes)
    out |= _vf_capacity(view, ledger.holdings)
    out |= _mdev_capacity(view, ledger.holdings)
    out |= _mig_capacity(view, ledger.holdings)
    out |= _host_share_capacity(view, ledger.holdings)
    out |= _exclusivity(view, ledger.holdings, ledger.holds)
    return out


def _host_share_capacity(view: HostView, holdings: Iterable[_Holding]) -> set[_Finding]:
    """Host CPU and memory held beside devices fit in what the host reports."""
    cpu = memory = 0
    # Holders of each, named: a placement taking none of one is no cause of its shortage.
    on_cpu: list[str] = []
    on_memory: list[str] = []
    for h in holdings:
        if isinstance(h.slot, HostShareSlot):
            cpu += h.slot.cpu_milli
            memory += h.slot.memory_mib
            if h.slot.cpu_milli:
                on_cpu.append(h.owner)
            if h.slot.memory_mib:
                on_memory.append(h.owner)
    out: set[_Finding] = set()
    if cpu > view.cpu_milli:
        who = ", ".join(sorted(on_cpu))
        out.add((RULE_CAPACITY, f"host CPU {cpu} milli held of {view.cpu_milli}: {who}"))
    if memory > view.memory_mib:
        who = ", ".join(sorted(on_memory))
        out.add((RULE_CAPACITY, f"host memory {memory} MiB held of {view.memory_mib}: {who}"))
    return out


def _dup_slots(holdings: Iterable[_Holding]) -> set[_Finding]:
    owners: dict[SlotKey, list[str]] = {}
    for h in holdings:
        owners.setdefault(h.key, []).append(h.owner)
    return {
        (RULE_SLOTS, f"slot {key} held {len(who)} times: {', '.join(who)}")
        for key, who in owners.items()
        if len(who) > 1
    }


#: Per device, per mode, who uses it that way ("live" for live objects).
_Modes = dict[PciAddress, dict[str, set[str]]]


def _modes(view: HostView, holdings: Iterable[_Holding]) -> _Modes:
    modes: _Modes = {}

    def use(device: PciAddress, mode: str, who: str) -> None:
        modes.setdefault(device, {}).setdefault(mode, set()).add(who)

    vf_functions = {
        (pf.address, vf.index): vf.address for pf in view.sriov_pfs.values() for vf in pf.vfs
    }
    for h in holdings:
        s = h.slot
        if isinstance(s, GroupSlot):
            for m in _endpoints(view, s.group):
                use(m, DeviceForm.WHOLE_DEVICE.value, h.owner)
        elif isinstance(s, VfSlot):
            use(s.pf, DeviceForm.VF.value, h.owner)
            # The VF's own function is used as a VF too: on SR-IOV vGPU it is
            # also an mdev parent, and an mdev there is a second use of it.
            vf = vf_functions.get((s.pf, s.index))
            if vf is not None:
                use(vf, DeviceForm.VF.value, h.owner)
        elif isinstance(s, MdevSlot):
            use(s.parent, DeviceForm.MDEV.value, h.owner)
        elif isinstance(s, MigSlot):
            use(s.gpu, DeviceForm.MIG.value, h.owner)
    for pf in view.sriov_pfs.values():
        if pf.num_vfs > 0:
            use(pf.address, DeviceForm.VF.value, "live")
    for fn in view.functions.values():
        if fn.num_vfs > 0:
            use(fn.address, DeviceForm.VF.value, "live")
    for parent in view.mdev_parents.values():
        if parent.live:
            use(parent.address, DeviceForm.MDEV.value, "live")
    for gpu in view.gpus.values():
        if gpu.gpu_instances:
            use(gpu.address, DeviceForm.MIG.value, "live")
    return modes


def _who(users: set[str]) -> str:
    return ",".join(sorted(users))


def _isolation(view: HostView, holdings: Sequence[_Holding], modes: _Modes) -> set[_Finding]:
    out: set[_Finding] = set()
    vf_groups: dict[IommuGroupNumber, list[str]] = {}
    for h in holdings:
        if isinstance(h.slot, VfSlot):
            pf = view.sriov_pfs.get(h.slot.pf)
            for vf in pf.vfs if pf is not None else ():
                if vf.index != h.slot.index:
                    continue
                if vf.iommu_group is not None:
                    vf_groups.setdefault(vf.iommu_group, []).append(f"{h.key} of {h.owner}")
                fn = view.functions.get(vf.address)
                if fn is not None and fn.host_use:
                    out.add((RULE_IOMMU_ISOLATION, f"{h.key} of {h.owner}: VF in host use"))
    for h in holdings:
        if not isinstance(h.slot, GroupSlot):
            continue
        g = h.slot.group
        group = view.iommu_groups.get(g)
        if group is None:
            out.add((RULE_IOMMU_ISOLATION, f"{h.owner} holds group {g}, not on the host"))
            continue
        for m in group.members:
            fn = view.functions.get(m)
            if fn is not None and fn.host_use:
                out.add((RULE_IOMMU_ISOLATION, f"{h.owner} holds group {g} with {m} in host use"))
        for m in _endpoints(view, g):
            for mode, users in sorted(modes.get(m, {}).items()):
                if mode != DeviceForm.WHOLE_DEVICE.value:
                    out.add(
                        (
                            RULE_IOMMU_ISOLATION,
                            f"{h.owner} holds group {g} whole; {m} also used as {mode} "
                            f"by {_who(users)}",
                        )
                    )
        for other in vf_groups.get(g, []):
            out.add((RULE_IOMMU_ISOLATION, f"{h.owner} holds group {g} whole; its VF is {other}"))
    return out


def _interference(view: HostView, holdings: Sequence[_Holding], modes: _Modes) -> set[_Finding]:
    out: set[_Finding] = set()
    for device, used in modes.items():
        if len(used) > 1:
            how = "; ".join(f"{mode} by {_who(users)}" for mode, users in sorted(used.items()))
            out.add((RULE_INTERFERENCE, f"{device} used in several modes: {how}"))
        gpu = view.gpus.get(device)
        if gpu is not None and gpu.mig_enabled and DeviceForm.MDEV.value in used:
            users = _who(used[DeviceForm.MDEV.value])
            out.add((RULE_INTERFERENCE, f"{device} has MIG enabled and mdevs of {users}"))
    for h in holdings:
        if isinstance(h.slot, MigSlot):
            gpu = view.gpus.get(h.slot.gpu)
            if gpu is None or not gpu.mig_enabled:
                out.add((RULE_INTERFERENCE, f"{h.key} of {h.owner}: MIG is not enabled there"))
    return out


def _vf_capacity(view: HostView, holdings: Sequence[_Holding]) -> set[_Finding]:
    out: set[_Finding] = set()
    users: dict[tuple[PciAddress, int], list[str]] = {}
    for h in holdings:
        s = h.slot
        if not isinstance(s, VfSlot):
            continue
        users.setdefault((s.pf, s.index), []).append(h.owner)
        pf = view.sriov_pfs.get(s.pf)
        if pf is None:
            out.add((RULE_CAPACITY, f"{h.key} of {h.owner}: {s.pf} is not an SR-IOV PF"))
            continue
        if not 0 <= s.index < pf.total_vfs:
            out.add((RULE_CAPACITY, f"{h.key} of {h.owner}: PF has {pf.total_vfs} VFs at most"))
        if pf.num_vfs > 0 and s.index >= pf.num_vfs:
            out.add((RULE_CAPACITY, f"{h.key} of {h.owner}: PF has {pf.num_vfs} VFs enabled"))
    for (pf_address, index), who in users.items():
        if len(who) > 1:
            out.add((RULE_CAPACITY, f"VF {index} of {pf_address} used by {', '.join(who)}"))
    return out


def _mdev_capacity(view: HostView, holdings: Sequence[_Holding]) -> set[_Finding]:
    out: set[_Finding] = set()
    allocated: dict[PciAddress, dict[str, str]] = {}
    for h in holdings:
        s = h.slot
        if not isinstance(s, MdevSlot):
            continue
        parent = view.mdev_parents.get(s.parent)
        if parent is None:
            out.add((RULE_CAPACITY, f"{h.key} of {h.owner}: {s.parent} is not an mdev parent"))
            continue
        if s.type_id not in parent.types:
            out.add((RULE_CAPACITY, f"{h.key} of {h.owner}: type {s.type_id} not offered"))
        allocated.setdefault(s.parent, {})[s.uuid] = s.type_id
    for address, parent in view.mdev_parents.items():
        everything = {**parent.live, **allocated.get(address, {})}
        counts = Counter(everything.values())
        share = Fraction(0)
        for type_id, n in sorted(counts.items()):
            offered = parent.types.get(type_id)
            if offered is None:
                continue
            if n > offered.max_instances:
                out.add(
                    (
                        RULE_CAPACITY,
                        f"{address} holds {n} mdevs of {type_id}, at most {offered.max_instances}",
                    )
                )
            if offered.max_instances > 0:
                share += Fraction(n, offered.max_instances)
        if share > 1:
            out.add((RULE_CAPACITY, f"{address} is filled to {share} by mdevs {dict(counts)}"))
        if parent.single_type and len(counts) > 1:
            out.add((RULE_MDEV_HOMOGENEITY, f"{address} takes one type, holds {sorted(counts)}"))
    return out


def _mig_capacity(view: HostView, holdings: Sequence[_Holding]) -> set[_Finding]:
    out: set[_Finding] = set()
    allocated: dict[PciAddress, list[tuple[MigSlot, str]]] = {}
    for h in holdings:
        if isinstance(h.slot, MigSlot):
            allocated.setdefault(h.slot.gpu, []).append((h.slot, h.owner))
    for address, gpu in view.gpus.items():
        if not gpu.mig_enabled:
            continue  # MIG there at all is interference
        profiles = {p.profile_id: p for p in gpu.mig_profiles}
        # (start, size, profile id, compute slices, who)
        instances = [
            (gi.start, gi.size, gi.profile_id, gi.slices, "live") for gi in gpu.gpu_instances
        ]
        live = {(gi.start, gi.size) for gi in gpu.gpu_instances}
        for s, owner in allocated.get(address, []):
            what = f"{mig_slot(s.gpu, s.profile_id, s.start, s.size)} of {owner}"
            profile = profiles.get(s.profile_id)
            if profile is None:
                out.add((RULE_CAPACITY, f"{what}: profile {s.profile_id} not offered"))
            elif (s.start, s.size) not in profile.placements:
                out.add((RULE_CAPACITY, f"{what}: not a placement of {profile.name}"))
            if (s.start, s.size) in live:
                continue  # the agent created it: counted once, as live
            slices = profile.slices if profile is not None else 0
            instances.append((s.start, s.size, s.profile_id, slices, owner))
        for start, size, pid, _, who in instances:
            if start < 0 or size <= 0 or start + size > _MIG_MEMORY_SLICES:
                out.add((RULE_CAPACITY, f"{address}: {who}'s {pid}@{start}+{size} off the GPU"))
        for a, b in combinations(sorted(instances), 2):
            if a[0] < b[0] + b[1] and b[0] < a[0] + a[1]:
                out.add(
                    (
                        RULE_CAPACITY,
                        f"{address}: {a[4]}'s {a[2]}@{a[0]}+{a[1]} overlaps "
                        f"{b[4]}'s {b[2]}@{b[0]}+{b[1]}",
                    )
                )
        compute = sum(i[3] for i in instances)
        if compute > _MIG_COMPUTE_SLICES:
            out.add((RULE_CAPACITY, f"{address}: {compute} compute slices in use"))
        per_profile = Counter(i[2] for i in instances)
        for pid, n in sorted(per_profile.items()):
            limit = _MIG_INSTANCE_LIMITS.get(pid)
            if limit is not None and n > limit:
                out.add(
                    (RULE_CAPACITY, f"{address}: {n} instances of profile {pid}, at most {limit}")
                )
    return out


def _exclusivity(
    view: HostView, holdings: Sequence[_Holding], holds: Sequence[_Hold]
) -> set[_Finding]:
    out: set[_Finding] = set()
    for hold in holds:
        name = f"{hold.owner} (tenant {hold.tenant}) holds {hold.domain.value}:{hold.instance}"
        for h in holdings:
            if h.tenant == hold.tenant:
                continue
            for device in _touched(view, h.slot):
                if _domain_instance(view, device, hold.domain) == hold.instance:
                    out.add(
                        (
                            RULE_EXCLUSIVITY,
                            f"{name}; {h.owner} (tenant {h.tenant}) has {h.key} inside",
                        )
                    )
        for other in holds:
            same = (other.domain, other.instance) == (hold.domain, hold.instance)
            if same and other.tenant != hold.tenant and other.owner > hold.owner:
                out.add((RULE_EXCLUSIVITY, f"{name}; {other.owner} (tenant {other.tenant}) too"))
    return out
