"""The engine's fast path: one request, indexed filter, search, score, best choice.

Hosts are visited most-packed first (best fit). The engine keeps, across
requests, its hosts grouped by hardware class, each class's hosts sorted in
that order, and brings these indexes up to date from each snapshot by
visiting only the hosts that changed; a request merges the lists of the
classes that can take it and stops after the first few fits, which are
scored in full, and the best wins. Hosts with the same hardware in the same
state share one judgement per request shape. Within a host, a depth-first
search assigns each claim unit an option (a whole device, or a pool of
interchangeable slices), trying NUMA domains in preference order and
preferred affinities before required-only. Pure: snapshot in, plan out; the
indexes only save work, they never change a result.
"""

from __future__ import annotations

import heapq
import uuid
import zlib
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from hashlib import blake2b
from itertools import compress, count
from operator import is_not
from typing import TypeVar

from tessera.scheduler.core.engine.framework import (
    Cycle,
    HostFilter,
    Option,
    OptionFilter,
    OptionGenerator,
    Pick,
    Rejections,
    RequestObserver,
    Reserver,
    Scorer,
    SearchPass,
    UnitFilter,
)
from tessera.scheduler.core.engine.plugins import (
    FORM_MODE,
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
    HostSharePlugin,
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
    PackingScorer,
    SharingScorer,
    SwitchPartners,
    VfOptions,
    WholeDeviceOptions,
    free_vfs,
    numa_domains,
)
from tessera.scheduler.core.fragmentation import TaskMixLearner
from tessera.scheduler.core.host import HostView, domain_instance
from tessera.scheduler.core.identity import (
    HostId,
    PciAddress,
    PlacementId,
    SlotKey,
    TenantName,
    iommu_group_slot,
    vfio_group_path,
)
from tessera.scheduler.core.mig_geometry import capacity, fragmentation_score
from tessera.scheduler.core.occupancy import (
    DeviceMode,
    DomainKey,
    Occupancy,
    build_occupancy,
    mdev_free,
)
from tessera.scheduler.core.plan import (
    Assignment,
    MdevAssignment,
    MigAssignment,
    Plan,
    Unschedulable,
    VfAssignment,
    WholeDeviceAssignment,
)
from tessera.scheduler.core.request import (
    Claim,
    DeviceForm,
    DeviceKind,
    ExclusivityDomain,
    PlacementRequest,
)
from tessera.scheduler.core.slots import (
    exclusive_slot,
    host_share_slot,
    mdev_slot,
    mig_slot,
    vf_slot,
)
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostChanges, HostState
from tessera.scheduler.core.topology import pcie_distance

#: Order keys (request shapes, as far as the host order goes) whose orders are
#: kept at once: each holds an entry per host, 64 of them about 70 MiB at
#: 10,000 hosts.
_ORDERS_KEPT = 64

#: Host places in orders (see :func:`_order_entry`) a hardware class keeps
#: memoised, per (occupancy signature, order key), about 200 bytes each: this
#: many, or :data:`_PREFIXES_PER_HOST` per host of the class if more. Every
#: new occupancy (requests choose their CPU and memory asks, so each
#: placement may make one) adds an entry per order and signatures are never
#: reused, so a fixed 65,536 per class would have let the ~390 classes of a
#: 10,000-host fleet fill to gigabytes over a long run; bounded by the fleet,
#: the memo holds about 100 MiB at most there. A memo cleared only costs the
#: work it saved.
_PREFIXES_KEPT = 512
_PREFIXES_PER_HOST = 32

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
    observers: tuple[RequestObserver, ...] = ()


