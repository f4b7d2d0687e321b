"""The one place where wire messages become domain values and back."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tessera.scheduler.core.host import (
    GpuView,
    HostView,
    IommuGroupView,
    MdevParentView,
    MdevTypeView,
    NumaNodeView,
    PciFunctionView,
    PciRole,
    SriovPfView,
    VfView,
)
from tessera.scheduler.core.identity import (
    HostId,
    IommuGroupNumber,
    PciAddress,
    PlacementId,
    RequestId,
    TenantName,
    vfio_group_path,
)
from tessera.scheduler.core.lifecycle import PlacementState
from tessera.scheduler.core.mig import GpuInstance, MigProfile, MigProfileName
from tessera.scheduler.core.plan import (
    Assignment,
    MdevAssignment,
    Plan,
    Unschedulable,
    VfAssignment,
    WholeDeviceAssignment,
)
from tessera.scheduler.core.request import (
    FORM_ISOLATION,
    Affinity,
    AffinityScope,
    Claim,
    DeviceForm,
    DeviceKind,
    DeviceSelector,
    ExclusivityDomain,
    Isolation,
    NumaPolicy,
    PlacementRequest,
)
from tessera.scheduler.core.validation import (
    MAX_AFFINITIES,
    MAX_BATCH,
    MAX_CLAIM_LIST,
    MAX_CLAIMS,
    MAX_IDENT,
    MAX_REPORTED,
    MAX_SELECTOR_LABELS,
    FieldViolation,
    InvalidRequestError,
    check_length,
    shown,
    validate_request,
    validate_text,
)
from tessera.v1 import inventory_pb2, placement_pb2, scheduler_pb2

_KINDS: Mapping[int, DeviceKind] = {
    placement_pb2.DEVICE_KIND_GPU: DeviceKind.GPU,
    placement_pb2.DEVICE_KIND_NIC: DeviceKind.NIC,
    placement_pb2.DEVICE_KIND_ACCELERATOR: DeviceKind.ACCELERATOR,
}
_FORMS: Mapping[int, DeviceForm] = {
    placement_pb2.DEVICE_FORM_WHOLE_DEVICE: DeviceForm.WHOLE_DEVICE,
    placement_pb2.DEVICE_FORM_VF: DeviceForm.VF,
    placement_pb2.DEVICE_FORM_MDEV: DeviceForm.MDEV,
    placement_pb2.DEVICE_FORM_MIG: DeviceForm.MIG,
}
_ISOLATION: Mapping[int, Isolation] = {
    placement_pb2.ISOLATION_UNSPECIFIED: Isolation.EXCLUSIVE,
    placement_pb2.ISOLATION_EXCLUSIVE: Isolation.EXCLUSIVE,
    placement_pb2.ISOLATION_PARTITIONED: Isolation.PARTITIONED,
    placement_pb2.ISOLATION_SHARED: Isolation.SHARED,
}
#: Each isolation level as the wire names it (UNSPECIFIED, read as exclusive, aside).
_WIRE_ISOLATION: Mapping[Isolation, int] = {
    level: wire for wire, level in _ISOLATION.items() if wire != placement_pb2.ISOLATION_UNSPECIFIED
}


def least_isolation(form: placement_pb2.DeviceForm.ValueType) -> placement_pb2.Isolation.ValueType:
    """The least isolation a claim of ``form`` must accept (:data:`FORM_ISOLATION`), on the wire.

    What a client building a claim of one form asks for by default: a MIG
    instance is refused to a claim that accepts only exclusive devices.
    """
    return placement_pb2.Isolation.ValueType(_WIRE_ISOLATION[FORM_ISOLATION[_FORMS[form]]])


_NUMA: Mapping[int, NumaPolicy] = {
    placement_pb2.NUMA_POLICY_UNSPECIFIED: NumaPolicy.NONE,
    placement_pb2.NUMA_POLICY_NONE: NumaPolicy.NONE,
    placement_pb2.NUMA_POLICY_PREFERRED: NumaPolicy.PREFERRED,
    placement_pb2.NUMA_POLICY_SINGLE_NUMA_NODE: NumaPolicy.SINGLE_NUMA_NODE,
    placement_pb2.NUMA_POLICY_SOCKET: NumaPolicy.SOCKET,
}
_SCOPES: Mapping[int, AffinityScope] = {
    placement_pb2.AFFINITY_SCOPE_SAME_SWITCH: AffinityScope.SAME_SWITCH,
    placement_pb2.AFFINITY_SCOPE_SAME_ROOT_PORT: AffinityScope.SAME_ROOT_PORT,
    placement_pb2.AFFINITY_SCOPE_SAME_NUMA_NODE: AffinityScope.SAME_NUMA_NODE,
}
_EXCLUSIVITY: Mapping[int, ExclusivityDomain] = {
    placement_pb2.EXCLUSIVITY_DOMAIN_UNSPECIFIED: ExclusivityDomain.NONE,
    placement_pb2.EXCLUSIVITY_DOMAIN_NONE: ExclusivityDomain.NONE,
    placement_pb2.EXCLUSIVITY_DOMAIN_DEVICE: ExclusivityDomain.DEVICE,
    placement_pb2.EXCLUSIVITY_DOMAIN_PCIE_SWITCH: ExclusivityDomain.PCIE_SWITCH,
    placement_pb2.EXCLUSIVITY_DOMAIN_NUMA_NODE: ExclusivityDomain.NUMA_NODE,
    placement_pb2.EXCLUSIVITY_DOMAIN_HOST: ExclusivityDomain.HOST,
}
_ROLES: Mapping[int, PciRole] = {
    inventory_pb2.PCI_ROLE_ENDPOINT: PciRole.ENDPOINT,
    inventory_pb2.PCI_ROLE_RCIEP: PciRole.RCIEP,
    inventory_pb2.PCI_ROLE_ROOT_PORT: PciRole.ROOT_PORT,
    inventory_pb2.PCI_ROLE_SWITCH_UPSTREAM: PciRole.SWITCH_UPSTREAM,
    inventory_pb2.PCI_ROLE_SWITCH_DOWNSTREAM: PciRole.SWITCH_DOWNSTREAM,
    inventory_pb2.PCI_ROLE_PCI_BRIDGE: PciRole.PCI_BRIDGE,
}


def _enum(
    value: int,
    table: Mapping[int, object],
    path: str,
    enum_name: str,
    out: list[FieldViolation],
) -> None:
    if value not in table:
        out.append(
            FieldViolation(path, f"must be a known {enum_name} other than UNSPECIFIED ({value})")
        )


def _wire_sizes(msg: placement_pb2.PlacementRequest, prefix: str) -> list[FieldViolation]:
    """Lists of a wire request over their bounds (the domain's frozensets hide duplicates)."""
    out: list[FieldViolation] = []
    check_length(msg.claims, MAX_CLAIMS, f"{prefix}claims", out)
    check_length(msg.affinities, MAX_AFFINITIES, f"{prefix}affinities", out)
    check_length(msg.host_selector, MAX_SELECTOR_LABELS, f"{prefix}host_selector", out)
    for i, c in enumerate(msg.claims[: MAX_CLAIMS + 1]):
        path = f"{prefix}claims[{i}]"
        check_length(c.forms, MAX_CLAIM_LIST, f"{path}.forms", out)
        check_length(c.mdev_types, MAX_CLAIM_LIST, f"{path}.mdev_types", out)
        check_length(c.mig_profiles, MAX_CLAIM_LIST, f"{path}.mig_profiles", out)
        check_length(c.selector.device_ids, MAX_CLAIM_LIST, f"{path}.selector.device_ids", out)
        check_length(c.selector.models, MAX_CLAIM_LIST, f"{path}.selector.models", out)
    return out


def request_from_proto(msg: placement_pb2.PlacementRequest, prefix: str = "") -> PlacementRequest:
    """Convert a wire request to the domain.

    Lists are bounded first: nothing is converted (and no violation listed
    per entry) for a request whose lists are longer than the contract
    allows, so the work stays small whatever the client sent.

    Raises:
        InvalidRequestError: a list is too long, the gang name too long, or
            an enum is unspecified or unknown (the domain has no value for
            it); semantic checks are validate_request's.
    """
    out = _wire_sizes(msg, prefix)
    if out:
        raise InvalidRequestError(out)
    out += validate_text(msg.gang, f"{prefix}gang", MAX_IDENT)
    claims: list[Claim] = []
    for i, c in enumerate(msg.claims):
        path = f"{prefix}claims[{i}]"
        _enum(c.kind, _KINDS, f"{path}.kind", "DeviceKind", out)
        for j, form in enumerate(c.forms):
            _enum(form, _FORMS, f"{path}.forms[{j}]", "DeviceForm", out)
        _enum(c.min_isolation, _ISOLATION, f"{path}.min_isolation", "Isolation", out)
        if out:
            continue
        forms = frozenset(_FORMS[f] for f in c.forms) or frozenset({DeviceForm.WHOLE_DEVICE})
        claims.append(
            Claim(
                name=c.name,
                kind=_KINDS[c.kind],
                count=c.count,
                forms=forms,
                selector=DeviceSelector(
                    vendor_id=c.selector.vendor_id,
                    device_ids=frozenset(c.selector.device_ids),
                    models=frozenset(c.selector.models),
                ),
                mdev_types=frozenset(c.mdev_types),
                mig_profiles=frozenset(c.mig_profiles),
                min_isolation=_ISOLATION[c.min_isolation],
                migratable=c.migratable,
            )
        )
    affinities: list[Affinity] = []
    for i, a in enumerate(msg.affinities):
        _enum(a.scope, _SCOPES, f"{prefix}affinities[{i}].scope", "AffinityScope", out)
        if a.scope in _SCOPES:
            affinities.append(Affinity(a.claim_a, a.claim_b, _SCOPES[a.scope], a.required))
    _enum(msg.numa_policy, _NUMA, f"{prefix}numa_policy", "NumaPolicy", out)
    _enum(msg.exclusivity, _EXCLUSIVITY, f"{prefix}exclusivity", "ExclusivityDomain", out)
    if out:
        raise InvalidRequestError(out)
    return PlacementRequest(
        request_id=RequestId(msg.request_id),
        tenant=TenantName(msg.tenant),
        claims=tuple(claims),
        priority=msg.priority,
        numa_policy=_NUMA[msg.numa_policy],
        affinities=tuple(affinities),
        exclusivity=_EXCLUSIVITY[msg.exclusivity],
        host_selector=dict(msg.host_selector),
        cpu_milli=msg.cpu_milli,
        memory_mib=msg.memory_mib,
    )


def parsed_request(msg: placement_pb2.PlacementRequest, prefix: str = "") -> PlacementRequest:
    """A wire request converted and validated.

    Raises:
        InvalidRequestError: every problem, with field paths under ``prefix``.
    """
    request = request_from_proto(msg, prefix)
    violations = validate_request(request, prefix)
    if violations:
        raise InvalidRequestError(violations)
    return request


def parsed_requests(
    messages: Sequence[placement_pb2.PlacementRequest],
) -> list[PlacementRequest]:
    """A batch of wire requests, the problems of every request reported at once.

    Raises:
        InvalidRequestError: with field paths ``requests[i].<field>``, a
            request id appearing twice included; the first
            :data:`MAX_REPORTED` problems are kept, the others counted.
    """
    violations: list[FieldViolation] = []
    # Problems past the ones reported are only counted: a batch of a million
    # bad requests must not build a million violations.
    more = 0
    if not check_length(messages, MAX_BATCH, "requests", violations):
        raise InvalidRequestError(violations)
    requests: list[PlacementRequest] = []
    seen: set[str] = set()
    for i, msg in enumerate(messages):
        prefix = f"requests[{i}]."
        found: list[FieldViolation] = []
        try:
            requests.append(parsed_request(msg, prefix))
        except InvalidRequestError as err:
            found.extend(err.violations)
        if msg.request_id in seen:
            found.append(
                FieldViolation(f"{prefix}request_id", f"{shown(msg.request_id)} appears twice")
            )
        seen.add(msg.request_id)
        room = max(0, MAX_REPORTED - len(violations))
        violations.extend(found[:room])
        more += len(found) - len(found[:room])
    if violations:
        raise InvalidRequestError(violations, more)
    return requests


def request_digest(msg: placement_pb2.PlacementRequest) -> str:
    """Fingerprint of a request, to tell a retry from a reused request_id.

    Deterministic serialization sorts map entries, so equal requests hash
    equally whatever the client's field order.
    """
    return hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest()


@dataclass(frozen=True)
class Submitted:
    """A wire request converted once, at the edge: what the use cases work on.

    Attributes:
        request: the validated domain request.
        digest: the wire request's fingerprint (:func:`request_digest`), to
            tell a retry from a reused request id.
        gang: the gang it belongs to ("" for none): PlaceBatch's concern,
            not the domain request's.
        prefix: prepended to field paths in errors ("requests[2]." in a batch).
    """

    request: PlacementRequest
    digest: str
    gang: str = ""
    prefix: str = ""

    @property
    def exclusive(self) -> bool:
        """Whether the request holds a domain for its tenant (its commit guards the domain)."""
        return self.request.exclusivity is not ExclusivityDomain.NONE


def submitted(msg: placement_pb2.PlacementRequest, prefix: str = "") -> Submitted:
    """A wire request converted and validated, with its fingerprint.

    Raises:
        InvalidRequestError: every problem, with field paths under ``prefix``.
    """
    return Submitted(
        parsed_request(msg, prefix),
        request_digest(msg),
        msg.gang,
        prefix,
    )


def submitted_batch(messages: Sequence[placement_pb2.PlacementRequest]) -> list[Submitted]:
    """A batch of wire requests converted, the problems of every request reported at once.

    Raises:
        InvalidRequestError: as :func:`parsed_requests` raises it.
    """
    requests = parsed_requests(messages)
    return [
        Submitted(request, request_digest(msg), msg.gang, f"requests[{i}].")
        for i, (request, msg) in enumerate(zip(requests, messages, strict=True))
    ]


#: NVIDIA vGPU descriptions end with the type's per-GPU limit.
_MAX_INSTANCE = re.compile(r"max_instance=(\d+)")


def stated_max_instances(description: str) -> int | None:
    """The per-parent limit an mdev type's description states (``max_instance=N``), if any.

    A number of more than 9 digits is no instance count (only a malformed
    report has one) and reads as not stated, so this never raises (``int``
    refuses over 4,300 digits) nor hands the engine a huge number.
    """
    stated = _MAX_INSTANCE.search(description)
    if stated is None or len(stated.group(1)) > 9:
        return None
    return int(stated.group(1))


def _mdev_parent(parent: inventory_pb2.MdevParent) -> MdevParentView:
    live = {i.uuid: i.type_id for i in parent.instances}
    types: dict[str, MdevTypeView] = {}
    for t in parent.types:
        stated = stated_max_instances(t.description)
        # Without the vendor's figure, what an empty parent holds is what is
        # free now plus what this type already uses.
        inferred = t.available_instances + sum(1 for v in live.values() if v == t.id)
        types[t.id] = MdevTypeView(
            type_id=t.id,
            available=t.available_instances,
            max_instances=stated if stated is not None else inferred,
            migratable=t.migratable,
        )
    return MdevParentView(PciAddress(parent.address), types, live, parent.single_type)


def _gpu(gpu: inventory_pb2.Gpu) -> GpuView:
    profiles = tuple(
        MigProfile(
            MigProfileName(p.name),
            p.profile_id,
            p.slice_count,
            tuple((pl.start, pl.size) for pl in p.placements),
        )
        for p in gpu.mig_profiles
    )
    slices = {p.profile_id: p.slices for p in profiles}
    instances = tuple(
        GpuInstance(
            gi.placement.start,
            gi.placement.size,
            gi.profile_id,
            # A GI of a profile the report does not list still occupies its
            # memory; count one compute slice at least.
            max(1, slices.get(gi.profile_id, 1)),
        )
        for gi in gpu.gpu_instances
    )
    return GpuView(
        address=PciAddress(gpu.address),
        model=gpu.model,
        mig_enabled=gpu.mig_mode_current == inventory_pb2.MIG_MODE_ENABLED,
        mig_profiles=profiles,
        gpu_instances=instances,
    )


def host_view_from_inventory(inv: inventory_pb2.HostInventory) -> HostView:
    """Build the scheduler's view of a host from its agent's report."""
    models = {g.address: g.model for g in inv.gpus}
    num_vfs = {pf.address: pf.num_vfs for pf in inv.sriov_pfs}
    functions = {
        PciAddress(f.address): PciFunctionView(
            address=PciAddress(f.address),
            vendor_id=f.vendor_id,
            device_id=f.device_id,
            class_code=f.class_code,
            driver=f.driver or None,
            numa_node=f.numa_node,
            iommu_group=IommuGroupNumber(f.iommu_group) if f.has_iommu_group else None,
            role=_ROLES.get(f.role, PciRole.ENDPOINT),
            root_bus=f.root_bus,
            bridge_chain=tuple(PciAddress(b) for b in f.bridge_chain),
            physfn=PciAddress(f.physfn) if f.physfn else None,
            model=models.get(f.address),
            num_vfs=num_vfs.get(f.address, 0),
            host_use=f.host_use or None,
            migration_driver=f.migratability.migration_driver or None,
        )
        for f in inv.pci_functions
    }
    groups = {
        IommuGroupNumber(g.number): IommuGroupView(
            IommuGroupNumber(g.number), tuple(PciAddress(m) for m in g.members)
        )
        for g in inv.iommu_groups
    }
    pfs = {
        PciAddress(pf.address): SriovPfView(
            address=PciAddress(pf.address),
            total_vfs=pf.total_vfs,
            num_vfs=pf.num_vfs,
            vfs=tuple(
                VfView(
                    vf.index,
                    PciAddress(vf.address),
                    IommuGroupNumber(vf.iommu_group) if vf.has_iommu_group else None,
                )
                for vf in pf.vfs
            ),
            vf_migration_driver=pf.vf_migration_driver or None,
        )
        for pf in inv.sriov_pfs
    }
    return HostView(
        host_id=HostId(inv.host_id),
        functions=functions,
        iommu_groups=groups,
        numa_nodes=tuple(
            NumaNodeView(n.id, tuple(n.distances), _cpu_count(n.cpulist), n.memory_kib // 1024)
            for n in inv.numa_nodes
        ),
        labels=dict(inv.labels),
        iommu_present=inv.iommu_present,
        sriov_pfs=pfs,
        mdev_parents={PciAddress(m.address): _mdev_parent(m) for m in inv.mdev_parents},
        gpus={PciAddress(g.address): _gpu(g) for g in inv.gpus},
    )


def cpu_ranges(cpulist: str) -> list[tuple[int, int]]:
    """The CPUs a kernel cpulist (``0-31,64-95``) names, as sorted, merged ``(first, last)`` ranges.

    Never by listing CPUs: a checked cpulist may still name every CPU below
    8,192 hundreds of times. Parts that are not a range of CPU ids below
    65,536 are skipped (a cpulist the inventory check refuses names none).
    """
    ranges: list[tuple[int, int]] = []
    for part in cpulist.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdecimal() or (high and not high.isdecimal()):
            continue
        first, last = int(low), int(high or low)
        if first <= last < 1 << 16:
            ranges.append((first, last))
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _cpu_count(cpulist: str) -> int:
    """How many CPUs a kernel cpulist names; 0 for one that is not one."""
    return sum(last - first + 1 for first, last in cpu_ranges(cpulist))


def allocation_from_assignment(a: Assignment) -> placement_pb2.ClaimAllocation:
    """The wire form of one claim unit's assignment.

    Handles the agent fills in (a VF's address and group once it exists, an
    mdev's group, MIG instance ids) stay empty until Prepare answers.
    """
    if isinstance(a, WholeDeviceAssignment):
        return placement_pb2.ClaimAllocation(
            claim=a.claim,
            whole_device=placement_pb2.WholeDeviceSlot(
                address=a.address, group_endpoints=list(a.group_endpoints)
            ),
            iommu_group=a.iommu_group,
            vfio_path=a.vfio_path,
            numa_node=a.numa_node,
        )
    if isinstance(a, VfAssignment):
        return placement_pb2.ClaimAllocation(
            claim=a.claim,
            vf=placement_pb2.VfSlot(
                pf_address=a.pf_address,
                vf_address=a.vf_address or "",
                vf_index=a.vf_index,
                num_vfs=a.num_vfs,
                vfio_driver=a.vfio_driver,
            ),
            iommu_group=a.iommu_group or 0,
            vfio_path=vfio_group_path(a.iommu_group) if a.iommu_group is not None else "",
            numa_node=a.numa_node,
        )
    if isinstance(a, MdevAssignment):
        return placement_pb2.ClaimAllocation(
            claim=a.claim,
            mdev=placement_pb2.MdevSlot(
                parent_address=a.parent_address, type_id=a.type_id, uuid=a.uuid
            ),
            numa_node=a.numa_node,
        )
    return placement_pb2.ClaimAllocation(
        claim=a.claim,
        mig=placement_pb2.MigSlot(
            gpu_address=a.gpu_address,
            profile_name=a.profile_name,
            profile_id=a.profile_id,
            placement=inventory_pb2.MigPlacement(start=a.start, size=a.size),
        ),
        numa_node=a.numa_node,
    )


# The wire's name of each lifecycle state (scheduler.core.lifecycle has the moves).
_WIRE_STATES: Mapping[PlacementState, placement_pb2.PlacementState.ValueType] = {
    PlacementState.PENDING: placement_pb2.PLACEMENT_STATE_PENDING,
    PlacementState.READY: placement_pb2.PLACEMENT_STATE_READY,
    PlacementState.RELEASING: placement_pb2.PLACEMENT_STATE_RELEASING,
    PlacementState.FAILED: placement_pb2.PLACEMENT_STATE_FAILED,
}


_STATES_ON_WIRE: Mapping[placement_pb2.PlacementState.ValueType, PlacementState] = {
    wire: state for state, wire in _WIRE_STATES.items()
}


def state_of(placement: placement_pb2.Placement) -> PlacementState | None:
    """The lifecycle state a placement says it is in (None: no state it names)."""
    return _STATES_ON_WIRE.get(placement.state)


def as_prepared(
    sent: placement_pb2.Placement, answered: placement_pb2.Placement
) -> placement_pb2.Placement:
    """What an agent answered Prepare with, but the history the scheduler sent.

    The agent fills in what it made (a VF's address, an mdev's or a MIG
    instance's handle); the states a placement went through are the
    scheduler's to say, not a host's.
    """
    prepared = placement_pb2.Placement()
    prepared.CopyFrom(answered)
    prepared.ClearField("history")
    prepared.history.extend(sent.history)
    return prepared


#: State changes a placement keeps (:func:`with_state`).
MAX_HISTORY = 32


def with_state(
    placement: placement_pb2.Placement, state: PlacementState, message: str, now_ms: int
) -> placement_pb2.Placement:
    """A copy of a placement in another lifecycle state, stamped now."""
    moved = placement_pb2.Placement()
    moved.CopyFrom(placement)
    moved.state = _WIRE_STATES[state]
    moved.message = message
    moved.updated_unix_ms = now_ms
    moved.history.append(
        placement_pb2.StateChange(state=moved.state, unix_ms=now_ms, message=message)
    )
    if len(moved.history) > MAX_HISTORY:
        # The first (when and how it was made) and the newest stay.
        del moved.history[1 : len(moved.history) - MAX_HISTORY + 1]
    return moved


def placement_from_plan(
    plan: Plan,
    *,
    placement_id: PlacementId,
    request: PlacementRequest | placement_pb2.PlacementRequest,
    now_ms: int,
) -> placement_pb2.Placement:
    """A pending Placement for a plan about to be committed.

    ``request`` may be the domain request or the wire one: only its id,
    tenant, priority and host share are read, which the two spell alike.
    """
    allocations = [allocation_from_assignment(a) for a in plan.assignments]
    return placement_pb2.Placement(
        placement_id=placement_id,
        request_id=request.request_id,
        tenant=request.tenant,
        host_id=plan.host_id,
        allocations=allocations,
        state=placement_pb2.PLACEMENT_STATE_PENDING,
        message="reserved; waiting for the agent",
        created_unix_ms=now_ms,
        updated_unix_ms=now_ms,
        priority=request.priority,
        cpu_milli=request.cpu_milli,
        memory_mib=request.memory_mib,
        history=[
            placement_pb2.StateChange(
                state=placement_pb2.PLACEMENT_STATE_PENDING,
                unix_ms=now_ms,
                message="reserved; waiting for the agent",
            )
        ],
    )


def explain_response(
    request: PlacementRequest, result: Plan | Unschedulable
) -> scheduler_pb2.ExplainResponse:
    """What Explain answers: where ``request`` would go and why, or each plugin's refusals."""
    if isinstance(result, Unschedulable):
        by_plugin: dict[str, list[str]] = defaultdict(list)
        totals: dict[str, int] = defaultdict(int)
        for r in result.rejections:
            by_plugin[r.plugin].append(f"{r.reason}: {r.count}")
            totals[r.plugin] += r.count
        return scheduler_pb2.ExplainResponse(
            placeable=False,
            summary=result.summary,
            verdicts=[
                scheduler_pb2.FilterVerdict(plugin=p, rejected=totals[p], reasons=reasons)
                for p, reasons in sorted(by_plugin.items())
            ],
        )
    placement = placement_from_plan(result, placement_id=PlacementId(""), request=request, now_ms=0)
    placement.message = "would be placed here (nothing reserved)"
    return scheduler_pb2.ExplainResponse(
        placeable=True,
        placement=placement,
        summary=f"fits on {result.host_id} with score {result.score}",
        # Why this host: each scorer's contribution, as a verdict that
        # rejected nothing.
        verdicts=[
            scheduler_pb2.FilterVerdict(plugin=line.split(" ", 1)[0], reasons=[line])
            for line in result.reasons
        ],
    )
