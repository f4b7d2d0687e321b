"""What placing a batch's requests is worth: priority rank times GPU-equivalents.

A batch that cannot place everything must choose, and counting placed
requests chooses badly: eight 1-GPU requests then outweigh one 8-GPU request
of the same priority, and a seed that spends the room on small requests
looks best while the cluster's GPUs stay as idle as before. The batch values
each request by

* its **priority**, ranked: the batch's lowest priority counts 1, the next
  2, and so on (ranks, not the raw numbers, which a client chooses freely
  and could make overflow the solver's 64-bit objective); times
* its **GPU-equivalents**: the least share of GPUs its accepted forms take
  (1 per whole GPU, a MIG profile's compute slices over 7, one vGPU of a
  type 1 / its instances), in :data:`GPU_UNITS` per GPU, plus one unit for
  the request itself and one per device it takes that is worth no GPU
  share (a NIC, an accelerator, a VF), so that such requests are worth
  placing too, the larger more.

Priority weighs, it does not override: a request of rank 2 is worth twice
one of rank 1 as large, and yields to one of rank 1 more than twice its size.
(Strict tiers would need weights that multiply across ranks, past what a
64-bit objective holds for large batches.)

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

from tessera.scheduler.core.host import HostView
from tessera.scheduler.core.mig_geometry import COMPUTE_SLICES
from tessera.scheduler.core.occupancy import Occupancy
from tessera.scheduler.core.request import Claim, DeviceForm, DeviceKind, PlacementRequest
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState

#: A GPU's worth in value units: MIG sevenths times 32, so the smallest MIG
#: profile (32 of 224) and a vGPU of up to 32 per GPU are whole numbers of
#: units (finer vGPU shares round down), and the one unit each request adds
#: for itself stays small beside a GPU. Bench (c), 1,000 requests: with 56
#: units a GPU the capacity bound, which takes the best value per GPU first,
#: sat 1.03% above the batch (small requests' own units counted 1/56 of a
#: GPU each); with 224, 0.79%, for the same placements.
GPU_UNITS = COMPUTE_SLICES * 32

#: The largest total the values may reach. CP-SAT refuses a model whose
#: objective coefficients add up past 2**62, and a request's value is the
#: coefficient of each of its columns: with the default settings at most
#: 6 hosts x (1 + 64 alternatives) + 1 greedy column = 391 of them, so values
#: up to 2**52 keep the sum below 2**61 (quality is added on top).
MAX_TOTAL = 1 << 52

#: A request counts at most this many GPUs (and as many other devices)
#: towards its value: more than a host offers; a request asking more fits
#: nowhere, and must not make the values of the rest of the batch fall back
#: to ranks alone.
MAX_GPUS = 64

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
    """What ``request`` is worth in GPUs: the least share its forms other than a VF take.

    A vGPU VF's share of its GPU is not modelled; a claim that also accepts
    whole GPUs, MIG instances or mdevs is worth the least of those (a
    2-GPU claim that would take VFs too is worth 2 GPUs, not nothing), and
    one that takes only VFs is worth its count in device units (see
    :func:`request_values`). Capped at :data:`MAX_GPUS`.
    """
    worth = sum((_least_gpu_share(c, units, vf=False) for c in request.claims), Fraction(0))
    return min(Fraction(MAX_GPUS), worth)


def gpu_need(request: PlacementRequest, units: GpuUnits) -> Fraction:
    """The least share of GPUs any placement of ``request`` takes (the capacity bound's need).

    As :func:`gpu_equivalents`, but nothing for a claim that accepts a VF:
    its share is not modelled, and a need too small keeps a bound valid
    where one too large would not.
    """
    need = sum((_least_gpu_share(c, units, vf=True) for c in request.claims), Fraction(0))
    return min(Fraction(MAX_GPUS), need)


def _least_gpu_share(claim: Claim, units: GpuUnits, *, vf: bool) -> Fraction:
    if claim.kind is not DeviceKind.GPU:
        return Fraction(0)
    forms = claim.accepted_forms()
    if vf and DeviceForm.VF in forms:
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


def _device_units(request: PlacementRequest) -> int:
    """Devices a request takes that are worth no GPU share: NICs, accelerators, VF-only GPUs."""
    devices = sum(
        c.count
        for c in request.claims
        if c.kind is not DeviceKind.GPU or c.accepted_forms() == {DeviceForm.VF}
    )
    return min(MAX_GPUS, devices)


def _least(a: Fraction | None, b: Fraction) -> Fraction:
    return b if a is None else min(a, b)


def priority_ranks(priorities: Iterable[int]) -> dict[int, int]:
    """Each distinct priority's rank: the lowest 1, the next 2, and so on."""
    return {p: rank for rank, p in enumerate(sorted(set(priorities)), start=1)}


def value_quantum(n_requests: int) -> int:
    """The unit every request value is a multiple of: twice any batch's quality total."""
    return 2 * QUALITY_RANGE * (n_requests + 1)


def request_values(requests: Sequence[PlacementRequest], gpus: Sequence[Fraction]) -> list[int]:
    """Per request, the value of placing it: priority rank times GPU-equivalents, above quality.

    ``gpus`` are the requests' GPU-equivalents (:func:`gpu_equivalents_of`),
    which the caller also reports.

    Each value is a multiple of twice any quality total
    (:func:`value_quantum`), so a solution short of one
    request's worth is further below the optimum than any quality gap the
    solver stops within. Should the values of pathological requests (a
    thousand GPUs each, priorities all distinct) add up past
    :data:`MAX_TOTAL`, sizes are dropped and the ranks alone value requests.
    """
    ranks = priority_ranks(r.priority for r in requests)
    quantum = value_quantum(len(requests))
    sizes = [
        math.floor(g * GPU_UNITS) + 1 + _device_units(r)
        for r, g in zip(requests, gpus, strict=True)
    ]
    values = [quantum * ranks[r.priority] * size for r, size in zip(requests, sizes, strict=True)]
    if sum(values) > MAX_TOTAL:
        values = [quantum * ranks[r.priority] for r in requests]
    return values
