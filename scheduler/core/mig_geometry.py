"""MIG geometry of one GPU: where GPU instances can go and what that costs.

Ground truth is ``shared/reference/mig_profiles.json`` and HW_FACTS.md §9:

* A placement ``(start, size)`` counts **memory slices**, 8 per GPU; a new GPU
  instance (GI) must not overlap the memory slices of an existing one.
* Each profile uses ``MigProfile.slices`` **compute slices**; a GPU has 7.
* Each profile has a per-GPU instance limit (``instance_count``): 7 for 1g,
  1 for 1g+me (profile 20), 4 for 1g double-memory (15), 3 for 2g, 2 for 3g,
  1 for 4g and 7g. The limits are the same on every supported GPU.

Whether the driver forbids further combinations that pass these three checks
is unknown (HW_FACTS §9.1, e.g. 4g+3g), so this module models exactly those
three; on hardware ``nvmlDeviceGetGpuInstanceRemainingCapacity`` stays
authoritative. Everything here is pure: no I/O, values in, values out.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from types import MappingProxyType

from tessera.scheduler.core.mig import GpuInstance, MigProfile, MigProfileName, Placement

#: Memory slices per GPU (placements count these).
MEMORY_SLICES = 8
#: Compute (SM) slices per GPU (``MigProfile.slices`` counts these).
COMPUTE_SLICES = 7

#: Per-GPU instance limit by profile ID (``instance_count`` in
#: mig_profiles.json, identical on A100, H100, H100 NVL and H200).
DEFAULT_INSTANCE_LIMITS: Mapping[int, int] = MappingProxyType(
    {19: 7, 20: 1, 15: 4, 14: 3, 9: 2, 5: 1, 0: 1}
)


REASON_PLACEMENT_NOT_ALLOWED = "mig-placement-not-allowed"
REASON_OUT_OF_RANGE = "mig-placement-out-of-range"
REASON_MEMORY_OVERLAP = "mig-memory-slices-occupied"
REASON_COMPUTE_BUDGET = "mig-compute-slices-exhausted"
REASON_INSTANCE_LIMIT = "mig-instance-limit-reached"


class MigGeometryError(ValueError):
    """A GPU instance that cannot exist on the layout, with a named reason.

    Attributes:
        reason: one of the ``REASON_*`` constants, stable for callers and
            metrics; the message adds the details for humans.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def _mask(start: int, size: int) -> int:
    """Bit ``i`` set for each memory slice ``i`` in ``[start, start+size)``.

    Only for placements inside the GPU (:func:`_inside`): a shift by an
    untrusted size would allocate an integer of that many bits.
    """
    return ((1 << size) - 1) << start


def _inside(start: int, size: int) -> bool:
    """Whether ``[start, start+size)`` is a non-empty run of the GPU's memory slices."""
    return start >= 0 and size >= 1 and start + size <= MEMORY_SLICES


def _legal(placements: Iterable[Placement]) -> tuple[Placement, ...]:
    """A profile's placements that fit the GPU, each once, the first 8 of them.

    Profiles come from the agent's report. The registry refuses placements
    outside the 8 memory slices and duplicates, but geometry does not rely on
    it: a placement outside the GPU is one nothing can use, and no real
    profile lists more placements than there are memory slices, so anything
    past that is dropped rather than searched (the searches below are
    combinatorial in the number of placements).
    """
    legal = dict.fromkeys(p for p in placements if _inside(*p))
    return tuple(legal)[:MEMORY_SLICES]


