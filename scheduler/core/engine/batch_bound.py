"""An upper bound on what any placement of a batch can reach, by capacity.

A batch's candidate columns say which requests can go somewhere; they do not
say how many can go at once. On a contended cluster that is the whole
question: a thousand requests that each fit somewhere may together need
three times the free GPUs. This bound relaxes the cluster to a few pools
of divisible capacity and asks how much value the requests could place if
they only had to share those:

* **GPU capacity**, in GPUs: every GPU's free share (1 untouched, free
  compute slices over 7 in MIG use, the free vGPU share in mdev use; an
  SR-IOV vGPU GPU's VFs each their own vGPU share) as
  :func:`scheduler.core.fragmentation.free_capacity` reads it, exactly,
  summed over the schedulable hosts. A request takes at least, per GPU
  unit, the least its accepted forms can take
  (:func:`scheduler.core.engine.batch_value.gpu_need`): 1 whole, a MIG
  profile's compute slices over 7, one vGPU of a type 1 / its instances; a VF nothing
  (its share is not modelled, so it costs nothing here, which keeps the
  bound valid).
* **Whole devices of every other kind** (NICs, accelerators): the idle ones.
  A claim that accepts only whole devices takes its count; one that accepts
  VFs or mdevs takes nothing here.

Each pool alone is a fractional knapsack: values sorted by value per unit
taken, filled greedily, the last one in part. Any real placement fits in
every pool, so its value is at most each pool's knapsack optimum, and at
most their minimum. Pure and cheap: one pass over the hosts.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction

from tessera.scheduler.core.engine.batch_value import GpuUnits, gpu_need, learn_gpu_units
from tessera.scheduler.core.fragmentation import free_capacity
from tessera.scheduler.core.host import HostView
from tessera.scheduler.core.mig_geometry import COMPUTE_SLICES
from tessera.scheduler.core.occupancy import Occupancy
from tessera.scheduler.core.request import DeviceForm, DeviceKind, PlacementRequest
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState


def capacity_bound(
    snapshot: ClusterSnapshot,
    hardware_of: Callable[[HostState], tuple[HostView, Occupancy]],
    requests: Sequence[PlacementRequest],
    values: Mapping[int, int],
    units: GpuUnits | None = None,
) -> int:
    """The most value any placement of ``requests`` on ``snapshot`` can reach, by capacity.

    Args:
        snapshot: the cluster before the batch.
        hardware_of: a host state's hardware (a view with the same hardware,
            shared by hosts alike, so what is derived from it is derived
            once) and its occupancy (:meth:`Engine.hardware_and_occupancy`).
        requests: the batch.
        values: request index -> its value if placed; requests left out
            cannot be placed at all (no fitting host) and add nothing.
        units: the fleet's MIG and vGPU units (:func:`learn_gpu_units`),
            when the caller has them already.

    Returns:
        An upper bound on the summed values of the requests any placement
        places (see the module doc). Exact arithmetic throughout: weights
        pass 2**53 in large batches, where a float sum would lose units.
    """
    # Every kind a pool, empty ones too: a whole-only claim of a kind with
    # nothing idle anywhere takes from a pool of nothing. GPU capacity is
    # summed as sevenths (untouched GPUs 7, MIG GPUs their free slices) and
    # vGPU shares apart: exact without a Fraction per host.
    idle: dict[DeviceKind, int] = dict.fromkeys(DeviceKind, 0)
    sevenths = 0
    shares = Fraction(0)
    if units is None:
        units = learn_gpu_units(snapshot, hardware_of)
    for state in snapshot.hosts.values():
        if not state.schedulable:
            continue
        view, occupancy = hardware_of(state)
        host_sevenths, host_vgpu = free_capacity(view, occupancy)
        sevenths += sum(host_sevenths.values())
        for share in host_vgpu.values():
            shares += share
        for kind in DeviceKind:
            if kind is DeviceKind.GPU:
                continue
            idle[kind] += sum(
                1
                for d in view.whole_devices(kind)
                if d.address not in occupancy.modes and d.iommu_group not in occupancy.groups_taken
            )
    pools = {kind: Fraction(n) for kind, n in idle.items()}
    pools[DeviceKind.GPU] += Fraction(sevenths, COMPUTE_SLICES) + shares
    need_of: dict[tuple[object, ...], Fraction] = {}
    bound: Fraction | None = None
    for pool, capacity in pools.items():
        needs: dict[int, Fraction] = {}
        for i in values:
            key = (requests[i].claims, pool)
            found_need = need_of.get(key)
            if found_need is None:
                found_need = need_of[key] = _need(requests[i], pool, units)
            needs[i] = found_need
        found = _knapsack(values, needs, capacity)
        bound = found if bound is None else min(bound, found)
    return min(sum(values.values()), math.ceil(bound or 0))


def _need(request: PlacementRequest, pool: DeviceKind, units: GpuUnits) -> Fraction:
    """The least a request takes from one pool (see the module doc)."""
    if pool is DeviceKind.GPU:
        return gpu_need(request, units)
    return Fraction(
        sum(
            claim.count
            for claim in request.claims
            if claim.kind is pool and claim.accepted_forms() == {DeviceForm.WHOLE_DEVICE}
        )
    )


def _knapsack(
    values: Mapping[int, int], needs: Mapping[int, Fraction], capacity: Fraction
) -> Fraction:
    """The fractional knapsack optimum: best value per unit first, the last item in part.

    In integers: needs and capacity scaled to a common denominator, and
    items of one need (there are few distinct needs) merged by a heap whose
    keys are exact integer multiples of value per unit.
    """
    total = 0
    groups: dict[Fraction, list[int]] = {}
    for i, value in values.items():
        need = needs[i]
        if need <= 0:
            total += value
        else:
            groups.setdefault(need, []).append(value)
    if not groups:
        return Fraction(total)
    scale = math.lcm(capacity.denominator, *(n.denominator for n in groups))
    units = {n: int(n * scale) for n in groups}
    common = math.lcm(*units.values())
    heads: list[tuple[int, Fraction, int]] = []
    for need, group in groups.items():
        group.sort(reverse=True)
        # value / need, scaled by ``common``: an exact integer.
        heads.append((-group[0] * (common // units[need]), need, 0))
    heapq.heapify(heads)
    left = int(capacity * scale)
    while heads:
        _, need, k = heapq.heappop(heads)
        group, unit = groups[need], units[need]
        value = group[k]
        if left < unit:
            return total + Fraction(value * max(0, left), unit)
        total += value
        left -= unit
        if k + 1 < len(group):
            heapq.heappush(heads, (-group[k + 1] * (common // unit), need, k + 1))
    return Fraction(total)