def default_profile() -> EngineProfile:
    """Every constraint family and scorer Tessera ships."""
    capacity = CapacityPlugin()
    return EngineProfile(
        host_filters=(LeasePlugin(), HostSelectorPlugin(), HostSharePlugin()),
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


def packing_profile(learner: TaskMixLearner | None = None) -> EngineProfile:
    """Tessera's packing profile: the default one, packing by the task mix rather than best fit.

    :class:`PackingScorer` decides, on the task mix learnt from the
    requests scheduled, placed or not (``learner``, a fresh one by default,
    is the profile's observer); best fit is kept, at a tenth of its weight
    and for whole devices only, to break ties. Run it on an engine that
    scores every feasible host (``feasible_hosts=0``): bench (h) measures
    what it buys on the Alibaba trace and what it costs a request.
    """
    learner = learner if learner is not None else TaskMixLearner()
    base = default_profile()
    # Best fit stays for whole devices, a point per idle device, to break
    # the ties the mix leaves (a NIC-only request, a 1-GPU task with no gang
    # in the mix): without it such requests spread over every host and
    # starve multi-GPU ones. On slices it stranded more (bench (h)).
    scorers = tuple(
        BestFitScorer(weight=1, whole_only=True) if isinstance(s, BestFitScorer) else s
        for s in base.scorers
    )
    return replace(base, scorers=(*scorers, PackingScorer(learner)), observers=(learner,))


@dataclass(frozen=True)
class HostFit:
    """A complete assignment of a request on one host, scored."""

    state: HostState
    picks: tuple[Pick, ...]
    score: int
    reasons: tuple[str, ...]
    occupancy: Occupancy | None = None
    """The state's occupancy when the fit has it (else the plan builds it)."""


#: Upper bound on memoised judgements (all classes together) before the memo
#: is dropped and rebuilt: old occupancies are dead weight.
_MEMO_LIMIT = 262_144

#: Occupancy (and tenancy) signatures an engine keeps interned by default.
_INTERNED_KEPT = 262_144

#: Requests (tenant, id) an engine remembers having shown its observers.
_SEEN_KEPT = 65_536

#: Request shapes whose never-fits verdict a hardware class keeps. Requests
#: choose their shapes: 400 shapes never seen before kept 58 MiB of verdicts on
#: a 2,000-host fleet, so at 4,096 per class a tenant could make a replica hold
#: gigabytes. Real mixes have tens of shapes.
_NEVER_KEPT = 512

_V = TypeVar("_V")

#: A form's bit in a host's open forms (see :func:`_open_forms`).
_FORM_BIT = {
    DeviceForm.WHOLE_DEVICE: 1,
    DeviceForm.VF: 2,
    DeviceForm.MDEV: 4,
    DeviceForm.MIG: 8,
}

#: A host's place in fast-path order for one request: (nothing of one of the
#: request's kinds free, short for one of its claims (too few idle devices
#: for a whole-device-only claim, none of its forms open for another),
#: another replica's share, idle devices of the request's kinds, rank among
#: equals for this replica, host).
_OrderEntry = tuple[bool, bool, bool, int, int, str]

#: What of a host's order entry its occupancy decides: (full, short, idle).
_OrderPrefix = tuple[bool, bool, int]

#: A host's standing for this replica: (another replica's share, rank).
_Rank = tuple[bool, int]

#: What a request's order depends on: the kind positions it counts, the
#: (kind position, count) of its whole-device-only claims, and the (kind
#: position, form bits) of its other claims.
_OrderKey = tuple[tuple[int, ...], tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]


@dataclass(frozen=True)
class _HostIndex:
    """Per host state: its class, occupancy and idle devices (the hot-path index).

    Attributes:
        view: the host's inventory view.
        occupancy: what is taken on the host.
        idle: idle devices (no use of any kind) per kind, in :data:`_KINDS`
            order.
        full: per kind, in :data:`_KINDS` order, whether every function of
            the kind is held whole (or unusable): nothing of the kind fits.
        open: per kind, in :data:`_KINDS` order, the forms that may still
            offer a unit (:data:`_FORM_BIT` bits, see :func:`_open_forms`).
        hardware: the host's hardware class.
        signature: the occupancy, host name aside, interned: hosts of one
            class with one signature judge every request alike.
        exclusive: some tenant holds an exclusivity domain here (then who
            asks matters, see :meth:`Engine._judge`).
        tenancy: who holds what, host name aside, interned.
    """

    view: HostView
    occupancy: Occupancy
    idle: tuple[int, ...]
    full: tuple[bool, ...]
    open: tuple[int, ...]
    hardware: _HardwareClass
    signature: int
    exclusive: bool
    tenancy: int


@dataclass(frozen=True)
class _Judgement:
    """A request judged on one occupancy of a hardware class: shared by its hosts.

    Attributes:
        picks: the best assignment, or None when it does not fit.
        score: its score.
        reasons: its score lines.
        seen: the rejections the judging counted.
        host: the host it was judged on; ``seen`` names it, and the name is
            swapped for the asking host's when another host reuses it.
    """

    picks: tuple[Pick, ...] | None
    score: int
    reasons: tuple[str, ...]
    seen: Rejections
    host: HostId


@dataclass(eq=False)
class _HardwareClass:
    """Hosts with the same hardware (their views equal, name and labels aside).

    Attributes:
        uid: a small number naming the class within one engine.
        view: the first view seen of the class; stands in for all of them.
        members: the indexed hosts of the class, with their indexes.
        orders: per order key, the members in fast-path order, kept sorted
            as hosts change (built the first time a request needs the key).
        judged: (signature, request shape[, tenancy]) -> judgement.
        never: request shape -> why no state of the class can take it, or
            None when an empty host can.
        distances: PCIe distances between functions, computed once per class.
        left: per occupancy signature, what is left on a host of the class
            in that state (see :func:`_left`).
        prefixes: per (occupancy signature, order key), a host's place in
            that order, rank and name aside (see :func:`_order_entry`);
            bounded (:data:`_PREFIXES_KEPT`).
    """

    uid: int
    view: HostView
    members: dict[HostId, _HostIndex] = field(default_factory=dict)
    orders: dict[_OrderKey, list[_OrderEntry]] = field(default_factory=dict)
    judged: dict[tuple[object, ...], _Judgement] = field(default_factory=dict)
    never: dict[int, Rejections | None] = field(default_factory=dict)
    distances: dict[tuple[PciAddress, PciAddress], int] = field(default_factory=dict)
    left: dict[int, tuple[tuple[int, ...], tuple[bool, ...], tuple[int, ...]]] = field(
        default_factory=dict
    )
    prefixes: dict[tuple[int, _OrderKey], _OrderPrefix] = field(default_factory=dict)

    def order(self, key: _OrderKey, rank: Callable[[HostId], _Rank]) -> list[_OrderEntry]:
        """The members in fast-path order for ``key``, sorted (``rank``: the engine's)."""
        found = self.orders.get(key)
        if found is None:
            found = sorted(_order_entry(key, i, h, rank(h)) for h, i in self.members.items())
            self.orders[key] = found
        return found


#: A class's first host in one order, as a request's walk starts from it:
#: (entry, class uid, position in the class's list).
_Head = tuple[_OrderEntry, int, int]


class _Heads:
    """Each live class's first host in one order, kept sorted.

    A request walks the hosts of every class in one merged order, starting
    from a heap of the classes' first hosts. A sorted list is a valid heap:
    kept sorted as hosts change (a few per plan), a request copies it rather
    than heapifying hundreds of classes' heads every time.
    """

    def __init__(self, heads: Iterable[_Head]) -> None:
        self._by_class = {head[1]: head for head in heads}
        self._sorted = sorted(self._by_class.values())

    def set(self, head: _Head) -> None:
        """A class's first host is now ``head``."""
        old = self._by_class.get(head[1])
        if old is not None:
            del self._sorted[bisect_left(self._sorted, old)]
        self._by_class[head[1]] = head
        insort(self._sorted, head)

    def drop(self, uid: int) -> None:
        """A class has no hosts left."""
        old = self._by_class.pop(uid, None)
        if old is not None:
            del self._sorted[bisect_left(self._sorted, old)]

    def heap(self) -> list[_Head]:
        """A fresh heap of the heads, for one request's walk."""
        return self._sorted.copy()


@dataclass
class Engine:
    """Places requests on a cluster snapshot.

    The engine keeps indexes across calls, brought up to date from each
    snapshot by visiting only the hosts that changed (see :meth:`_sync`):

    * hosts grouped by hardware class, each class keeping its hosts in
      fast-path order per request kind signature, so a request merges the
      classes' sorted lists and stops after :attr:`feasible_hosts` fits,
      touching candidates, not every host;
    * judgements (the best assignment or the rejections) keyed by hardware
      class, occupancy signature and request shape, so identical hosts in
      identical states are fitted once;
    * per class, what it can never take (feasibility on an empty host, no
      scoring) and its PCIe distances.

    Results never depend on these indexes: a fresh engine returns the same
    plans as a warm one, with or without change tracking in the snapshot.
    A profile that learns (the packing profile: the task mix from the
    requests, the least share each shape takes from the GPUs scored) also
    plans by what it has learnt, which a fresh engine has not.

    Attributes:
        profile: the plugins.
        feasible_hosts: how many fitting hosts the fast path scores before
            choosing; 1 is first fit on the best-fit order.
        affinity: who places (a replica's name): which hosts are its share
            among its peers (:meth:`set_peers`), and its order among equally
            good hosts as it walks them; "" for an engine that places alone
            (every host its own, walked by name).
        interned_kept: occupancy signatures (and, apart, tenancies and request shapes) kept
            numbered at once; past it the numbering starts afresh, so a
            long-lived engine's memory stays bounded.
        orders_kept: host orders (one per order key a request meets) kept
            at once; past it the order met least recently is dropped (and
            rebuilt if met again).

    With :meth:`set_peers`, replicas placing on one store split the hosts
    between them, rendezvous style: each walks its own share first (best fit
    within it), then the others'. Two replicas' plans made at once then
    rarely reach for one device, where one of the commits would conflict.
    """

    profile: EngineProfile = field(default_factory=default_profile)
    feasible_hosts: int = 4
    affinity: str = ""
    interned_kept: int = _INTERNED_KEPT
    orders_kept: int = _ORDERS_KEPT
    # (host, generation, planned) -> index of that host state.
    _index: dict[tuple[HostId, int, tuple[PlacementId, ...]], _HostIndex] = field(
        default_factory=dict, repr=False
    )
    # hardware_class (a hash) -> the classes with it (more than one only on
    # a collision: classes are told apart by comparing views).
    _classes: dict[int, list[_HardwareClass]] = field(default_factory=dict, repr=False)
    # id(view) -> (view, its class): a view is compared once, not per state.
    _view_classes: dict[int, tuple[HostView, _HardwareClass]] = field(
        default_factory=dict, repr=False
    )
    # Classes with indexed hosts, by uid.
    _live: dict[int, _HardwareClass] = field(default_factory=dict, repr=False)
    # Per order key, the first entry of each live class's list: the heap a
    # request starts from, kept up to date as hosts change.
    _heads: dict[_OrderKey, _Heads] = field(default_factory=dict, repr=False)
    _class_count: int = field(default=0, repr=False)
    _judged_count: int = field(default=0, repr=False)
    # Occupancy and tenancy signatures, interned to small ints (never reused).
    _signatures: dict[tuple[object, ...], int] = field(default_factory=dict, repr=False)
    _tenancies: dict[tuple[object, ...], int] = field(default_factory=dict, repr=False)
    _interned: int = field(default=0, repr=False)
    # Static request shapes, interned: the hot loop keys on small ints.
    _shape_ids: dict[tuple[object, ...], int] = field(default_factory=dict, repr=False)
    # What the indexes reflect: host -> state and its index.
    _states: dict[HostId, HostState] = field(default_factory=dict, repr=False)
    _entries: dict[HostId, _HostIndex] = field(default_factory=dict, repr=False)
    # The hosts mapping last synced, its keys and values in order (a diff
    # against the next snapshot's runs at C speed when keys line up).
    _synced: Mapping[HostId, HostState] | None = field(default=None, repr=False)
    _keys: list[HostId] | None = field(default=None, repr=False)
    _values: list[HostState] = field(default_factory=list, repr=False)
    # The live model last synced from, its revision, and the hosts synced
    # from other snapshots since (where the indexes may differ from it).
    _model: HostChanges | None = field(default=None, repr=False)
    _model_revision: int = field(default=0, repr=False)
    _dirty: set[HostId] = field(default_factory=set, repr=False)
    # The replicas placing (this one's affinity among them) and each host's
    # standing among them, worked out once per host and roster.
    _peers: frozenset[str] = field(default=frozenset(), repr=False)
    _ranks: dict[HostId, _Rank] = field(default_factory=dict, repr=False)
    # id(occupancy) -> (the occupancy, its idle devices per switch): see
    # _switch_partners.
    _partners: dict[int, tuple[Occupancy, SwitchPartners]] = field(default_factory=dict, repr=False)
    # The epochs of the scorers that learn (see _scored_now): judgements
    # memoised under other epochs were scored under what they knew then.
    _epochs: tuple[int, ...] = field(default=(), repr=False)
    # (tenant, request id) the observers have seen, oldest first (see observe).
    _seen: dict[tuple[str, str], None] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------ replicas

    def set_peers(self, peers: Iterable[str]) -> None:
        """The replicas placing on the cluster now, this one included: each prefers its share.

        A host's share is the replica whose name hashes highest with the
        host's (rendezvous hashing): a replica joining or leaving moves only
        its own share. Without an affinity, or with no other replica, every
        host is this replica's. Orders are rebuilt lazily; no plan made
        before the call is affected.
        """
        peers = frozenset(peers) | ({self.affinity} if self.affinity else frozenset())
        if peers == self._peers:
            return
        self._peers = peers
        self._ranks.clear()
        for classes in self._classes.values():
            for cls in classes:
                cls.orders.clear()
        self._heads.clear()

    def _forget_order(self, key: _OrderKey) -> None:
        """Drop one order from every class (rebuilt if a request needs it again)."""
        for classes in self._classes.values():
            for cls in classes:
                cls.orders.pop(key, None)
        del self._heads[key]

    def in_share(self, host_id: str) -> bool:
        """Whether a host is this replica's share of the cluster (see :meth:`set_peers`)."""
        return not self._rank(HostId(host_id))[0]

    def _rank(self, host_id: HostId) -> _Rank:
        """A host's standing for this replica (see :func:`_standing`)."""
        found = self._ranks.get(host_id)
        if found is None:
            found = _standing(self.affinity, self._peers, host_id)
            self._ranks[host_id] = found
        return found

    # ------------------------------------------------------------ host index

    def host_index(self, state: HostState) -> _HostIndex:
        """The memoised index of a host state."""
        view = state.view
        key = (view.host_id, state.alloc_generation, state.planned)
        found = self._index.get(key)
        if found is not None and found.view is view:
            return found
        occupancy = build_occupancy(state)
        signature = self._intern(self._signatures, _occupancy_signature(occupancy))
        tenancy = self._intern(self._tenancies, _tenancy_signature(occupancy, view.host_id))
        cls = self._hardware_class(view)
        # What is left is the same on every host of the class in this state.
        left = cls.left.get(signature)
        if left is None:
            if len(cls.left) >= max(_LEFT_KEPT, _LEFT_PER_HOST * len(cls.members)):
                cls.left.clear()
            left = cls.left[signature] = _left(view, occupancy)
        index = _HostIndex(
            view,
            occupancy,
            *left,
            cls,
            signature,
            bool(occupancy.exclusive),
            tenancy,
        )
        if len(self._index) > 4 * 65536:
            # Bounded: old generations are dead weight (indexed hosts keep
            # their own reference).
            self._index.clear()
        self._index[key] = index
        return index

    def _intern(self, table: dict[tuple[object, ...], int], key: tuple[object, ...]) -> int:
        """``key``'s number in ``table``, a new one if it has none.

        Bounded (``interned_kept``): a long-lived scheduler meets ever new
        occupancies, and each signature kept is a tuple of frozensets. A
        table that fills is forgotten, but numbers are never handed out
        twice, so an index or memo that still holds an old number can only
        miss, never match another signature.
        """
        found = table.get(key)
        if found is None:
            if len(table) >= self.interned_kept:
                table.clear()
            self._interned += 1
            found = table[key] = self._interned
        return found

    def _hardware_class(self, view: HostView) -> _HardwareClass:
        """The class of a view: its hardware fingerprint, confirmed by comparing views.

        ``hardware_class`` is a hash; hosts that share a class share
        judgements, so a collision must not merge two classes: a new view is
        compared with the class's first view once (then remembered by
        identity, views being immutable and long-lived).
        """
        found = self._view_classes.get(id(view))
        if found is not None and found[0] is view:
            return found[1]
        candidates = self._classes.setdefault(view.hardware_class, [])
        for cls in candidates:
            if _same_hardware(cls.view, view):
                break
        else:
            self._class_count += 1
            cls = _HardwareClass(self._class_count, view)
            candidates.append(cls)
        if len(self._view_classes) > 4 * 65536:
            self._view_classes.clear()
        self._view_classes[id(view)] = (view, cls)
        return cls

    def _distance(self, cls: _HardwareClass) -> Callable[[PciAddress, PciAddress], int]:
        """PCIe distance on the hosts of a class, computed once per class and pair.

        Hosts of a class share their PCIe tree, so a distance read on the
        class's first view holds for all of them.
        """
        cache = cls.distances
        view = cls.view

        def distance(a: PciAddress, b: PciAddress) -> int:
            found = cache.get((a, b))
            if found is None:
                found = cache[(a, b)] = int(pcie_distance(view, a, b))
            return found

        return distance

    def occupancy(self, state: HostState) -> Occupancy:
        """The host state's occupancy."""
        return self.host_index(state).occupancy

    def hardware_and_occupancy(self, state: HostState) -> tuple[HostView, Occupancy]:
        """The first view of the state's hardware class, and the state's occupancy.

        Hosts of a class have the same hardware (the engine compares views
        before it lets them share one): what is derived from a view once
        (its whole devices by kind, its groups) is then derived once per
        class, not once per host, for callers walking the whole cluster.
        """
        index = self.host_index(state)
        return index.hardware.view, index.occupancy

    def open_forms(self, state: HostState) -> dict[DeviceKind, frozenset[DeviceForm]]:
        """Per kind, the forms in which the host may still offer a unit.

        What the fast-path order reads (see :func:`_open_forms`): a form left
        out offers nothing on this state; a form listed may.
        """
        bits = self.host_index(state).open
        return {
            kind: frozenset(f for f, bit in _FORM_BIT.items() if bits[i] & bit)
            for i, kind in enumerate(_KINDS)
        }

    def mig_capacity(self, state: HostState) -> list[tuple[PciAddress, dict[str, int], float]]:
        """Per MIG-enabled GPU: more instances of each profile that fit, and fragmentation.

        Every MIG-enabled GPU is listed, by address. One that takes no MIG
        instance now whatever its free slices (handed over whole, in VF or
        mdev use, or unusable: its instances overlap) has an empty map and a
        fragmentation of 0: the slices of a GPU passed through are not free.
        """
        occupancy = self.occupancy(state)
        out: list[tuple[PciAddress, dict[str, int], float]] = []
        for address, gpu in sorted(state.view.gpus.items()):
            if not gpu.mig_enabled:
                continue
            layout = occupancy.mig_layouts.get(address)
            in_other_use = occupancy.modes.get(address) not in (None, DeviceMode.MIG)
            if layout is None or in_other_use or address in occupancy.unusable:
                out.append((address, {}, 0.0))
                continue
            table = gpu.mig_profiles
            free = {str(name): n for name, n in capacity(layout, table).items()}
            out.append((address, free, fragmentation_score(layout, table)))
        return out

    # ------------------------------------------------------------ sync

    def _sync(self, snapshot: ClusterSnapshot) -> None:
        """Bring the indexes to the snapshot, visiting only hosts that changed.

        From a snapshot derived from the one synced last (a batch's or a
        gang's plans in a row): the hosts it changed. From a snapshot of the
        live model synced last: the hosts the model says changed since, plus
        those synced from other snapshots since. Otherwise a diff against the
        last snapshot synced, by identity of host states.
        """
        hosts = snapshot.hosts
        if hosts is self._synced:
            return
        model = snapshot.changes
        changed: Iterable[HostId] | None = None
        derived = snapshot.derived
        if derived is not None and derived.parent is self._synced:
            # Derived from the mapping synced last: only the hosts it changed.
            changed = derived.changed
            self._dirty.update(changed)
            self._keys = None
        elif model is not None and model is self._model:
            since = model.changed_since(self._model_revision)
            if since is not None:
                changed = set(since) | self._dirty
                # The ordered lists no longer mirror the indexes.
                self._keys = None
        if changed is None:
            changed = self._diff(hosts)
            if model is None:
                self._dirty.update(changed)
        for host_id in changed:
            self._put(host_id, hosts.get(host_id))
        if model is not None:
            self._model = model
            self._model_revision = snapshot.revision
            self._dirty.clear()
        self._synced = hosts

    def _diff(self, hosts: Mapping[HostId, HostState]) -> list[HostId]:
        """Hosts whose state differs from what the indexes reflect."""
        keys = list(hosts)
        old = self._values
        if keys == self._keys:
            # Same hosts in the same order (a snapshot derived from the last
            # one): compare states pairwise by identity, in C, and patch the
            # list rather than copy it.
            at = list(compress(count(), map(is_not, hosts.values(), old)))
            for i in at:
                old[i] = hosts[keys[i]]
            return [keys[i] for i in at]
        states = self._states
        values = list(hosts.values())
        changed = [h for h, s in zip(keys, values, strict=True) if states.get(h) is not s]
        if len(states) + len(changed) != len(keys):
            changed.extend(h for h in states if h not in hosts)
        self._keys, self._values = keys, values
        return changed

    def _put(self, host_id: HostId, state: HostState | None) -> None:
        """Index one host's state (None: the host is gone)."""
        if state is self._states.get(host_id):
            return
        old = self._entries.get(host_id)
        if state is None:
            del self._states[host_id]
            self._ranks.pop(host_id, None)
            if old is not None:
                del self._entries[host_id]
                self._unplace(host_id, old)
            return
        before = self._states.get(host_id)
        self._states[host_id] = state
        if (
            old is not None
            and before is not None
            and before.view is state.view
            and before.allocations == state.allocations
            and before.tenants == state.tenants
        ):
            # What the index is built from did not change (a commit this
            # replica assumed, now read back as the store's): keep it.
            return
        index = self.host_index(state)
        if index is old:
            return
        cls = index.hardware
        rank = self._rank(host_id)
        if old is not None and old.hardware is cls:
            # The host stays in its class: it moves only in the orders where
            # its place changed (a reservation changes a few kinds' counts).
            self._entries[host_id] = cls.members[host_id] = index
            for key, entries in cls.orders.items():
                was = _order_entry(key, old, host_id, rank)
                now = _order_entry(key, index, host_id, rank)
                if was == now:
                    continue
                at = bisect_left(entries, was)
                del entries[at]
                insort(entries, now)
                if at == 0 or entries[0] is now:
                    self._heads[key].set((entries[0], cls.uid, 0))
            return
        if old is not None:
            self._unplace(host_id, old)
        self._entries[host_id] = index
        cls.members[host_id] = index
        for key, entries in cls.orders.items():
            entry = _order_entry(key, index, host_id, rank)
            insort(entries, entry)
            if entries[0] is entry:
                self._heads[key].set((entry, cls.uid, 0))
        if cls.uid not in self._live:
            # A class with hosts again: it joins every request's heap.
            self._live[cls.uid] = cls
            for key, heads in self._heads.items():
                heads.set((cls.order(key, self._rank)[0], cls.uid, 0))

    def _unplace(self, host_id: HostId, index: _HostIndex) -> None:
        cls = index.hardware
        del cls.members[host_id]
        if not cls.members:
            del self._live[cls.uid]
            for heads in self._heads.values():
                heads.drop(cls.uid)
        rank = self._rank(host_id)
        for key, entries in cls.orders.items():
            at = bisect_left(entries, _order_entry(key, index, host_id, rank))
            del entries[at]
            if at == 0 and entries:
                self._heads[key].set((entries[0], cls.uid, 0))

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
        gpus, parents = cycle.view.gpus, cycle.view.mdev_parents
        # The search takes the first complete assignment in this order, and
        # a later request lives with what it left. So after economy and
        # packing onto devices already in that use, keep what only some
        # requests can use for last:
        # * a sliceable device handed over whole (a MIG-enabled GPU, an mdev
        #   parent): MIG and mdev claims can use no other, and seven GPU+NIC
        #   pairs on an 8-GPU HGX host took both MIG GPUs (first by address)
        #   and left a MIG request nothing. Both kinds alike: keeping only MIG
        #   GPUs back sent whole-GPU requests onto vGPU parents instead;
        # * for a claim no affinity names, a device sharing a switch with an
        #   idle device of another kind: the only way to serve a later
        #   same-switch pair there (the MIG request took the one GPU whose
        #   NIC was free). A claim an affinity names wants exactly those
        #   devices, so its order is left alone (and its search short).
        partners = (
            None
            if any(claim.name in (a.claim_a, a.claim_b) for a in cycle.request.affinities)
            else self._switch_partners(cycle)
        )

        def keeps_for_others(o: Option) -> tuple[bool, int]:
            address = o.device.address
            gpu = gpus.get(address)
            sliceable = (gpu is not None and gpu.mig_enabled) or address in parents
            whole_sliceable = o.form is DeviceForm.WHOLE_DEVICE and sliceable
            return whole_sliceable, partners.partners_of(o.device) if partners is not None else 0

        # Then fewest units free (pack), NUMA and address for a stable order.
        kept.sort(
            key=lambda o: (
                _FORM_ORDER[o.form],
                0 if o.device.address in modes else 1,
                keeps_for_others(o),
                o.free,
                o.device.numa_node,
                o.device.address,
                o.variant,
            )
        )
        return kept

    def _switch_partners(self, cycle: Cycle) -> SwitchPartners:
        """The idle devices under each switch of a host state, worked out once per occupancy.

        Every claim of every request judged on the state reads them; the
        occupancy object is the host index's, shared by those judgements.
        """
        occupancy = cycle.occupancy
        found = self._partners.get(id(occupancy))
        if found is not None and found[0] is occupancy:
            return found[1]
        partners = SwitchPartners(cycle.view, occupancy)
        if len(self._partners) >= 4096:  # bounded: old states are dead weight
            self._partners.clear()
        self._partners[id(occupancy)] = (occupancy, partners)
        return partners

    def fit(
        self, state: HostState, request: PlacementRequest, rejections: Rejections
    ) -> HostFit | None:
        """The best assignment of ``request`` on one host, or None with reasons added.

        Judged once per hardware class, occupancy and request shape (Nomad's
        feasibility cache by computed class, kube-scheduler's equivalence
        cache): hosts with the same hardware in the same state are judged
        alike, so the first one's judgement serves the others. Only the
        request id differs between equal shapes, and it plays no part in
        fitting.
        """
        self._scored_now()
        return self._judge(
            state, self.host_index(state), request, self._shape_id(request), rejections
        )

    def _scored_now(self) -> None:
        """Drop memoised judgements once a scorer that learns has learnt something new.

        A scorer with an ``epoch`` (the fragmentation scorer's task mix)
        scores differently once it moves; judgements are memoised with their
        scores, so they go. Epochs move rarely (a learnt mix is republished
        only when it drifts), so the memo keeps its worth.
        """
        epochs = self._scorer_epochs()
        if epochs == self._epochs:
            return
        self._epochs = epochs
        for classes in self._classes.values():
            for cls in classes:
                cls.judged.clear()
        self._judged_count = 0

    def _scorer_epochs(self) -> tuple[int, ...]:
        """What each scorer that learns knows now (0 for one that does not learn)."""
        return tuple(getattr(s, "epoch", 0) for s in self.profile.scorers)

    def _shape_id(self, request: PlacementRequest) -> int:
        # Interned like signatures: bounded, and a number never names two
        # shapes (a client varying its CPU ask makes a new shape each time).
        return self._intern(self._shape_ids, static_shape(request))

    def _judge(
        self,
        state: HostState,
        index: _HostIndex,
        request: PlacementRequest,
        shape_id: int,
        rejections: Rejections,
    ) -> HostFit | None:
        """:meth:`fit` on an indexed host state."""
        # Host filters read what the class does not fix (lease, labels), so
        # they run per host; everything after them is the class's.
        cycle = Cycle(request, state, index.occupancy)
        for host_filter in self.profile.host_filters:
            verdict = host_filter.filter_host(cycle)
            if verdict is not None:
                rejections.add_verdict(verdict)
                return None
        key: tuple[object, ...]
        if index.exclusive or request.exclusivity is not ExclusivityDomain.NONE:
            # Exclusivity is the one judgement that asks who is who.
            key = (index.signature, shape_id, request.tenant, request.exclusivity, index.tenancy)
        else:
            key = (index.signature, shape_id)
        cls = index.hardware
        judged = cls.judged.get(key)
        if judged is None:
            seen = Rejections()
            picks = self._search_host(state, index, request, seen)
            score: int = 0
            reasons: tuple[str, ...] = ()
            if picks is not None:
                # Back to the request's claim order, which plans and
                # placements keep.
                order = {c.name: i for i, c in enumerate(request.claims)}
                picks = tuple(sorted(picks, key=lambda p: order[p.claim.name]))
                score, reasons = self._score(state, index, request, picks)
            judged = _Judgement(picks, score, reasons, seen, state.view.host_id)
            self._judged_count += 1
            if self._judged_count > _MEMO_LIMIT:
                for old in self._classes.values():
                    for c in old:
                        c.judged.clear()
                self._judged_count = 1
            cls.judged[key] = judged
        rejections.merge_renamed(judged.seen, judged.host, state.view.host_id)
        if judged.picks is None:
            return None
        return HostFit(state, judged.picks, judged.score, judged.reasons, index.occupancy)

    def _search_host(
        self,
        state: HostState,
        index: _HostIndex,
        request: PlacementRequest,
        rejections: Rejections,
    ) -> tuple[Pick, ...] | None:
        """A complete assignment of ``request`` on the host, host filters passed, or None."""
        cycle = Cycle(request, state, index.occupancy)
        found = self._units(cycle, rejections)
        if found is None:
            return None
        units, options = found
        required = tuple(a for a in request.affinities if a.required)
        for search in _passes(state.view, request):
            picks = self._search(cycle, units, options, search)
            if picks is not None:
                return picks
        rejections.add(
            "topology",
            REASON_TOPOLOGY,
            f"{state.view.host_id}: numa_policy={request.numa_policy.value}, "
            f"{len(required)} required affinities",
        )
        return None

    def _units(
        self, cycle: Cycle, rejections: Rejections
    ) -> tuple[list[Claim], dict[str, list[Option]]] | None:
        """The claim units in search order and each claim's options, or None with reasons."""
        options: dict[str, list[Option]] = {}
        for claim in cycle.request.claims:
            kept = self._options(cycle, claim, rejections)
            if kept is None:
                return None
            options[claim.name] = kept
        # Most constrained claims first: dead ends die early.
        claims = sorted(cycle.request.claims, key=lambda c: len(options[c.name]))
        return [c for c in claims for _ in range(c.count)], options

    def alternatives(
        self, state: HostState, request: PlacementRequest, limit: int
    ) -> list[HostFit]:
        """Distinct complete assignments of ``request`` on one host, up to ``limit``, scored.

        :meth:`fit` gives a host's one best assignment; alike requests in a
        batch then share that one column per host and compete for its
        devices, while the host's other legal ones (another GPU+NIC pair
        under another switch) are never offered to the model. This lists
        them: the same depth-first search, in the same passes, carried on
        past the first complete assignment. Assignments taking the same
        pools are given once; the search budget bounds each pass.
        """
        index = self.host_index(state)
        cycle = Cycle(request, state, index.occupancy)
        if any(f.filter_host(cycle) is not None for f in self.profile.host_filters):
            return []
        found = self._units(cycle, Rejections())
        if found is None:
            return []
        units, options = found
        order = {c.name: i for i, c in enumerate(request.claims)}
        out: dict[tuple[tuple[str, str], ...], tuple[Pick, ...]] = {}

        def each(picks: tuple[Pick, ...]) -> bool:
            key = tuple(sorted((p.claim.name, p.option.pool) for p in picks))
            if key not in out:
                out[key] = tuple(sorted(picks, key=lambda p: order[p.claim.name]))
            return len(out) >= limit

        for search in _passes(state.view, request):
            if self._search(cycle, units, options, search, each) is not None:
                break  # the limit is reached
        fits = []
        for picks in out.values():
            score, reasons = self._score(state, index, request, picks)
            fits.append(HostFit(state, picks, score, reasons, index.occupancy))
        return fits

    def _search(
        self,
        cycle: Cycle,
        units: Sequence[Claim],
        options: Mapping[str, Sequence[Option]],
        search: SearchPass,
        each: Callable[[tuple[Pick, ...]], bool] | None = None,
    ) -> tuple[Pick, ...] | None:
        """The first complete assignment in option order, or None.

        With ``each``, every complete assignment is handed to it in turn and
        the search goes on until it returns True (then that assignment is
        returned) or the options run out (None).
        """
        # Depth-first, iteratively: a recursive closure would refer to itself,
        # a reference cycle that keeps each search's cycle, options and picks
        # for the cyclic collector (it was most of the garbage a placement
        # made). ``resume[i]`` is where unit i's options are taken up again
        # when the search backs up to it.
        n = len(units)
        if n == 0:
            return () if each is None or each(()) else None
        picks: list[Pick] = []
        resume = [0] * n
        steps = 0
        reserve = self.profile.reserver.reserve
        unit_filters = self.profile.unit_filters
        i = 0
        while True:
            if i == n:
                if each is None or each(tuple(picks)):
                    return tuple(picks)
                i -= 1
                picks.pop()
                continue
            claim = units[i]
            candidates = options[claim.name]
            k = resume[i]
            while k < len(candidates):
                steps += 1
                if steps > SEARCH_BUDGET:
                    return None
                pick = reserve(cycle, picks, claim, candidates[k])
                k += 1
                if pick is None or not all(f.admit(search, picks, pick) for f in unit_filters):
                    continue
                resume[i] = k
                picks.append(pick)
                i += 1
                if i < n:
                    # Units of one claim are interchangeable: take options in
                    # non-decreasing order so no permutation is tried twice.
                    resume[i] = k - 1 if units[i] is claim else 0
                break
            else:
                if i == 0:
                    return None
                i -= 1
                picks.pop()

    def _score(
        self,
        state: HostState,
        index: _HostIndex,
        request: PlacementRequest,
        picks: tuple[Pick, ...],
    ) -> tuple[int, tuple[str, ...]]:
        """The score of a complete assignment, summed over the scorers, and their lines."""
        cycle = Cycle(request, state, index.occupancy, self._distance(index.hardware))
        total = 0
        reasons: list[str] = []
        for scorer in self.profile.scorers:
            value, why = scorer.score(cycle, picks)
            total += value
            reasons.append(f"{scorer.name} {value:+d}: {why}")
        return total, tuple(reasons)

    # ------------------------------------------------------------ cluster

    def _never_fits(
        self, cls: _HardwareClass, request: PlacementRequest, shape_id: int
    ) -> Rejections | None:
        """Why no state of a hardware class could take the request, or None.

        Decided once per class and request shape on an empty host of the
        class: allocations only ever take capacity away, so an empty host
        that cannot fit means no state of the host can. Feasibility only: no
        scoring, no distances.
        """
        if shape_id in cls.never:
            return cls.never[shape_id]
        empty = HostState(cls.view, alloc_generation=-1)
        probe = replace(
            request, tenant=TenantName(""), exclusivity=ExclusivityDomain.NONE, host_selector={}
        )
        index = self.host_index(empty)
        seen = Rejections()
        cycle = Cycle(probe, empty, index.occupancy)
        verdicts = (f.filter_host(cycle) for f in self.profile.host_filters)
        verdict = next((v for v in verdicts if v is not None), None)
        if verdict is not None:
            seen.add_verdict(verdict)
            why: Rejections | None = seen
        else:
            why = None if self._search_host(empty, index, probe, seen) is not None else seen
        if len(cls.never) >= _NEVER_KEPT:
            # Bounded per class: shapes are the clients' to vary. The oldest
            # verdict goes, not all: a mix of more shapes than the bound
            # (CPU and memory asks are part of a shape) would otherwise
            # work every verdict out again each time it fills.
            del cls.never[next(iter(cls.never))]
        cls.never[shape_id] = why
        return why

    def candidates(
        self, snapshot: ClusterSnapshot, request: PlacementRequest, limit: int
    ) -> tuple[list[HostFit], Rejections]:
        """Up to ``limit`` fitting hosts in fast-path order, with every rejection seen.

        Fast-path order is best fit: this replica's share of the hosts
        first (see :meth:`set_peers`), fewest idle devices of the request's
        kinds first within it; hosts short of idle devices for a
        whole-device-only claim last; then the replica's rank of the host
        (without an affinity, host name). Each hardware class keeps its hosts in
        that order, so the request merges the classes' lists (dropping a
        class that can never take it at its first host) and stops after
        ``limit`` fits. With ``limit`` 0 every host is fitted (what Explain
        and batch candidate generation want).

        A scorer may learn while scoring (the packing scorer, a GPU that
        serves a shape more finely than any it had seen): the hosts judged
        before it did were judged on less, so the walk is made once more on
        what it knows now. Such learning ends once the fleet's hardware has
        been seen.
        """
        found = self._walk(snapshot, request, limit)
        if self._epochs != self._scorer_epochs():
            found = self._walk(snapshot, request, limit)
        return found

    def _walk(
        self, snapshot: ClusterSnapshot, request: PlacementRequest, limit: int
    ) -> tuple[list[HostFit], Rejections]:
        """One walk of :meth:`candidates`."""
        self._sync(snapshot)
        self._scored_now()
        rejections = Rejections()
        fits: list[HostFit] = []
        shape_id = self._shape_id(request)
        key = _order_key(request)
        hosts = snapshot.hosts
        live = self._live
        heads = self._heads.pop(key, None)
        if heads is None:
            while self._heads and len(self._heads) >= self.orders_kept:
                # Bounded: each order keeps every host once, and requests
                # (untrusted) choose the keys. The order met least recently
                # goes (a new key each request evicts one order, not all of
                # the ones the usual mix keeps meeting).
                self._forget_order(next(iter(self._heads)))
            heads = _Heads((cls.order(key, self._rank)[0], uid, 0) for uid, cls in live.items())
        # Met most recently: last in line to be dropped.
        self._heads[key] = heads
        heap = heads.heap()
        never: set[int] = set()
        while heap:
            entry, uid, at = heap[0]
            cls = live[uid]
            if at == 0 and self._never_fits(cls, request, shape_id) is not None:
                heapq.heappop(heap)
                never.add(uid)
                continue
            entries = cls.orders[key]
            if at + 1 < len(entries):
                heapq.heapreplace(heap, (entries[at + 1], uid, at + 1))
            else:
                heapq.heappop(heap)
            host_id = HostId(entry[5])
            fit = self._judge(hosts[host_id], cls.members[host_id], request, shape_id, rejections)
            if fit is not None:
                fits.append(fit)
                if limit and len(fits) >= limit:
                    return fits, rejections
        if never:
            # Every host that could was tried: the rest say why they never
            # can, in snapshot order (the first example detail wins).
            entries_of = self._entries
            for host_id, state in hosts.items():
                cls = entries_of[host_id].hardware
                if cls.uid not in never:
                    continue
                if not state.schedulable:
                    reason = REASON_CORDONED if state.cordoned else REASON_LEASE_EXPIRED
                    rejections.add("host", reason, host_id)
                else:
                    why = cls.never[shape_id]
                    assert why is not None
                    # Judged on the class's first view: name this host.
                    rejections.merge_renamed(why, cls.view.host_id, host_id)
        return fits, rejections

    def observe(self, request: PlacementRequest) -> None:
        """Show the profile's observers a request's demand, once per request.

        The service plans a request again for each commit that loses a race,
        a batch's plan that loses its commit is placed again alone, and a
        client may send a request again: a tenant's request id counts once
        among the last :data:`_SEEN_KEPT` observed.
        """
        if not self.profile.observers:
            return
        key = (request.tenant, request.request_id)
        seen = self._seen
        if key in seen:
            return
        seen[key] = None
        if len(seen) > _SEEN_KEPT:
            del seen[next(iter(seen))]
        for observer in self.profile.observers:
            observer.observe(request)

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
        if not explain:  # an Explain is no demand
            self.observe(request)
        fits, rejections = self.candidates(snapshot, request, 0 if explain else self.feasible_hosts)
        if not fits:
            return unschedulable(len(snapshot.hosts), request, rejections)
        # Equal scores are common (identical hosts, equally full): break the
        # tie by a hash of the request and the host rather than by name, so
        # requests placed at once spread over the tied hosts instead of all
        # queueing for one device. (Breaking it per replica, which piles a
        # replica's requests onto one host, took Place over gRPC at 10,000
        # hosts from a p50 of 4.3 ms to 8 ms.) A fit in this replica's share
        # beats one in another's whatever the scores (see set_peers): the
        # other replica is about to place there. Still a pure function of
        # snapshot, request, affinity and peers.
        best = min(
            fits,
            key=lambda f: (
                self._rank(f.state.view.host_id)[0],
                -f.score,
                _tie_break(request.request_id, f.state.view.host_id),
            ),
        )
        return build_plan(best, request)


def _standing(affinity: str, peers: frozenset[str], host_id: str) -> _Rank:
    """A host's standing for replica ``affinity`` among ``peers``: (another's share, rank).

    Rendezvous hashing: every replica scores the host by a hash of its name
    and the host's, and the host is the share of the highest. A replica's
    rank of a host orders equally good hosts in its walk, so replicas walk
    them in different orders too. Blake2b, not CRC32: CRC is linear, and
    the scores of two names would differ by a constant.
    """
    if not affinity:
        return False, 0

    def score(name: str) -> int:
        digest = blake2b(f"{name}\x00{host_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    mine = score(affinity)
    away = any((score(p), p) > (mine, affinity) for p in peers if p != affinity)
    return away, mine


def _passes(view: HostView, request: PlacementRequest) -> Iterator[SearchPass]:
    """The search passes in order: NUMA domains by preference, preferred affinities first."""
    required = tuple(a for a in request.affinities if a.required)
    every = tuple(request.affinities)
    passes = (every, required) if every != required else (required,)
    for nodes in numa_domains(view, request.numa_policy):
        for affinities in passes:
            yield SearchPass(nodes, affinities)


def _tie_break(salt: str, host_id: str) -> tuple[int, str]:
    """A host's rank among equally scored ones, stable per salt (a request's id)."""
    return zlib.crc32(f"{salt}\x00{host_id}".encode()), host_id


def static_shape(request: PlacementRequest) -> tuple[object, ...]:
    """What of a request an empty host's hardware decides: claims, topology, host share."""
    return (
        request.claims,
        request.numa_policy,
        request.affinities,
        request.cpu_milli,
        request.memory_mib,
    )


def fit_key(request: PlacementRequest) -> tuple[object, ...]:
    """What of a request its fits depend on: its claims and topology, who asks, and where.

    Two requests with equal keys (their ids and priorities aside) get the
    same :meth:`Engine.candidates` from one snapshot: a batch of many alike
    requests works their candidates out once.
    """
    return (
        static_shape(request),
        request.exclusivity,
        request.tenant,
        tuple(sorted(request.host_selector.items())),
    )


def _order_key(request: PlacementRequest) -> _OrderKey:
    """What a request's fast-path order depends on (see :meth:`Engine.candidates`)."""
    kinds = tuple(sorted({_KIND_POSITION[c.kind] for c in request.claims}))
    whole_only: list[tuple[int, int]] = []
    other: set[tuple[int, int]] = set()
    for c in request.claims:
        forms = c.accepted_forms()
        if forms == _WHOLE_ONLY:
            whole_only.append((_KIND_POSITION[c.kind], c.count))
        else:
            other.add((_KIND_POSITION[c.kind], sum(_FORM_BIT[f] for f in forms)))
    return kinds, tuple(sorted(whole_only)), tuple(sorted(other))


_WHOLE_ONLY = frozenset({DeviceForm.WHOLE_DEVICE})

#: Per hardware class, the occupancy signatures whose leftovers are kept: this
#: many, or :data:`_LEFT_PER_HOST` per host of the class if more. A host has
#: one signature at a time and signatures are never reused (requests' CPU and
#: memory asks make new ones), so a fixed 65,536 per class let the ~390
#: classes of a 10,000-host fleet fill to gigabytes over a long run.
_LEFT_KEPT = 256
_LEFT_PER_HOST = 4


def _left(
    view: HostView, occupancy: Occupancy
) -> tuple[tuple[int, ...], tuple[bool, ...], tuple[int, ...]]:
    """What is left on a host, per kind in :data:`_KINDS` order.

    Returns:
        Idle devices (no use of any kind), whether every function is held
        whole or unusable (nothing of the kind fits), and the forms still
        open (see :func:`_open_forms`).
    """
    idle = tuple(
        sum(1 for d in view.whole_devices(kind) if d.address not in occupancy.modes)
        for kind in _KINDS
    )
    # Functions held whole (every member of a group taken whole) or in an
    # unusable state take nothing more, in any form.
    blocked = {a for a, mode in occupancy.modes.items() if mode is DeviceMode.WHOLE}
    blocked |= occupancy.unusable
    taken = dict.fromkeys(_KINDS, 0)
    for address in blocked:
        function = view.functions.get(address)
        kind = function.kind if function is not None else None
        if kind is not None:
            taken[kind] += 1
    functions = view.functions_of_kind
    full = tuple(functions.get(kind, 0) <= taken[kind] for kind in _KINDS)
    return idle, full, _open_forms(view, occupancy, idle)


def _open_forms(view: HostView, occupancy: Occupancy, idle: Sequence[int]) -> tuple[int, ...]:
    """Per kind, the forms in which the host may still offer a unit (bits).

    Necessary, not sufficient: a form left out offers nothing of the kind
    (no idle device to hand over whole; no PF with a VF index free, no mdev
    parent with room for a type, no MIG GPU with a compute slice free,
    among the devices usable and in no other form's use), so a claim
    accepting only such forms cannot fit and the host goes to the back of
    its order. A form kept may still offer nothing the claim accepts; the
    judgement says so.
    """
    bits = [_FORM_BIT[DeviceForm.WHOLE_DEVICE] if n > 0 else 0 for n in idle]
    modes, unusable = occupancy.modes, occupancy.unusable

    def mark(address: PciAddress, form: DeviceForm) -> None:
        # Unless the interference plugin would reject every option there.
        device = view.functions.get(address)
        if device is None or device.kind is None or address in unusable:
            return
        mode = modes.get(address)
        if mode is None or mode is FORM_MODE[form]:
            bits[_KIND_POSITION[device.kind]] |= _FORM_BIT[form]

    for pf in view.sriov_pfs.values():
        taken = occupancy.vfs_taken.get(pf.address, frozenset())
        # Counted as free_vfs counts: existing VFs, else every index below
        # total_vfs, whatever other indexes the store names.
        if pf.num_vfs > 0:
            free = (
                len(pf.vfs)  # fewer held than exist: some VF is free
                if len(taken) < len(pf.vfs)
                else sum(1 for vf in pf.vfs if vf.index not in taken)
            )
        else:
            free = pf.total_vfs - sum(1 for i in taken if 0 <= i < pf.total_vfs)
        if free > 0:
            mark(pf.address, DeviceForm.VF)
    for parent in view.mdev_parents.values():
        gpu = view.gpus.get(parent.address)
        if gpu is not None and gpu.mig_enabled:
            continue  # a MIG GPU takes no mdev
        used = occupancy.mdev_used.get(parent.address, {})
        pending = occupancy.mdev_pending.get(parent.address, {})
        if any(mdev_free(parent, t, used, pending) > 0 for t in parent.types):
            mark(parent.address, DeviceForm.MDEV)
    for gpu in view.gpus.values():
        layout = occupancy.mig_layouts.get(gpu.address)
        if gpu.mig_enabled and layout is not None and layout.free_compute:
            mark(gpu.address, DeviceForm.MIG)
    return tuple(bits)


def _order_entry(key: _OrderKey, index: _HostIndex, host_id: str, rank: _Rank) -> _OrderEntry:
    """A host's place in the order of ``key``.

    Hosts that cannot fit go last, so a request meets the hosts that can
    first: those with every function of one of its kinds held whole, those
    short of idle devices for a whole-device-only claim, and those where no
    form another claim accepts is open (a vGPU request on a host whose mdev
    parents are full would otherwise come first, having no idle GPU).
    Moving hosts that cannot fit changes no plan, only how many hosts a
    request walks.
    """
    prefixes = index.hardware.prefixes
    memo = (index.signature, key)
    prefix = prefixes.get(memo)
    if prefix is None:
        # Worked out once per class, occupancy and key: a changed host's
        # entries are looked up in every order its class has, twice.
        # Bounded: occupancies come and go (signatures are never reused).
        if len(prefixes) >= max(_PREFIXES_KEPT, _PREFIXES_PER_HOST * len(index.hardware.members)):
            prefixes.clear()
        kinds, whole_only, other = key
        idle, full, open_ = index.idle, index.full, index.open
        short = any(idle[position] < n for position, n in whole_only) or any(
            not open_[position] & forms for position, forms in other
        )
        prefix = prefixes[memo] = (
            any(full[position] for position in kinds),
            short,
            sum(idle[position] for position in kinds),
        )
    full_, short_, idle_ = prefix
    away, among_equals = rank
    return (full_, short_, away, idle_, among_equals, host_id)


def _occupancy_signature(occupancy: Occupancy) -> tuple[object, ...]:
    """What of an occupancy a judgement reads, except tenants (see :func:`_tenancy_signature`)."""
    return (
        occupancy.groups_taken,
        frozenset(occupancy.modes.items()),
        frozenset(occupancy.vfs_taken.items()),
        frozenset((a, frozenset(c.items())) for a, c in occupancy.mdev_used.items() if c),
        frozenset((a, frozenset(c.items())) for a, c in occupancy.mdev_pending.items() if c),
        frozenset((a, layout.instances) for a, layout in occupancy.mig_layouts.items()),
        occupancy.unusable,
        # Scorers may weigh the CPU and memory a placement leaves.
        occupancy.cpu_used,
        occupancy.memory_used,
    )


def _tenancy_signature(occupancy: Occupancy, host_id: HostId) -> tuple[object, ...]:
    """Who holds what in which domain, the host's own name left out.

    The host domain's instance is the host's name: dropped, so two hosts of
    a class with the same tenants in the same places share a signature.
    """
    tenants, exclusive = occupancy.tenants, occupancy.exclusive
    if not tenants and not exclusive:
        return ()
    host: DomainKey = (ExclusivityDomain.HOST, host_id)
    return (_anonymous(tenants, host), _anonymous(exclusive, host))


def _anonymous(mapping: Mapping[DomainKey, _V], host: DomainKey) -> frozenset[tuple[DomainKey, _V]]:
    """A domain mapping's items, the host's own domain renamed ``(HOST, "")``.

    Copied and frozen in C rather than item by item. Only the host's own
    name is dropped: a host-domain key naming another host (which no
    consistent store holds) stays as it is, which can only keep two states
    apart, never merge them.
    """
    if host not in mapping:
        return frozenset(mapping.items())
    items = dict(mapping)
    items[(ExclusivityDomain.HOST, "")] = items.pop(host)
    return frozenset(items.items())


def _same_hardware(a: HostView, b: HostView) -> bool:
    """Whether two views have the same hardware: everything but name and labels."""
    return a is b or (
        a.functions == b.functions
        and a.iommu_groups == b.iommu_groups
        and a.numa_nodes == b.numa_nodes
        and a.iommu_present == b.iommu_present
        and a.sriov_pfs == b.sriov_pfs
        and a.mdev_parents == b.mdev_parents
        and a.gpus == b.gpus
    )


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
    cycle = Cycle(request, state, fit.occupancy or build_occupancy(state))
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
    if request.cpu_milli or request.memory_mib:
        slots.append(
            host_share_slot(
                request.cpu_milli, request.memory_mib, request.tenant, request.request_id
            )
        )
    return Plan(
        host_id=fit.state.view.host_id,
        expected_alloc_generation=fit.state.alloc_generation,
        slots=tuple(slots),
        assignments=tuple(a for a, _ in pairs),
        score=fit.score,
        reasons=fit.reasons,
    )