@dataclass(frozen=True)
class MigLayout:
    """Immutable occupancy of one MIG-enabled GPU.

    Construction checks the invariants, so a ``MigLayout`` that exists is one
    the hardware could hold: instances inside the 8 memory slices and not
    overlapping, compute within budget, and per-profile counts within limits.
    Instances are kept sorted by start so that equal occupancy compares equal
    whatever order it was built in.

    Attributes:
        instances: the occupied GPU instances.
        compute_budget: compute slices the GPU has (7 on every MIG GPU).
        instance_limits: per-GPU instance limit by profile ID; a profile
            without an entry is bound only by memory and compute.
    """

    instances: tuple[GpuInstance, ...] = ()
    compute_budget: int = COMPUTE_SLICES
    # Excluded from the hash: a mapping is unhashable, and the limits are the
    # same for every layout in practice, so the hash loses nothing.
    instance_limits: Mapping[int, int] = field(
        default_factory=lambda: DEFAULT_INSTANCE_LIMITS, hash=False
    )

    def __post_init__(self) -> None:
        # Copy and freeze the limits so a caller's dict cannot change a
        # layout after it was checked.
        object.__setattr__(self, "instance_limits", MappingProxyType(dict(self.instance_limits)))
        object.__setattr__(self, "instances", tuple(sorted(self.instances)))
        if not 0 <= self.compute_budget <= COMPUTE_SLICES:
            raise MigGeometryError(
                REASON_OUT_OF_RANGE,
                f"compute budget {self.compute_budget} not in 0..{COMPUTE_SLICES}",
            )
        occupied = 0
        for gi in self.instances:
            if gi.start < 0 or gi.size < 1 or gi.start + gi.size > MEMORY_SLICES or gi.slices < 1:
                raise MigGeometryError(REASON_OUT_OF_RANGE, f"{gi} outside the GPU")
            m = _mask(gi.start, gi.size)
            if occupied & m:
                raise MigGeometryError(REASON_MEMORY_OVERLAP, f"{gi} overlaps another instance")
            occupied |= m
        if self.used_compute > self.compute_budget:
            raise MigGeometryError(
                REASON_COMPUTE_BUDGET,
                f"{self.used_compute} compute slices used, budget {self.compute_budget}",
            )
        for profile_id, count in self.counts.items():
            limit = self.instance_limits.get(profile_id)
            if limit is not None and count > limit:
                raise MigGeometryError(
                    REASON_INSTANCE_LIMIT,
                    f"{count} instances of profile {profile_id}, limit {limit}",
                )

    @property
    def occupied_mask(self) -> int:
        """Bit ``i`` set for each occupied memory slice ``i``."""
        out = 0
        for gi in self.instances:
            out |= _mask(gi.start, gi.size)
        return out

    def memory_free(self, placement: Placement) -> bool:
        """Whether no instance occupies a memory slice of ``placement``.

        A placement outside the GPU's memory slices is never free.
        """
        return _inside(*placement) and not self.occupied_mask & _mask(*placement)

    @property
    def free_memory_slices(self) -> tuple[int, ...]:
        """Indexes of the memory slices no instance occupies."""
        occupied = self.occupied_mask
        return tuple(i for i in range(MEMORY_SLICES) if not occupied >> i & 1)

    @property
    def used_compute(self) -> int:
        """Compute slices the instances use."""
        return sum(gi.slices for gi in self.instances)

    @property
    def free_compute(self) -> int:
        """Compute slices still unused."""
        return self.compute_budget - self.used_compute

    @property
    def counts(self) -> Mapping[int, int]:
        """Instances per profile ID."""
        return Counter(gi.profile_id for gi in self.instances)

    def headroom(self, profile: MigProfile) -> int:
        """How many more of ``profile`` compute slices and its instance limit allow.

        Memory is not considered; see :func:`capacity` for the full count.
        A profile that says it uses no compute slice (only a malformed report
        can) has no headroom rather than a division by zero.
        """
        if profile.slices < 1:
            return 0
        by_compute = self.free_compute // profile.slices
        limit = self.instance_limits.get(profile.profile_id)
        if limit is None:
            return by_compute
        return min(by_compute, limit - self.counts.get(profile.profile_id, 0))


