"""Placement policies: Tessera's, and the baselines users would otherwise pick.

The scheduler runs Tessera's; the baselines exist so that an operator (and
the benchmarks, ``bench/``) can run the very same service, store and agents
with the choice made the way other schedulers make it
(``tessera-scheduler --policy first-fit``) and compare on the same work.

Every policy answers the same question on the same snapshot: which host and
which devices for this request, or none. All of them keep the same safety
rules (the engine's filters: IOMMU groups whole, capacity, host use,
exclusivity, interference, required NUMA and PCIe constraints), so a
comparison is about *choosing*, not about cutting corners:

* ``tessera``: the fast path (:meth:`Engine.schedule`): best-fit host order,
  several feasible hosts scored by best fit, sharing, PCIe locality and MIG
  fragmentation; preferred NUMA and affinities honoured when they can be.
* ``first-fit``: what Kubernetes DRA's allocator does: hosts in name order,
  the first feasible host, its first feasible devices (option order of the
  engine's generators, no scoring).
* ``best-fit``: kube-scheduler with ``NodeResourcesFit`` set to
  ``MostAllocated``: among the first feasible hosts found (its
  ``percentageOfNodesToScore`` rule, from a rotating start), the one with the
  largest allocated share of the requested device kinds; first feasible
  devices there.
* ``random``: a uniformly random feasible host (seeded), first feasible devices.
* ``tessera-packing`` (:func:`packing_policy`; not in :data:`POLICIES`: it
  scores every feasible host per request): Tessera's engine with the
  packing profile (:func:`~scheduler.core.engine.fastpath.packing_profile`),
  which learns the task mix and places where the least GPU capacity is
  stranded under it.
* ``fgd`` (:class:`FgdPolicy`, built with the workload's task mix by the
  trace replay; not in :data:`POLICIES`: it fits every host per request):
  Fragmentation Gradient Descent (ATC'23), every feasible host, the one whose
  fragmentation under the task mix grows least.

Baselines only know what a DRA claim can say: required constraints
(``matchAttribute`` on NUMA node or PCIe root), no preferences. They see the
request with ``numa_policy: preferred`` and preferred affinities dropped;
Tessera sees it whole. Both are measured on the original request.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from tessera.scheduler.core.engine.fastpath import (
    Engine,
    EngineProfile,
    build_plan,
    default_profile,
    packing_profile,
    static_shape,
    unschedulable,
)
from tessera.scheduler.core.engine.framework import Rejections
from tessera.scheduler.core.engine.plugins import FragmentationScorer
from tessera.scheduler.core.fragmentation import TaskMix, TaskMixLearner
from tessera.scheduler.core.plan import Plan, Unschedulable
from tessera.scheduler.core.request import ExclusivityDomain, NumaPolicy, PlacementRequest
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState


class Policy(Protocol):
    """Chooses a host and devices for one request."""

    name: str

    def place(self, snapshot: ClusterSnapshot, request: PlacementRequest) -> Plan | Unschedulable:
        """The plan for ``request`` on ``snapshot``, or why nothing fits."""
        ...


def dra_expressible(request: PlacementRequest) -> PlacementRequest:
    """The request as a DRA ResourceClaim can state it: required constraints only."""
    numa = NumaPolicy.NONE if request.numa_policy is NumaPolicy.PREFERRED else request.numa_policy
    return replace(
        request,
        numa_policy=numa,
        affinities=tuple(a for a in request.affinities if a.required),
    )


def _unscored_profile() -> EngineProfile:
    """Tessera's filters and reserve, no scorers: the first feasible devices win."""
    return replace(default_profile(), scorers=())


@dataclass
class TesseraPolicy:
    """Tessera's fast path, as the scheduler runs it."""

    name: str = "tessera"
    engine: Engine = field(default_factory=Engine)

    def place(self, snapshot: ClusterSnapshot, request: PlacementRequest) -> Plan | Unschedulable:
        """See :class:`Policy`."""
        return self.engine.schedule(snapshot, request)


#: The name of :func:`packing_policy` (``tessera-scheduler --policy``).
PACKING_POLICY = "tessera-packing"


def packing_policy(affinity: str = "") -> TesseraPolicy:
    """Tessera packing by the learnt task mix, every feasible host scored (:func:`packing_profile`).

    Args:
        affinity: the placing replica's name (see :class:`Engine`).
    """
    engine = Engine(profile=packing_profile(), feasible_hosts=0, affinity=affinity)
    return TesseraPolicy(name=PACKING_POLICY, engine=engine)


