"""The engine's fast path: one request, indexed filter, search, score, best choice.

Hosts are visited most-packed first (best fit) using a per-host index of idle
devices by kind, built once per host state and reused across requests; the
first few hosts that fit are scored in full and the best wins. Within a host,
a depth-first search assigns each claim unit an option (a whole device, or a
pool of interchangeable slices), trying NUMA domains in preference order and
preferred affinities before required-only. Pure: snapshot in, plan out.
"""

from __future__ import annotations

import heapq
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from scheduler.core.engine.framework import (
    Cycle,
    HostFilter,
    Option,
    OptionFilter,
    OptionGenerator,
    Pick,
    Rejections,
    Reserver,
    Scorer,
    SearchPass,
    UnitFilter,
)
from scheduler.core.engine.plugins import (
    REASON_CORDONED,
    REASON_LEASE_EXPIRED,
    REASON_NO_MATCHING_DEVICE,
    REASON_TOO_FEW,
    REASON_TOPOLOGY,
    AffinityPlugin,
    BestFitScorer,
    CapacityPlugin,
    DeviceMatchPlugin,
    ExclusivityPlugin,
    FreeVfIndexes,
    HostSelectorPlugin,
    HostUsePlugin,
    InterferencePlugin,
    IommuIsolationPlugin,
    LeasePlugin,
    LocalityScorer,
    MdevHomogeneityPlugin,
    MdevOptions,
    MigFragmentationScorer,
    MigOptions,
    MigratabilityPlugin,
    NumaPlugin,
    SharingScorer,
    VfOptions,
    WholeDeviceOptions,
    free_vfs,
    numa_domains,
)
from scheduler.core.host import HostView
from scheduler.core.identity import (
    HostId,
    PciAddress,
    PlacementId,
    SlotKey,
    TenantName,
    iommu_group_slot,
    vfio_group_path,
)
from scheduler.core.mig_geometry import capacity, fragmentation_score
from scheduler.core.occupancy import Occupancy, build_occupancy, domain_instance
from scheduler.core.plan import (
    Assignment,
    MdevAssignment,
    MigAssignment,
    Plan,
    Unschedulable,
    VfAssignment,
    WholeDeviceAssignment,
)
from scheduler.core.request import (
    Claim,
    DeviceForm,
    DeviceKind,
    ExclusivityDomain,
    PlacementRequest,
)
from scheduler.core.slots import exclusive_slot, mdev_slot, mig_slot, vf_slot
from scheduler.core.snapshot import ClusterSnapshot, HostState
from scheduler.core.topology import TopologyGraph

#: Upper bound on search steps per host and pass, so a pathological request
#: cannot stall the scheduler; hosts have tens of devices and pools collapse
#: interchangeable slices, so real requests stay far below it.
SEARCH_BUDGET = 20_000

#: Namespace of the mdev UUIDs the engine chooses (uuid5 of host, generation,
#: request and unit): deterministic, so the engine stays a pure function, and
#: unique, because the generation moves with every commit on the host.
MDEV_UUID_NAMESPACE = uuid.UUID("6f1c2a52-3c3e-4d4f-9a51-746573736572")

#: Device kinds in a fixed order: per-host counts are tuples indexed by it
#: (the hot loop over every host must not hash enums).
_KINDS: tuple[DeviceKind, ...] = tuple(DeviceKind)
_KIND_POSITION = {kind: i for i, kind in enumerate(_KINDS)}

#: Forms in order of economy: the smallest footprint that satisfies a claim.
_FORM_ORDER = {
    DeviceForm.VF: 0,
    DeviceForm.MDEV: 0,
    DeviceForm.MIG: 1,
    DeviceForm.WHOLE_DEVICE: 2,
}


@dataclass(frozen=True)
class EngineProfile:
    """The plugins an engine runs, in order (a scheduler profile)."""

    host_filters: tuple[HostFilter, ...]
    generators: Mapping[DeviceForm, OptionGenerator]
    option_filters: tuple[OptionFilter, ...]
    reserver: Reserver
    unit_filters: tuple[UnitFilter, ...]
    scorers: tuple[Scorer, ...]


