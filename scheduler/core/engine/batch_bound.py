"""An upper bound on what any placement of a batch can reach, by capacity.

A batch's candidate columns say which requests can go somewhere; they do not
say how many can go at once. On a contended cluster that is the whole
question: a thousand requests that each fit somewhere may together need
three times the free GPUs. This bound relaxes the cluster to a few pools
of divisible capacity and asks how much value the requests could place if
they only had to share those:

* **GPU capacity**, in GPUs: every GPU's free share
  (:func:`scheduler.core.fragmentation.free_shares`: 1 untouched, free compute
  slices over 7 in MIG use, the free vGPU share in mdev use) summed over the
  schedulable hosts. A request takes at least, per GPU unit, the least its
  accepted forms can take: 1 whole, a MIG profile's compute slices over 7,
  one vGPU of a type 1 / its instances; a VF nothing (its share is not
  modelled, so it costs nothing here, which keeps the bound valid).
* **Whole devices of every other kind** (NICs, accelerators): the idle ones.
  A claim that accepts only whole devices takes its count; one that accepts
  VFs or mdevs takes nothing here.

Each pool alone is a fractional knapsack: values sorted by value per unit
taken, filled greedily, the last one in part. Any real placement fits in
every pool, so its value is at most each pool's knapsack optimum, and at
most their minimum. Pure and cheap: one pass over the hosts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction

from scheduler.core.fragmentation import free_shares
from scheduler.core.host import HostView
from scheduler.core.mig_geometry import COMPUTE_SLICES
from scheduler.core.occupancy import Occupancy
from scheduler.core.request import DeviceForm, DeviceKind, PlacementRequest
from scheduler.core.snapshot import ClusterSnapshot


def capacity_bound(
    snapshot: ClusterSnapshot,
    occupancy_of: Callable[[str], Occupancy],
    requests: Sequence[PlacementRequest],
    values: Mapping[int, int],
) -> int:
    """The most value any placement of ``requests`` on ``snapshot`` can reach, by capacity.

    Args:
        snapshot: the cluster before the batch.
        occupancy_of: a host id's occupancy on ``snapshot`` (the engine's).
        requests: the batch.
        values: request index -> its value if placed; requests left out
            cannot be placed at all (no fitting host) and add nothing.

    Returns:
        An upper bound on the summed values of the requests any placement
        places (see the module doc).
    """
    # Every kind a pool, empty ones too: a whole-only claim of a kind with
    # nothing idle anywhere takes from a pool of nothing.
    pools: dict[DeviceKind, float] = dict.fromkeys(DeviceKind, 0.0)
    mig_slices: dict[str, int] = {}
    mdev_share: dict[str, Fraction] = {}
    seen: set[int] = set()
    for host_id, state in snapshot.hosts.items():
        view = state.view
        if id(view) not in seen:
            seen.add(id(view))
            _learn_units(view, mig_slices, mdev_share)
        if not state.schedulable:
            continue
        occupancy = occupancy_of(host_id)
        pools[DeviceKind.GPU] += sum(free_shares(view, occupancy).values())
        for kind in DeviceKind:
            if kind is DeviceKind.GPU:
                continue
            idle = sum(
                1
                for d in view.whole_devices(kind)
                if d.address not in occupancy.modes and d.iommu_group not in occupancy.groups_taken
            )
            pools[kind] += idle
    bound: float | None = None
    for pool, capacity in pools.items():
        needs = {i: _need(requests[i], pool, mig_slices, mdev_share) for i in values}
        found = _knapsack(values, needs, capacity)
        bound = found if bound is None else min(bound, found)
    # Rounding the fractional item's part down could undercut the bound.
    return min(sum(values.values()), int(-(-(bound or 0.0) // 1)))


def _learn_units(
    view: HostView, mig_slices: dict[str, int], mdev_share: dict[str, Fraction]
) -> None:
    """The least compute slices of each MIG profile name, the least share of each vGPU type."""
    for gpu in view.gpus.values():
        for profile in gpu.mig_profiles:
            known = mig_slices.get(profile.name)
            if known is None or profile.slices < known:
                mig_slices[profile.name] = profile.slices
    for parent in view.mdev_parents.values():
        for type_id, mdev_type in parent.types.items():
            share = Fraction(1, max(1, mdev_type.max_instances))
            known_share = mdev_share.get(type_id)
            if known_share is None or share < known_share:
                mdev_share[type_id] = share


def _need(
    request: PlacementRequest,
    pool: DeviceKind,
    mig_slices: Mapping[str, int],
    mdev_share: Mapping[str, Fraction],
) -> float:
    """The least a request takes from one pool (see the module doc)."""
    need = 0.0
    for claim in request.claims:
        forms = claim.accepted_forms()
        if pool is DeviceKind.GPU and claim.kind is DeviceKind.GPU:
            least = 1.0 if DeviceForm.WHOLE_DEVICE in forms else float("inf")
            if DeviceForm.VF in forms:
                least = 0.0
            if DeviceForm.MIG in forms:
                names = claim.mig_profiles or mig_slices.keys()
                slices = [mig_slices[n] for n in names if n in mig_slices]
                least = min(least, min(slices, default=1) / COMPUTE_SLICES)
            if DeviceForm.MDEV in forms:
                types = claim.mdev_types or mdev_share.keys()
                shares = [mdev_share[t] for t in types if t in mdev_share]
                least = min(least, float(min(shares, default=Fraction(0))))
            need += claim.count * (0.0 if least == float("inf") else least)
        elif (
            pool is not DeviceKind.GPU and claim.kind is pool and forms == {DeviceForm.WHOLE_DEVICE}
        ):
            need += claim.count
    return need


def _knapsack(values: Mapping[int, int], needs: Mapping[int, float], capacity: float) -> float:
    """The fractional knapsack optimum: best value per unit first, the last item in part."""
    total = 0.0
    left = capacity
    for i in sorted(values, key=lambda i: -values[i] / needs[i] if needs[i] > 0 else -float("inf")):
        need = needs[i]
        if need <= 0:
            total += values[i]
        elif left >= need:
            total += values[i]
            left -= need
        else:
            total += values[i] * max(0.0, left) / need
            left = 0.0
    return total