def _slot_signature(state: HostState) -> tuple[tuple[str, ...], frozenset[str], bool]:
    """What a host's feasibility depends on, placement names aside.

    The taken slots (an mdev's UUID dropped: mdevs of one type are
    interchangeable), the tenants present, and whether any exclusivity hold
    exists (then tenants matter and the state is not memoised).
    """
    slots = tuple(
        sorted(
            str(k).rsplit("#", 1)[0] if k.startswith("mdev:") else str(k) for k in state.allocations
        )
    )
    exclusive = any(k.startswith("exclusive:") for k in state.allocations)
    return slots, frozenset(state.tenants.values()), exclusive


@dataclass
class FeasibleHostsBaseline:
    """Shared by the baselines: fit hosts in the policy's order, choose among fits.

    Feasibility is memoised by host *class* (the hardware fingerprint, the
    slots taken, lease state) and request shape, so a thousand identical
    hosts are fitted once, not once each; the semantics are unchanged, since
    an unscored fit depends on nothing else for a request whose tenant holds
    nothing on the host and that asks for no exclusivity or labels. Only the
    chosen host is fitted for real.
    """

    name: str
    engine: Engine = field(default_factory=lambda: Engine(profile=_unscored_profile()))
    _signatures: dict[int, tuple[HostState, tuple[object, ...], frozenset[str], bool]] = field(
        default_factory=dict, repr=False
    )
    _feasible: dict[tuple[object, ...], bool] = field(default_factory=dict, repr=False)

    def _order(self, snapshot: ClusterSnapshot) -> Iterator[HostState]:
        raise NotImplementedError

    def _choose(self, fits: list[HostState], request: PlacementRequest) -> HostState:
        """The host to take (the first found, unless a baseline scores them)."""
        return fits[0]

    def _enough(self, n_hosts: int) -> int:
        """Feasible hosts to find before choosing (1: first fit)."""
        return 1

    def _class_key(self, state: HostState) -> tuple[tuple[object, ...], frozenset[str], bool]:
        found = self._signatures.get(id(state))
        if found is None or found[0] is not state:
            if len(self._signatures) > 200_000:
                self._signatures.clear()  # bounded; old states are dead weight
            slots, tenants, exclusive = _slot_signature(state)
            key = (state.view.hardware_class, state.schedulable, slots)
            found = (state, key, tenants, exclusive)
            self._signatures[id(state)] = found
        return found[1], found[2], found[3]

    def _feasible_on(
        self, state: HostState, asked: PlacementRequest, shape: object, rejections: Rejections
    ) -> bool:
        if shape is None:
            return self.engine.fit(state, asked, rejections) is not None
        key, tenants, exclusive = self._class_key(state)
        if exclusive or asked.tenant in tenants:
            return self.engine.fit(state, asked, rejections) is not None
        memo = (key, shape)
        known = self._feasible.get(memo)
        if known is None:
            if len(self._feasible) > 500_000:
                self._feasible.clear()
            known = self.engine.fit(state, asked, rejections) is not None
            self._feasible[memo] = known
        return known

    def place(self, snapshot: ClusterSnapshot, request: PlacementRequest) -> Plan | Unschedulable:
        """See :class:`Policy`."""
        asked = dra_expressible(request)
        rejections = Rejections()
        shape: object = None
        if asked.exclusivity is ExclusivityDomain.NONE and not asked.host_selector:
            shape = static_shape(asked)
        fits: list[HostState] = []
        enough = self._enough(len(snapshot.hosts))
        for state in self._order(snapshot):
            if not self._feasible_on(state, asked, shape, rejections):
                continue
            fits.append(state)
            if len(fits) >= enough:
                break
        if not fits:
            return unschedulable(len(snapshot.hosts), request, rejections)
        # Plans are built for the chosen host only: one per feasible host
        # (best-fit scores >= 100) cost more than the fits themselves.
        chosen = self._choose(fits, request)
        fit = self.engine.fit(chosen, asked, rejections)
        if fit is None:  # a memo that lied would be a bug; say so rather than guess
            raise AssertionError(f"{chosen.view.host_id} was judged feasible but does not fit")
        return build_plan(fit, request)