def default_profile() -> EngineProfile:
    """Every constraint family and scorer Tessera ships."""
    capacity = CapacityPlugin()
    return EngineProfile(
        host_filters=(LeasePlugin(), HostSelectorPlugin()),
        generators={
            DeviceForm.WHOLE_DEVICE: WholeDeviceOptions(),
            DeviceForm.VF: VfOptions(),
            DeviceForm.MDEV: MdevOptions(),
            DeviceForm.MIG: MigOptions(),
        },
        option_filters=(
            DeviceMatchPlugin(),
            HostUsePlugin(),
            IommuIsolationPlugin(),
            InterferencePlugin(),
            MigratabilityPlugin(),
            MdevHomogeneityPlugin(),
            ExclusivityPlugin(),
            capacity,
        ),
        reserver=capacity,
        unit_filters=(NumaPlugin(), AffinityPlugin()),
        scorers=(BestFitScorer(), SharingScorer(), LocalityScorer(), MigFragmentationScorer()),
    )


@dataclass(frozen=True)
class HostFit:
    """A complete assignment of a request on one host, scored."""

    state: HostState
    picks: tuple[Pick, ...]
    score: int
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class _HostIndex:
    """Per host state: its occupancy and idle devices by kind (the hot-path index)."""

    view: HostView
    occupancy: Occupancy
    #: Idle devices (no use of any kind) per kind, in :data:`_KINDS` order.
    idle: tuple[int, ...]


