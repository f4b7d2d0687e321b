"""The scheduling framework: extension points and what flows between them.

In the vocabulary of the Kubernetes scheduler framework, one request on one
host goes through:

1. **host filters** (:class:`HostFilter`): may the host take anything of this
   request at all (lease, labels)?
2. **option generation + option filters** (:class:`OptionFilter`): for each
   claim, every way one unit could be served on this host (a whole device, a
   VF pool of a PF, an mdev type on a parent, a MIG profile on a GPU), each
   kept or rejected with a named reason;
3. **reserve + unit filters** (:class:`Reserver`, :class:`UnitFilter`): a
   search assigns every claim unit an option, reserving concrete capacity (a
   MIG placement) and checking relations between units (NUMA, affinity);
4. **score** (:class:`Scorer`): the host's complete assignment gets a quality
   figure, summed over plugins, each with a line of why.

Every rejection names its plugin and a stable reason, so Explain can say how
many hosts or devices each plugin turned away. Everything here is pure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from tessera.scheduler.core.host import HostView, PciFunctionView
from tessera.scheduler.core.identity import IommuGroupNumber, PciAddress
from tessera.scheduler.core.occupancy import Occupancy
from tessera.scheduler.core.plan import Rejection
from tessera.scheduler.core.request import Affinity, Claim, DeviceForm, PlacementRequest
from tessera.scheduler.core.snapshot import HostState


@dataclass(frozen=True)
class Option:
    """One way to serve one unit of a claim on a host.

    Attributes:
        form: whole device, VF, mdev or MIG.
        device: the physical device it lives on (the whole device, the PF,
            the mdev parent, the MIG GPU): its NUMA node and PCIe position
            are the option's.
        pool: units of one pool are interchangeable (the VFs of a PF, the
            instances of an mdev type on a parent, a MIG profile on a GPU);
            a search never tells them apart, which keeps it small.
        free: units of the pool free now.
        group: the IOMMU group a whole device takes.
        variant: the mdev type id, MIG profile name, or VF driver.
        migratable: the unit can be live-migrated.
    """

    form: DeviceForm
    device: PciFunctionView
    pool: str
    free: int
    group: IommuGroupNumber | None = None
    variant: str = ""
    migratable: bool = False


@dataclass(frozen=True)
class Pick:
    """A claim unit's chosen option, with what reserve made concrete.

    Attributes:
        claim: the claim the unit belongs to.
        option: where it goes.
        mig_start: for MIG, the first memory slice of the chosen placement.
        mig_size: for MIG, its size in memory slices.
    """

    claim: Claim
    option: Option
    mig_start: int = -1
    mig_size: int = 0


@dataclass(frozen=True)
class Cycle:
    """One request being fitted onto one host: what every plugin reads.

    Attributes:
        request: the request.
        state: the host and its allocations.
        occupancy: what is taken on the host.
        distance: how far apart two of the host's functions are on PCIe
            (``nvidia-smi topo -m`` levels, 0 the same function to 5 across
            NUMA nodes), read from the topology graph.
    """

    request: PlacementRequest
    state: HostState
    occupancy: Occupancy
    distance: Callable[[PciAddress, PciAddress], int] | None = None

    @property
    def view(self) -> HostView:
        """The host's inventory view."""
        return self.state.view


#: A rejection before it is counted: (plugin, reason, detail).
Verdict = tuple[str, str, str]