@dataclass
class FirstFitPolicy(FeasibleHostsBaseline):
    """Kubernetes DRA's allocator: first feasible host in name order, first devices."""

    name: str = "first-fit"

    def _order(self, snapshot: ClusterSnapshot) -> Iterator[HostState]:
        for host_id in sorted(snapshot.hosts):
            yield snapshot.hosts[host_id]


def nodes_to_score(n_hosts: int, percentage: int = 0) -> int:
    """kube-scheduler's ``numFeasibleNodesToFind``: how many feasible nodes it scores.

    With the default adaptive percentage: 50% less 1% per 125 nodes, at least
    5%, and never fewer than 100 nodes (all of them below that).
    """
    if n_hosts < 100:
        return n_hosts
    if percentage <= 0:
        percentage = max(5, 50 - n_hosts // 125)
    return max(100, n_hosts * percentage // 100)


@dataclass
class BestFitPolicy(FeasibleHostsBaseline):
    """kube-scheduler, NodeResourcesFit MostAllocated: the fullest of the feasible hosts found."""

    name: str = "best-fit"
    _next_start: int = 0
    _totals: dict[int, dict[object, int]] = field(default_factory=dict, repr=False)

    def _enough(self, n_hosts: int) -> int:
        return nodes_to_score(n_hosts)

    def _order(self, snapshot: ClusterSnapshot) -> Iterator[HostState]:
        # Like kube-scheduler, each cycle starts where the last one stopped,
        # so the same hosts are not always the ones scored.
        ids = sorted(snapshot.hosts)
        if not ids:
            return
        start = self._next_start % len(ids)
        self._next_start = start + 1
        for i in range(len(ids)):
            yield snapshot.hosts[ids[(start + i) % len(ids)]]

    def _allocated_share(self, state: HostState, request: PlacementRequest) -> float:
        index = self.engine.host_index(state)
        kinds = {c.kind for c in request.claims}
        total = sum(len(state.view.whole_devices(kind)) for kind in kinds)
        if not total:
            return 0.0
        idle = sum(
            1
            for kind in kinds
            for d in state.view.whole_devices(kind)
            if d.address not in index.occupancy.modes
        )
        return (total - idle) / total

    def _choose(self, fits: list[HostState], request: PlacementRequest) -> HostState:
        # Most allocated first; ties to the host name, as a stable sort would.
        return min(fits, key=lambda s: (-self._allocated_share(s, request), s.view.host_id))


@dataclass
class FgdPolicy:
    """FGD (Weng et al., ATC'23): every feasible host, the one whose fragmentation grows least.

    Host-level as published: each feasible host is scored by the growth of
    its fragmentation under the task mix (the paper's ``F_n(M)``, see
    :mod:`scheduler.core.fragmentation`), nothing else, and the least growth
    wins. Within a host the devices are the engine's first feasible ones
    (devices already in the task's use first, the fullest first), where the
    paper tries each GPU; on MIG and vGPU geometry that order already takes
    the slot that strands least on the GPUs in use.

    With a ``prior`` (the workload's mix, as the paper's evaluation is given
    it) the mix is fixed; without one it is learnt from the requests placed.
    Like the other baselines it sees what a DRA claim can say.
    """

    name: str = "fgd"
    prior: TaskMix | None = None
    learner: TaskMixLearner = field(init=False, repr=False)
    engine: Engine = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.learner = TaskMixLearner(self.prior)
        profile = replace(
            _unscored_profile(),
            scorers=(FragmentationScorer(self.learner, consumed_weight=0),),
            observers=() if self.prior else (self.learner,),
        )
        self.engine = Engine(profile=profile, feasible_hosts=0)

    def place(self, snapshot: ClusterSnapshot, request: PlacementRequest) -> Plan | Unschedulable:
        """See :class:`Policy`."""
        return self.engine.schedule(snapshot, dra_expressible(request))


@dataclass
class RandomPolicy(FeasibleHostsBaseline):
    """A uniformly random feasible host (seeded), first feasible devices."""

    name: str = "random"
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def _order(self, snapshot: ClusterSnapshot) -> Iterator[HostState]:
        ids = list(snapshot.hosts)
        self._rng.shuffle(ids)
        for host_id in ids:
            yield snapshot.hosts[host_id]


#: Every policy by name, built fresh (each keeps its own memo and RNG).
POLICIES: Mapping[str, Callable[[], Policy]] = {
    "tessera": TesseraPolicy,
    "first-fit": FirstFitPolicy,
    "best-fit": BestFitPolicy,
    "random": RandomPolicy,
}