@dataclass
class Engine:
    """Places requests on a cluster snapshot.

    Holds a memo of per-host indexes keyed by host, allocation generation and
    inventory view, so consecutive requests on a mostly unchanged cluster do
    not rebuild them; results never depend on the memo.

    Attributes:
        profile: the plugins.
        feasible_hosts: how many fitting hosts the fast path scores before
            choosing; 1 is first fit on the best-fit order.
    """

    profile: EngineProfile = field(default_factory=default_profile)
    feasible_hosts: int = 4
    _index: dict[tuple[HostId, int, tuple[PlacementId, ...]], _HostIndex] = field(
        default_factory=dict, repr=False
    )
    # (hardware class, static shape) -> why an empty host of the class can
    # never take the shape, or None when it can.
    _never: dict[tuple[int, int], Rejections | None] = field(default_factory=dict, repr=False)
    _topology: TopologyGraph = field(default_factory=TopologyGraph, repr=False)
    _classes_in_graph: set[HostId] = field(default_factory=set, repr=False)
    # Static request shapes, interned: the hot loop keys on small ints.
    _shape_ids: dict[tuple[object, ...], int] = field(default_factory=dict, repr=False)
    _fits: dict[tuple[object, ...], tuple[HostView, HostFit | None, Rejections]] = field(
        default_factory=dict, repr=False
    )

    # ------------------------------------------------------------ host index

    def host_index(self, state: HostState) -> _HostIndex:
        """The memoised index of a host state."""
        view = state.view
        key = (view.host_id, state.alloc_generation, state.planned)
        found = self._index.get(key)
        if found is not None and found.view is view:
            return found
        occupancy = build_occupancy(state)
        idle = tuple(
            sum(1 for d in view.whole_devices(kind) if d.address not in occupancy.modes)
            for kind in _KINDS
        )
        index = _HostIndex(view, occupancy, idle)
        if len(self._index) > 4 * 65536:
            # Bounded: old generations are dead weight.
            self._index.clear()
        self._index[key] = index
        return index

    def _distance(self, view: HostView) -> Callable[[PciAddress, PciAddress], int]:
        """PCIe distance on a host, read from the topology graph of its hardware class.

        The graph holds one node set per hardware class, not per host: hosts
        of a class share their PCIe tree, and a networkx graph of every host
        of a 10,000-host fleet would cost gigabytes. A class enters the graph
        the first time a request needs a distance on it.
        """
        cls = view.hardware_class

        def distance(a: PciAddress, b: PciAddress) -> int:
            node = HostId(f"class:{cls & 0xFFFFFFFFFFFFFFFF:016x}")
            if node not in self._classes_in_graph:
                if len(self._classes_in_graph) >= 4096:
                    for old in self._classes_in_graph:
                        self._topology.remove_host(old)
                    self._classes_in_graph.clear()
                self._topology.upsert_host(replace(view, host_id=node, labels={}))
                self._classes_in_graph.add(node)
            return int(self._topology.pcie_distance(node, a, b))

        return distance

    def occupancy(self, state: HostState) -> Occupancy:
        """The host state's occupancy."""
        return self.host_index(state).occupancy

    def mig_capacity(self, state: HostState) -> list[tuple[PciAddress, dict[str, int], float]]:
        """Per MIG-enabled GPU: more instances of each profile that fit, and fragmentation."""
        occupancy = self.occupancy(state)
        out: list[tuple[PciAddress, dict[str, int], float]] = []
        for address, layout in sorted(occupancy.mig_layouts.items()):
            table = state.view.gpus[address].mig_profiles
            free = {str(name): n for name, n in capacity(layout, table).items()}
            out.append((address, free, fragmentation_score(layout, table)))
        return out

    # ------------------------------------------------------------ one host

    def _options(self, cycle: Cycle, claim: Claim, rejections: Rejections) -> list[Option] | None:
        kept: list[Option] = []
        generated = 0
        forms = sorted(claim.accepted_forms(), key=lambda f: _FORM_ORDER[f])
        for form in forms:
            for item in self.profile.generators[form].options(cycle, claim):
                if isinstance(item, tuple):
                    rejections.add_verdict(item)
                    continue
                generated += 1
                for plugin in self.profile.option_filters:
                    verdict = plugin.filter_option(cycle, claim, item)
                    if verdict is not None:
                        rejections.add_verdict(verdict)
                        break
                else:
                    kept.append(item)
        host = cycle.view.host_id
        if not generated:
            rejections.add("capacity", REASON_NO_MATCHING_DEVICE, f"{host}: {claim.name}")
            return None
        free = sum(o.free for o in kept)
        if free < claim.count:
            # With nothing kept, the filters that turned each option away
            # have already said why.
            if kept:
                rejections.add(
                    "capacity",
                    REASON_TOO_FEW,
                    f"{host}: {claim.name} needs {claim.count}, {free} free",
                )
            return None
        modes = cycle.occupancy.modes
        # Economy first, then pack onto devices already in that use, then
        # NUMA and address for a stable order.
        kept.sort(
            key=lambda o: (
                _FORM_ORDER[o.form],
                0 if o.device.address in modes else 1,
                o.free,
                o.device.numa_node,
                o.device.address,
                o.variant,
            )
        )
        return kept

    def fit(
        self, state: HostState, request: PlacementRequest, rejections: Rejections
    ) -> HostFit | None:
        """The best assignment of ``request`` on one host, or None with reasons added.

        Memoised per host state and request shape (Nomad's feasibility cache by
        computed class, kube-scheduler's equivalence cache): a host that did
        not change since it was judged for an equal request is judged the same.
        Only the request id differs between equal shapes, and it plays no part
        in fitting.
        """
        key = (
            state.view.host_id,
            state.alloc_generation,
            state.planned,
            id(state.view),
            state.schedulable,
            _shape(request),
        )
        cached = self._fits.get(key)
        if cached is not None and cached[0] is state.view:
            _, fit, seen = cached
            rejections.merge(seen)
            return fit
        seen = Rejections()
        fit = self._fit(state, request, seen)
        rejections.merge(seen)
        if len(self._fits) > 262_144:
            self._fits.clear()  # bounded; stale generations are dead weight
        self._fits[key] = (state.view, fit, seen)
        return fit

    def _fit(
        self, state: HostState, request: PlacementRequest, rejections: Rejections
    ) -> HostFit | None:
        index = self.host_index(state)
        cycle = Cycle(request, state, index.occupancy, self._distance(state.view))
        for host_filter in self.profile.host_filters:
            verdict = host_filter.filter_host(cycle)
            if verdict is not None:
                rejections.add_verdict(verdict)
                return None
        options: dict[str, list[Option]] = {}
        for claim in request.claims:
            kept = self._options(cycle, claim, rejections)
            if kept is None:
                return None
            options[claim.name] = kept
        # Most constrained claims first: dead ends die early.
        claims = sorted(request.claims, key=lambda c: len(options[c.name]))
        units = [c for c in claims for _ in range(c.count)]
        required = tuple(a for a in request.affinities if a.required)
        every = tuple(request.affinities)
        passes = (every, required) if every != required else (required,)
        for nodes in numa_domains(state.view, request.numa_policy):
            for affinities in passes:
                picks = self._search(cycle, units, options, SearchPass(nodes, affinities))
                if picks is not None:
                    return self._scored(cycle, picks)
        rejections.add(
            "topology",
            REASON_TOPOLOGY,
            f"{state.view.host_id}: numa_policy={request.numa_policy.value}, "
            f"{len(required)} required affinities",
        )
        return None

    def _search(
        self,
        cycle: Cycle,
        units: Sequence[Claim],
        options: Mapping[str, Sequence[Option]],
        search: SearchPass,
    ) -> tuple[Pick, ...] | None:
        picks: list[Pick] = []
        steps = 0
        reserver = self.profile.reserver
        unit_filters = self.profile.unit_filters

        def step(i: int, floor: int) -> bool:
            nonlocal steps
            if i == len(units):
                return True
            claim = units[i]
            candidates = options[claim.name]
            for k in range(floor, len(candidates)):
                steps += 1
                if steps > SEARCH_BUDGET:
                    return False
                pick = reserver.reserve(cycle, picks, claim, candidates[k])
                if pick is None:
                    continue
                if not all(f.admit(search, picks, pick) for f in unit_filters):
                    continue
                picks.append(pick)
                # Units of one claim are interchangeable: take options in
                # non-decreasing order so no permutation is tried twice.
                same = i + 1 < len(units) and units[i + 1] is claim
                if step(i + 1, k if same else 0):
                    return True
                picks.pop()
            return False

        return tuple(picks) if step(0, 0) else None

    def _scored(self, cycle: Cycle, picks: tuple[Pick, ...]) -> HostFit:
        # Back to the request's claim order, which plans and placements keep.
        order = {c.name: i for i, c in enumerate(cycle.request.claims)}
        picks = tuple(sorted(picks, key=lambda p: order[p.claim.name]))
        total = 0
        reasons: list[str] = []
        for scorer in self.profile.scorers:
            value, why = scorer.score(cycle, picks)
            total += value
            reasons.append(f"{scorer.name} {value:+d}: {why}")
        return HostFit(cycle.state, picks, total, tuple(reasons))

    # ------------------------------------------------------------ cluster

    def _never_fits(
        self, state: HostState, request: PlacementRequest, shape_id: int
    ) -> Rejections | None:
        """Why no state of this host's hardware class could take the request, or None.

        Decided once per class and request shape on an empty host of the
        class: allocations only ever take capacity away, so an empty host
        that cannot fit means no state of the host can.
        """
        view = state.view
        key = (view.hardware_class, shape_id)
        if key in self._never:
            return self._never[key]
        empty = HostState(view, alloc_generation=-1)
        probe = replace(
            request, tenant=TenantName(""), exclusivity=ExclusivityDomain.NONE, host_selector={}
        )
        seen = Rejections()
        verdict = None if self._fit(empty, probe, seen) is not None else seen
        self._never[key] = verdict
        return verdict

    def _host_order(
        self, snapshot: ClusterSnapshot, request: PlacementRequest
    ) -> tuple[
        list[tuple[bool, int, str]], dict[str, HostState], list[tuple[HostState, Rejections]]
    ]:
        """A heap of hosts in fast-path order, and those whose hardware can never fit.

        Best fit: fewest idle devices of the request's kinds first; hosts
        short of idle devices for a whole-device-only claim go last. A heap,
        not a sorted list: the fast path usually stops after a few hosts, so
        ordering all of them would be wasted. This loop is the only per-host
        work every request pays, so it stays lean: one index lookup, one
        class lookup, no allocation but the heap entry.
        """
        kinds = tuple({_KIND_POSITION[c.kind] for c in request.claims})
        whole_only = tuple(
            (_KIND_POSITION[c.kind], c.count)
            for c in request.claims
            if c.accepted_forms() == frozenset({DeviceForm.WHOLE_DEVICE})
        )
        shape = _static_shape(request)
        shape_id = self._shape_ids.setdefault(shape, len(self._shape_ids))
        by_class: dict[int, Rejections | None] = {}
        heap: list[tuple[bool, int, str]] = []
        states: dict[str, HostState] = {}
        never: list[tuple[HostState, Rejections]] = []
        index = self._index
        for host_id, state in snapshot.hosts.items():
            view = state.view
            cls = view.hardware_class
            if cls in by_class:
                why = by_class[cls]
            else:
                why = by_class[cls] = self._never_fits(state, request, shape_id)
            if why is not None:
                never.append((state, why))
                continue
            found = index.get((host_id, state.alloc_generation, state.planned))
            if found is None or found.view is not view:
                found = self.host_index(state)
            idle = found.idle
            short = False
            for position, n in whole_only:
                if idle[position] < n:
                    short = True
            total = 0
            for position in kinds:
                total += idle[position]
            heap.append((short, total, host_id))
            states[host_id] = state
        heapq.heapify(heap)
        return heap, states, never

    def candidates(
        self, snapshot: ClusterSnapshot, request: PlacementRequest, limit: int
    ) -> tuple[list[HostFit], Rejections]:
        """Up to ``limit`` fitting hosts in fast-path order, with every rejection seen.

        With ``limit`` 0 every host is fitted (what Explain and batch
        candidate generation want).
        """
        rejections = Rejections()
        fits: list[HostFit] = []
        heap, states, never = self._host_order(snapshot, request)
        while heap:
            state = states[heapq.heappop(heap)[2]]
            fit = self.fit(state, request, rejections)
            if fit is not None:
                fits.append(fit)
                if limit and len(fits) >= limit:
                    return fits, rejections
        # Every host that could was tried: the rest say why they never can.
        for state, why in never:
            if not state.schedulable:
                reason = REASON_CORDONED if state.cordoned else REASON_LEASE_EXPIRED
                rejections.add("host", reason, state.view.host_id)
            else:
                rejections.merge(why)
        return fits, rejections

    def schedule(
        self, snapshot: ClusterSnapshot, request: PlacementRequest, *, explain: bool = False
    ) -> Plan | Unschedulable:
        """Choose a host and slots for one request.

        The caller has validated the request.

        Args:
            snapshot: the cluster at one moment.
            request: what to place.
            explain: fit every host, so the rejections cover the whole
                cluster (slower); the choice is the same.

        Returns:
            A plan against the chosen host's allocation generation, or why no
            host fits, per plugin.
        """
        fits, rejections = self.candidates(snapshot, request, 0 if explain else self.feasible_hosts)
        if not fits:
            return unschedulable(len(snapshot.hosts), request, rejections)
        # Equal scores are common (identical hosts, equally full): break the
        # tie by a hash of request and host rather than by name, so that
        # concurrent replicas placing different requests on one snapshot
        # spread over the tied hosts instead of all racing for the first.
        # Still a pure function of snapshot and request.
        best = min(
            fits, key=lambda f: (-f.score, _tie_break(request.request_id, f.state.view.host_id))
        )
        return build_plan(best, request)