def _rejection(layout: MigLayout, profile: MigProfile, placement: Placement) -> str | None:
    """Why ``profile`` cannot go at ``placement`` (which it allows), or None."""
    if not _inside(*placement):
        return REASON_OUT_OF_RANGE
    if not layout.memory_free(placement):
        return REASON_MEMORY_OVERLAP
    if profile.slices > layout.free_compute:
        return REASON_COMPUTE_BUDGET
    if layout.headroom(profile) < 1:
        # Compute was checked above, so what is left is the instance limit.
        return REASON_INSTANCE_LIMIT
    return None


def placements_available(layout: MigLayout, profile: MigProfile) -> tuple[Placement, ...]:
    """The placements where ``profile`` could be created now.

    Args:
        layout: the GPU's occupancy.
        profile: the profile to place.

    Returns:
        The profile's allowed placements (in its table order, ascending start)
        that overlap no occupied memory slice, provided the compute budget
        and the profile's instance limit leave room for one more; empty if not.
        Placements outside the GPU and repeats are left out (:func:`_legal`).
    """
    return tuple(p for p in _legal(profile.placements) if _rejection(layout, profile, p) is None)


def with_instance(layout: MigLayout, profile: MigProfile, start: int) -> MigLayout:
    """The layout with one more instance of ``profile`` starting at ``start``.

    Args:
        layout: the GPU's occupancy.
        profile: the profile to create.
        start: the first memory slice; must start one of the profile's
            placements.

    Returns:
        A new layout; ``layout`` is unchanged.

    Raises:
        MigGeometryError: with reason ``mig-placement-not-allowed`` if no
            placement of the profile starts at ``start`` (e.g. a 1g at 7),
            ``mig-memory-slices-occupied``, ``mig-compute-slices-exhausted``
            or ``mig-instance-limit-reached``.
    """
    sizes = [size for s, size in profile.placements if s == start]
    if not sizes:
        raise MigGeometryError(
            REASON_PLACEMENT_NOT_ALLOWED,
            f"{profile.name} has no placement at {start}; allowed {profile.placements}",
        )
    placement = (start, sizes[0])
    reason = _rejection(layout, profile, placement)
    if reason is not None:
        raise MigGeometryError(reason, f"{profile.name} at {placement} on {layout.instances}")
    gi = GpuInstance(start, sizes[0], profile.profile_id, profile.slices)
    return MigLayout((*layout.instances, gi), layout.compute_budget, layout.instance_limits)


def _disjoint(placements: Iterable[Placement], occupied: int) -> int | None:
    """Union mask of ``placements`` if pairwise disjoint and clear of ``occupied``."""
    mask = occupied
    for p in placements:
        m = _mask(*p)
        if mask & m:
            return None
        mask |= m
    return mask


def _max_more(layout: MigLayout, profile: MigProfile) -> int:
    """Exact number of further ``profile`` instances the layout can take alone."""
    free = placements_available(layout, profile)
    # At most 7 placements per profile, so trying subsets from the largest
    # size down is at most 128 checks: exact, no greedy approximation needed.
    for k in range(min(len(free), layout.headroom(profile)), 0, -1):
        if any(_disjoint(c, layout.occupied_mask) is not None for c in combinations(free, k)):
            return k
    return 0


def capacity(layout: MigLayout, table: Sequence[MigProfile]) -> Mapping[MigProfileName, int]:
    """How many more instances of each profile the GPU could take.

    Each count is for that profile alone (what
    ``nvmlDeviceGetGpuInstanceRemainingCapacity`` reports), without moving
    existing instances. It is exact: the largest set of the profile's free
    placements that are pairwise disjoint, capped by free compute slices and
    the instance limit.

    Args:
        layout: the GPU's occupancy.
        table: the GPU's profiles, e.g. ``MIG_TABLES["A100-80GB"]``.

    Returns:
        Profile name to count, for every profile in ``table``.
    """
    return {p.name: _max_more(layout, p) for p in table}