class Rejections:
    """Counts rejections by (plugin, reason), keeping one example detail."""

    def __init__(self) -> None:
        """An empty tally."""
        self._counts: Counter[tuple[str, str]] = Counter()
        self._details: dict[tuple[str, str], str] = {}
        # Tallies to add as if made on another host, added when first read:
        # a request that finds its hosts never reads what the others said.
        self._renamed: list[tuple[Rejections, str, str]] = []

    @property
    def counts(self) -> Counter[tuple[str, str]]:
        """Rejections by (plugin, reason)."""
        if self._renamed:
            self._add_renamed()
        return self._counts

    @property
    def details(self) -> dict[tuple[str, str], str]:
        """The first detail seen per (plugin, reason)."""
        if self._renamed:
            self._add_renamed()
        return self._details

    def merge_renamed(self, other: Rejections, judged_on: str, host: str) -> None:
        """Add another tally as if it had been made on ``host`` rather than ``judged_on``.

        Details that name the host the tally was made on name ``host``
        instead (hosts of one hardware class share judgements); only the
        first detail per reason is kept, so only those that become first are
        rewritten. Deferred until this tally is read, in the order added.
        """
        if other.counts:
            self._renamed.append((other, judged_on, host))

    def _add_renamed(self) -> None:
        pending, self._renamed = self._renamed, []
        for other, judged_on, host in pending:
            self._counts.update(other.counts)
            details = self._details
            for key, detail in other.details.items():
                if key not in details:
                    details[key] = detail if judged_on == host else detail.replace(judged_on, host)

    def add(self, plugin: str, reason: str, detail: str = "") -> None:
        """Count one rejection."""
        self.counts[(plugin, reason)] += 1
        if detail:
            self.details.setdefault((plugin, reason), detail)

    def add_verdict(self, verdict: Verdict) -> None:
        """Count one rejection given as a verdict."""
        self.add(*verdict)

    def merge(self, other: Rejections) -> None:
        """Add another tally to this one."""
        self.counts.update(other.counts)
        for key, detail in other.details.items():
            self.details.setdefault(key, detail)

    def as_tuple(self) -> tuple[Rejection, ...]:
        """The tally as sorted :class:`Rejection` values."""
        return tuple(
            Rejection(plugin, reason, n, self.details.get((plugin, reason), ""))
            for (plugin, reason), n in sorted(self.counts.items())
        )


class HostFilter(Protocol):
    """Rejects a whole host for a request."""

    name: str

    def filter_host(self, cycle: Cycle) -> Verdict | None:
        """Why the host cannot take the request, or None."""
        ...


class OptionGenerator(Protocol):
    """Lists the options of one form for a claim."""

    form: DeviceForm

    def options(self, cycle: Cycle, claim: Claim) -> Iterator[Option | Verdict]:
        """Every option of the form, or a verdict for each device ruled out."""
        ...


class OptionFilter(Protocol):
    """Rejects one option of a claim."""

    name: str

    def filter_option(self, cycle: Cycle, claim: Claim, option: Option) -> Verdict | None:
        """Why the option cannot serve the claim, or None."""
        ...


class Reserver(Protocol):
    """Makes a unit's pick concrete against what earlier units took."""

    name: str

    def reserve(
        self, cycle: Cycle, picks: Sequence[Pick], claim: Claim, option: Option
    ) -> Pick | None:
        """The pick, or None when the option has no room left for it."""
        ...


@dataclass(frozen=True)
class SearchPass:
    """One attempt of the search: the NUMA nodes allowed and the affinities held.

    Attributes:
        numa_nodes: the nodes every unit must be on; None for any.
        affinities: the affinities every pair of units must meet (the
            required ones, plus the preferred ones on a first pass).
    """

    numa_nodes: frozenset[int] | None
    affinities: tuple[Affinity, ...]


class UnitFilter(Protocol):
    """Checks a pick against the picks before it (NUMA, affinity)."""

    name: str

    def admit(self, search: SearchPass, picks: Sequence[Pick], pick: Pick) -> bool:
        """Whether ``pick`` may join ``picks`` in this pass."""
        ...


class RequestObserver(Protocol):
    """Sees every request the engine schedules, before its hosts are judged.

    What a scorer that learns from demand (the task mix of
    :class:`~scheduler.core.engine.plugins.FragmentationScorer`) is fed by.
    """

    def observe(self, request: PlacementRequest) -> None:
        """Take one request into account."""
        ...


class Scorer(Protocol):
    """Scores a host's complete assignment; higher is better."""

    name: str

    def score(self, cycle: Cycle, picks: Sequence[Pick]) -> tuple[int, str]:
        """The plugin's score and a line of why."""
        ...