def _tie_break(request_id: str, host_id: str) -> tuple[int, str]:
    """A host's rank among equally scored ones, stable per request."""
    return zlib.crc32(f"{request_id}\x00{host_id}".encode()), host_id


def _shape(request: PlacementRequest) -> tuple[object, ...]:
    """What of a request fitting depends on: all but its id (and priority)."""
    return (
        request.tenant,
        request.claims,
        request.numa_policy,
        request.affinities,
        request.exclusivity,
        tuple(sorted(request.host_selector.items())),
    )


def _static_shape(request: PlacementRequest) -> tuple[object, ...]:
    """What of a request an empty host's hardware decides: claims and topology."""
    return (request.claims, request.numa_policy, request.affinities)


def unschedulable(hosts: int, request: PlacementRequest, rejections: Rejections) -> Unschedulable:
    """Why no host fits, led by a one-line summary naming the commonest reason."""
    wanted = ", ".join(
        f"{c.count}x {c.kind.value} ({c.name}: "
        f"{'/'.join(sorted(f.value for f in c.accepted_forms()))})"
        for c in request.claims
    )
    found = rejections.as_tuple()
    # Lead with what stopped the hosts the request was meant for: hosts its
    # selector or a lapsed lease ruled out say little about why it failed.
    telling = [r for r in found if r.plugin not in ("host", "host-selector")] or list(found)
    top = max(telling, key=lambda r: r.count, default=None)
    why = f"; most often {top.plugin}/{top.reason} ({top.count}x)" if top else ""
    return Unschedulable(f"no host can take {wanted} ({hosts} hosts considered{why})", found)