def _packable(layout: MigLayout, extra: MigProfile, table: Sequence[MigProfile]) -> bool:
    """Whether the instances could be re-placed so that one more ``extra`` fits.

    Every existing instance keeps its profile but may take any placement its
    profile allows; an instance whose profile is not in ``table`` stays put.
    Compute and instance limits do not depend on placement, so they are
    checked once; only memory needs the search.
    """
    if layout.headroom(extra) < 1:
        return False
    by_id = {p.profile_id: p for p in table}
    wanted = Counter(layout.counts)
    wanted[extra.profile_id] += 1
    groups: list[tuple[tuple[Placement, ...], int]] = []
    fixed = 0
    for gi in layout.instances:
        if gi.profile_id not in by_id:
            fixed |= _mask(gi.start, gi.size)
    for profile_id, count in wanted.items():
        if profile_id in by_id:
            groups.append((_legal(by_id[profile_id].placements), count))
    # Most constrained first (largest footprint), so dead ends die early.
    groups.sort(key=lambda g: -g[0][0][1] if g[0] else 0)

    def search(i: int, occupied: int) -> bool:
        if i == len(groups):
            return True
        placements, count = groups[i]
        # Instances of one profile are interchangeable: choose a set of
        # placements, not an ordering, which keeps the search tiny.
        for chosen in combinations(placements, count):
            mask = _disjoint(chosen, occupied)
            if mask is not None and search(i + 1, mask):
                return True
        return False

    return search(0, fixed)


def fragmentation_score(layout: MigLayout, table: Sequence[MigProfile]) -> float:
    """How much of the largest possible next instance is lost to placement.

    Let *ideal* be the compute slices of the largest profile in ``table``
    that would fit if the existing instances were re-placed optimally (same
    profiles, any allowed placements, same compute budget and limits), and
    *now* that of the largest profile placeable as things stand. The score is
    ``1 - now / ideal``, or 0 when ``ideal`` is 0 (a full GPU is full, not
    fragmented). So 0 means the free space is as usable as it could be;
    0.25 means a 4g could fit after repacking but only a 3g fits now; 1 means
    free compute is stranded behind memory slices no placement can use.
    This is the "beware of fragmentation" idea: the measure is about the
    large profiles, because small ones fit almost anywhere.

    Args:
        layout: the GPU's occupancy.
        table: the GPU's profiles.

    Returns:
        A score in [0, 1].
    """
    # Memoised: the same few layouts recur on thousands of GPUs.
    return _fragmentation_cached(layout, tuple(table))


@functools.lru_cache(maxsize=65536)
def _fragmentation_cached(layout: MigLayout, table: tuple[MigProfile, ...]) -> float:
    return _fragmentation_score(layout, table)


def _fragmentation_score(layout: MigLayout, table: Sequence[MigProfile]) -> float:
    # The computation behind fragmentation_score (see its docstring).
    ideal = max((p.slices for p in table if _packable(layout, p, table)), default=0)
    if ideal == 0:
        return 0.0
    now = max((p.slices for p in table if placements_available(layout, p)), default=0)
    return 1.0 - now / ideal


def best_placement(
    layout: MigLayout, profile: MigProfile, table: Sequence[MigProfile]
) -> Placement | None:
    """The available placement that keeps the largest profiles placeable.

    Minimizes :func:`fragmentation_score` after placing; ties go to the
    highest start. The tie-break matches the driver's observed preference
    (highest free start first, HW_FACTS §9.4) and keeps slice 0, the only
    start of 4g and 7g, free as long as possible.

    Args:
        layout: the GPU's occupancy.
        profile: the profile to place.
        table: the GPU's profiles, for the fragmentation score.

    Returns:
        ``(start, size)``, or None if the profile fits nowhere.
    """
    candidates = placements_available(layout, profile)
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda p: (fragmentation_score(with_instance(layout, profile, p[0]), table), -p[0]),
    )
