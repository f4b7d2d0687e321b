"""What placing a batch's requests is worth: priority first, then GPU-equivalents.

A batch that cannot place everything must choose, and counting placed
requests chooses badly: eight 1-GPU requests then outweigh one 8-GPU request
of the same priority, and a seed that spends the room on small requests
looks best while the cluster's GPUs stay as idle as before. The batch values
each request by

* its **priority**, ranked: the batch's lowest priority counts 1, the next
  2, and so on (ranks, not the raw numbers, which a client chooses freely
  and could make overflow the solver's 64-bit objective); times
* its **GPU-equivalents**: the least share of GPUs any of its accepted forms
  takes (1 per whole GPU, a MIG profile's compute slices over 7, one vGPU of
  a type 1 / its instances, a VF nothing), in :data:`GPU_UNITS` per GPU,
  plus one unit for the request itself, so that a request with no GPU share
  (VFs, NICs) is still worth placing, and of two requests as large the
  batch takes the one it can serve in more ways no less readily.

Placement quality comes last: a request's weight is twice any batch's
quality total (see :func:`request_values`). The least GPU share is the
request's, not the column's: a flexible request placed as a whole GPU where
a MIG slice would do gains nothing by it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from scheduler.core.host import HostView
from scheduler.core.mig_geometry import COMPUTE_SLICES
from scheduler.core.occupancy import Occupancy
from scheduler.core.request import Claim, DeviceForm, DeviceKind, PlacementRequest
from scheduler.core.snapshot import ClusterSnapshot, HostState

#: A GPU's worth in value units: MIG sevenths times 32, so the smallest MIG
#: profile (32 of 224) and a vGPU of up to 32 per GPU are whole numbers of
#: units (finer vGPU shares round down), and the one unit each request adds
#: for itself stays small beside a GPU. Bench (c), 1,000 requests: with 56
#: units a GPU the capacity bound, which takes the best value per GPU first,
#: sat 1.03% above the batch (small requests' own units counted 1/56 of a
#: GPU each); with 224, 0.79%, for the same placements.
GPU_UNITS = COMPUTE_SLICES * 32

#: The largest objective the values may add up to: CP-SAT's objective and
#: its coefficients are 64-bit integers, and quality is added on top.
MAX_TOTAL = 1 << 60

#: Quality of one column is squeezed into [0, QUALITY_RANGE].
QUALITY_RANGE = 1000

#: The forms whose GPU share depends on the fleet's MIG profiles and vGPU types.
_SHARED_FORMS = frozenset({DeviceForm.MIG, DeviceForm.MDEV})


@dataclass(frozen=True)
class GpuUnits:
    """How much of a GPU the smallest unit of each shared form takes, in this fleet.

    Attributes:
        mig_slices: MIG profile name -> the fewest compute slices it takes.
        mdev_share: vGPU type -> the least share of its GPU one instance takes.
    """

    mig_slices: Mapping[str, int] = field(default_factory=dict)
    mdev_share: Mapping[str, Fraction] = field(default_factory=dict)


def learn_gpu_units(
    snapshot: ClusterSnapshot,
    hardware_of: Callable[[HostState], tuple[HostView, Occupancy]],
    requests: Sequence[PlacementRequest] | None = None,
) -> GpuUnits:
    """The MIG profiles' and vGPU types' least shares over every host's hardware.

    Args:
        snapshot: the cluster.
        hardware_of: a host state's hardware view, shared by hosts alike
            (:meth:`Engine.hardware_and_occupancy`), so each is read once.
        requests: when given, and none of them accepts a MIG instance or a
            vGPU, no unit is needed and the cluster is not walked (about
            20 ms at 10,000 hosts).
    """
    mig_slices: dict[str, int] = {}
    mdev_share: dict[str, Fraction] = {}
    if requests is not None and not any(
        claim.kind is DeviceKind.GPU and claim.accepted_forms() & _SHARED_FORMS
        for r in requests
        for claim in r.claims
    ):
        return GpuUnits()
    seen: set[int] = set()
    for state in snapshot.hosts.values():
        view, _ = hardware_of(state)
        if id(view) in seen:
            continue
        seen.add(id(view))
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
    return GpuUnits(mig_slices, mdev_share)


def gpu_equivalents_of(requests: Sequence[PlacementRequest], units: GpuUnits) -> list[Fraction]:
    """:func:`gpu_equivalents` of each request, worked out once per distinct set of claims."""
    memo: dict[tuple[Claim, ...], Fraction] = {}
    out = []
    for r in requests:
        found = memo.get(r.claims)
        if found is None:
            found = memo[r.claims] = gpu_equivalents(r, units)
        out.append(found)
    return out


def gpu_equivalents(request: PlacementRequest, units: GpuUnits) -> Fraction:
    """The least share of GPUs any placement of ``request`` takes (see the module doc)."""
    return sum((_least_gpu_share(c, units) for c in request.claims), Fraction(0))


def _least_gpu_share(claim: Claim, units: GpuUnits) -> Fraction:
    if claim.kind is not DeviceKind.GPU:
        return Fraction(0)
    forms = claim.accepted_forms()
    if DeviceForm.VF in forms:
        # An SR-IOV vGPU's share is not modelled: nothing, which keeps the
        # capacity bound valid.
        return Fraction(0)
    least: Fraction | None = Fraction(1) if DeviceForm.WHOLE_DEVICE in forms else None
    if DeviceForm.MIG in forms:
        names = claim.mig_profiles or units.mig_slices.keys()
        slices = min((units.mig_slices[n] for n in names if n in units.mig_slices), default=1)
        least = _least(least, Fraction(slices, COMPUTE_SLICES))
    if DeviceForm.MDEV in forms:
        types = claim.mdev_types or units.mdev_share.keys()
        least = _least(
            least,
            min((units.mdev_share[t] for t in types if t in units.mdev_share), default=Fraction(0)),
        )
    return claim.count * (least if least is not None else Fraction(0))


def _least(a: Fraction | None, b: Fraction) -> Fraction:
    return b if a is None else min(a, b)


def priority_ranks(priorities: Iterable[int]) -> dict[int, int]:
    """Each distinct priority's rank: the lowest 1, the next 2, and so on."""
    return {p: rank for rank, p in enumerate(sorted(set(priorities)), start=1)}


def value_quantum(n_requests: int) -> int:
    """The unit every request value is a multiple of: twice any batch's quality total."""
    return 2 * QUALITY_RANGE * (n_requests + 1)


def request_values(requests: Sequence[PlacementRequest], units: GpuUnits) -> list[int]:
    """Per request, the value of placing it: priority rank times GPU-equivalents, above quality.

    Each value is a multiple of twice any quality total
    (:func:`value_quantum`), so a solution short of one
    request's worth is further below the optimum than any quality gap the
    solver stops within. Should the values of pathological requests (a
    thousand GPUs each, priorities all distinct) add up past
    :data:`MAX_TOTAL`, sizes are dropped and the ranks alone value requests.
    """
    ranks = priority_ranks(r.priority for r in requests)
    quantum = value_quantum(len(requests))
    sizes = [math.floor(g * GPU_UNITS) + 1 for g in gpu_equivalents_of(requests, units)]
    values = [quantum * ranks[r.priority] * size for r, size in zip(requests, sizes, strict=True)]
    if sum(values) > MAX_TOTAL:
        values = [quantum * ranks[r.priority] for r in requests]
    return values