def _mdev_uuid(state: HostState, request: PlacementRequest, unit: int) -> str:
    name = f"{state.view.host_id}/{state.alloc_generation}/{request.request_id}/{unit}"
    return str(uuid.uuid5(MDEV_UUID_NAMESPACE, name))


def _assignments(fit: HostFit, request: PlacementRequest) -> Iterator[tuple[Assignment, SlotKey]]:
    state = fit.state
    view = state.view
    vf_queues: dict[PciAddress, FreeVfIndexes] = {}
    cycle = Cycle(request, state, build_occupancy(state))
    for unit, pick in enumerate(fit.picks):
        option = pick.option
        device = option.device
        name = pick.claim.name
        if option.form is DeviceForm.WHOLE_DEVICE:
            assert option.group is not None  # filtered: groupless devices never fit
            yield (
                WholeDeviceAssignment(
                    claim=name,
                    address=device.address,
                    iommu_group=option.group,
                    group_endpoints=view.group_endpoints(option.group),
                    numa_node=device.numa_node,
                    vfio_path=vfio_group_path(option.group),
                ),
                iommu_group_slot(option.group),
            )
        elif option.form is DeviceForm.VF:
            pf = view.sriov_pfs[device.address]
            queue = vf_queues.setdefault(pf.address, free_vfs(view, cycle.occupancy, pf.address)[0])
            if not queue:
                # The fit said there was room: a caller built it on another state.
                raise RuntimeError(f"no free VF left on {pf.address} for {request.request_id}")
            index = queue.pop(0)
            existing = next((v for v in pf.vfs if v.index == index), None)
            yield (
                VfAssignment(
                    claim=name,
                    pf_address=pf.address,
                    vf_index=index,
                    vf_address=existing.address if existing else None,
                    iommu_group=existing.iommu_group if existing else None,
                    numa_node=device.numa_node,
                    num_vfs=pf.num_vfs or pf.total_vfs,
                    vfio_driver=option.variant,
                ),
                vf_slot(pf.address, index),
            )
        elif option.form is DeviceForm.MDEV:
            mdev_uuid = _mdev_uuid(state, request, unit)
            yield (
                MdevAssignment(
                    claim=name,
                    parent_address=device.address,
                    type_id=option.variant,
                    uuid=mdev_uuid,
                    numa_node=device.numa_node,
                ),
                mdev_slot(device.address, option.variant, mdev_uuid),
            )
        else:
            profile = next(
                p for p in view.gpus[device.address].mig_profiles if p.name == option.variant
            )
            yield (
                MigAssignment(
                    claim=name,
                    gpu_address=device.address,
                    profile_name=profile.name,
                    profile_id=profile.profile_id,
                    start=pick.mig_start,
                    size=pick.mig_size,
                    numa_node=device.numa_node,
                ),
                mig_slot(device.address, profile.profile_id, pick.mig_start, pick.mig_size),
            )


def build_plan(fit: HostFit, request: PlacementRequest) -> Plan:
    """The plan of a host fit: concrete slots (VF indexes, mdev UUIDs) and exclusive holds."""
    pairs = list(_assignments(fit, request))
    slots = [slot for _, slot in pairs]
    if request.exclusivity is not ExclusivityDomain.NONE:
        view = fit.state.view
        held: list[SlotKey] = []
        for pick in fit.picks:
            instance = domain_instance(view, pick.option.device, request.exclusivity)
            key = exclusive_slot(request.exclusivity, instance, request.request_id)
            if key not in held:
                held.append(key)
        slots.extend(held)
    return Plan(
        host_id=fit.state.view.host_id,
        expected_alloc_generation=fit.state.alloc_generation,
        slots=tuple(slots),
        assignments=tuple(a for a, _ in pairs),
        score=fit.score,
        reasons=fit.reasons,
    )
