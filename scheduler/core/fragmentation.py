"""How much of a host's free GPU capacity a task mix cannot use (Weng et al., ATC'23).

Fragmentation is not a property of a host alone but of a host *and the work
that will ask for it*: half a GPU left free is no loss while half-GPU tasks
arrive, and all loss when only whole-GPU tasks do. The measure of "Beware of
Fragmentation: Scheduling GPU-Sharing Workloads with Fragmentation Gradient
Descent" (USENIX ATC'23) makes that precise: for a task mix *M* (task shapes
*m* with popularity *p_m*), a host's fragmentation is::

    F_n(M) = sum_m p_m F_n(m)

where ``F_n(m)`` is the free GPU capacity of host *n* that task *m* cannot
use: all of it when *m* cannot go on the host at all, else the free capacity
of the GPUs *m* cannot use. FGD places each task where ``F`` grows least.

Tessera's GPUs are shared by MIG (fixed geometry) or vGPU types (one type per
GPU on time-sliced vGPU), not by arbitrary fractions as in the paper, so
"can *m* use this GPU" is answered by the geometry: a MIG profile with a
placement left, a vGPU type with room, or an untouched GPU. The free share of
a GPU is 1 untouched, 0 passed through or in VF use, ``1 - used compute
slices / 7`` in MIG use and ``1 - the mdevs' shares`` in vGPU use. It is read
once, exactly (:func:`free_capacity`), for this measure and for the batch's
capacity bound alike.

Pure: no store, no network; callers memoise per hardware class and occupancy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from types import MappingProxyType
from typing import NamedTuple

from tessera.scheduler.core.host import HostView, MdevParentView
from tessera.scheduler.core.identity import PciAddress
from tessera.scheduler.core.mig_geometry import COMPUTE_SLICES, capacity, with_instance
from tessera.scheduler.core.occupancy import DeviceMode, Occupancy, mdev_free
from tessera.scheduler.core.request import DeviceForm, DeviceKind, PlacementRequest


@dataclass(frozen=True)
class TaskShape:
    """One kind of GPU task in a mix, as placement sees it.

    Attributes:
        gpus: whole GPUs the task takes (passthrough); 0 for a shared task.
        mig_profiles: a shared task: the MIG profiles (names) it may take.
        mdev_types: a shared task: the vGPU types (ids) it may take.
        models: GPU models the task accepts (``PciFunctionView.model``);
            empty: any.
        cpu_milli: host CPU the task needs beside its GPUs (thousandths).
        memory_mib: host memory the task needs beside its GPUs.
    """

    gpus: int = 0
    mig_profiles: frozenset[str] = frozenset()
    mdev_types: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()
    cpu_milli: int = 0
    memory_mib: int = 0

    def __post_init__(self) -> None:
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, not {self.gpus}")
        if not self.gpus and not (self.mig_profiles or self.mdev_types):
            raise ValueError("a shared task names at least one MIG profile or vGPU type")

    @property
    def shared(self) -> bool:
        """The task takes a slice of one GPU, not whole GPUs."""
        return self.gpus == 0


#: A task mix: shape -> popularity (non-negative; normalised by the measure).
TaskMix = Mapping[TaskShape, float]


@dataclass(frozen=True)
class HostFragmentation:
    """A host's free GPU capacity and the part of it a task mix cannot use.

    Attributes:
        gpus: GPUs on the host.
        free: free capacity, in GPUs.
        fragmented: ``F_n(M)``, in GPUs (at most ``free``).
    """

    gpus: int
    free: float
    fragmented: float


class FreeCapacity(NamedTuple):
    """A host's free GPU capacity, exactly (see :func:`free_capacity`).

    Attributes:
        sevenths: per whole GPU not in vGPU use, its free compute sevenths:
            7 untouched, the free compute slices in MIG use, 0 passed
            through, in VF use, or in MIG use with its instances unknown.
        vgpu: per mdev parent that vGPUs may still use, its free vGPU
            share: a whole GPU in mdev use, or a VF of an SR-IOV vGPU GPU
            that is not itself handed out (see :func:`free_capacity`).
    """

    sevenths: dict[PciAddress, int]
    vgpu: dict[PciAddress, Fraction]


def free_capacity(view: HostView, occupancy: Occupancy) -> FreeCapacity:
    """The free capacity of each GPU of a host, exactly, in integers where it can be.

    What :func:`free_shares` reads per GPU in floats, and what the batch's
    capacity bound sums over the cluster. Every whole GPU is in exactly one
    of the two parts; untouched ones count 7 sevenths, so that summing the
    sevenths of a whole cluster needs no :class:`~fractions.Fraction` per
    host (the capacity bound reads ten thousand hosts per batch).

    An mdev parent that is not a whole GPU (a VF of an SR-IOV vGPU GPU,
    whose PF shows in VF use and so counts nothing) is in ``vgpu`` with its
    own free share unless the VF itself is handed out. The batch's bound
    counts it (more than the physical GPU may hold, which keeps that bound an
    upper one); :func:`free_shares`, per GPU, leaves it out.
    """
    sevenths: dict[PciAddress, int] = {}
    vgpu: dict[PciAddress, Fraction] = {}
    modes = occupancy.modes
    parents = view.mdev_parents
    for fn in view.whole_devices(DeviceKind.GPU):
        address = fn.address
        mode = modes.get(address)
        if mode is None:
            sevenths[address] = COMPUTE_SLICES
        elif mode is DeviceMode.MIG and address in occupancy.mig_layouts:
            used = occupancy.mig_layouts[address].used_compute
            sevenths[address] = max(0, COMPUTE_SLICES - used)
        elif mode is DeviceMode.MDEV and address in parents:
            vgpu[address] = _vgpu_left(parents[address], occupancy)
        else:
            # Passed through, in VF use, or a MIG GPU whose instances
            # overlap (unusable until someone looks): nothing to give.
            sevenths[address] = 0
    for address, parent in parents.items():
        if address in sevenths or address in vgpu:
            continue
        if modes.get(address) in (None, DeviceMode.MDEV):
            vgpu[address] = _vgpu_left(parent, occupancy)
    return FreeCapacity(sevenths, vgpu)


def _vgpu_left(parent: MdevParentView, occupancy: Occupancy) -> Fraction:
    """The share of an mdev parent its live and allocated mdevs leave (at least 0)."""
    used = sum(
        (
            Fraction(n, max(1, parent.types[t].max_instances))
            for t, n in occupancy.mdev_used.get(parent.address, {}).items()
            if t in parent.types
        ),
        Fraction(0),
    )
    return max(Fraction(0), 1 - used)


#: The float share of each count of free sevenths, as ``1 - used / 7``: the
#: float this measure has always read, where ``free / 7`` differs in the last
#: bit for some counts (and hosts' scores are compared, ties broken, by them).
_SHARE_OF_SEVENTHS = tuple(
    1 - (COMPUTE_SLICES - free) / COMPUTE_SLICES for free in range(COMPUTE_SLICES + 1)
)


def free_shares(view: HostView, occupancy: Occupancy) -> dict[PciAddress, float]:
    """Per GPU of the host, the share of it still free (see the module doc)."""
    sevenths, vgpu = free_capacity(view, occupancy)
    if not vgpu:
        # Every GPU is in ``sevenths``, in the host's order.
        return {address: _SHARE_OF_SEVENTHS[n] for address, n in sevenths.items()}
    out: dict[PciAddress, float] = {}
    for fn in view.whole_devices(DeviceKind.GPU):
        address = fn.address
        share = vgpu.get(address)
        out[address] = _SHARE_OF_SEVENTHS[sevenths[address]] if share is None else float(share)
    return out


def usable_by(view: HostView, occupancy: Occupancy, address: PciAddress, shape: TaskShape) -> bool:
    """Whether one GPU can take (a unit of) a task of ``shape`` now."""
    fn = view.functions.get(address)
    if shape.models and (fn is None or fn.model not in shape.models):
        return False
    untouched = address not in occupancy.modes and address not in occupancy.unusable
    if not shape.shared:
        return untouched
    gpu = view.gpus.get(address)
    if gpu is not None and gpu.mig_enabled:
        layout = occupancy.mig_layouts.get(address)
        if layout is None or not shape.mig_profiles:
            return False
        profiles = [p for p in gpu.mig_profiles if p.name in shape.mig_profiles]
        return any(n > 0 for n in capacity(layout, profiles).values())
    parent = view.mdev_parents.get(address)
    if parent is None:
        return False
    used = occupancy.mdev_used.get(address, {})
    pending = occupancy.mdev_pending.get(address, {})
    for type_id in shape.mdev_types:
        if type_id not in parent.types:
            continue
        if untouched or mdev_free(parent, type_id, used, pending) > 0:
            return True
    return False


def host_fragmentation(view: HostView, occupancy: Occupancy, mix: TaskMix) -> HostFragmentation:
    """``F_n(M)`` of one host (see the module doc).

    A task needing more host CPU or memory than the host has left cannot go
    there (the paper's rule for a node short of CPU): all its free capacity
    is lost to it. So is it to a whole-GPU task needing more usable
    untouched GPUs than the host has. Otherwise a task loses the GPUs it
    cannot use (in shared use, or of another model): a shared task the free
    share of each.
    """
    free = free_shares(view, occupancy)
    total_free = sum(free.values())
    weight = sum(p for p in mix.values() if p > 0)
    if not free or total_free <= 0 or weight <= 0:
        return HostFragmentation(len(free), total_free, 0.0)
    cpu_left = view.cpu_milli - occupancy.cpu_used
    memory_left = view.memory_mib - occupancy.memory_used
    fragmented = 0.0
    for shape, p in mix.items():
        if p <= 0:
            continue
        if (shape.cpu_milli and shape.cpu_milli > cpu_left) or (
            shape.memory_mib and shape.memory_mib > memory_left
        ):
            fragmented += p / weight * total_free
            continue
        usable = [a for a, f in free.items() if f > 0 and usable_by(view, occupancy, a, shape)]
        if not shape.shared and len(usable) < shape.gpus:
            lost = total_free
        else:
            kept = set(usable)
            lost = sum(f for a, f in free.items() if a not in kept)
        fragmented += p / weight * lost
    return HostFragmentation(len(free), total_free, fragmented)


# ---------------------------------------------------------------- the mix, learnt


def task_shape(request: PlacementRequest) -> TaskShape | None:
    """The shape of a request as the mix counts it, or None when it is not a GPU task.

    A GPU task is one GPU claim: passthrough only (``gpus`` = its count) or,
    for one unit, shareable (MIG profiles, vGPU types). Anything else (NICs,
    several claims, several shared units) is not a shape of the paper's
    model and is left out of the mix. Its host CPU and memory are counted
    to the nearest step of :func:`share_step` (a mix keeps few shapes).
    """
    if len(request.claims) != 1:
        return None
    claim = request.claims[0]
    if claim.kind is not DeviceKind.GPU or claim.count < 1:
        return None
    forms = claim.accepted_forms()
    models = claim.selector.models
    cpu, memory = share_step(request.cpu_milli), share_step(request.memory_mib)
    if forms == {DeviceForm.WHOLE_DEVICE}:
        return TaskShape(gpus=claim.count, models=models, cpu_milli=cpu, memory_mib=memory)
    if claim.count != 1:
        return None
    profiles = claim.mig_profiles if DeviceForm.MIG in forms else frozenset()
    types = claim.mdev_types if DeviceForm.MDEV in forms else frozenset()
    if not profiles and not types:
        return None
    return TaskShape(
        mig_profiles=frozenset(profiles),
        mdev_types=frozenset(types),
        models=models,
        cpu_milli=cpu,
        memory_mib=memory,
    )


def share_step(amount: int) -> int:
    """``amount`` to the nearest step of a ladder of factor √2 (0 stays 0).

    Tasks ask for every CPU and memory size; a mix of a shape per size
    would be as long as the trace. Steps of √2 keep a few dozen, each within
    19% of what its tasks ask.
    """
    if amount <= 0:
        return 0
    return round(2 ** (round(2 * math.log2(amount)) / 2))


class TaskMixLearner:
    """The recent task mix, learnt from the requests seen (exponentially decayed counts).

    Each request of a GPU shape adds 1 to its shape's count after every
    count decays by ``decay``; a prior (the operator's expectation, or a
    trace's mix) weighs as ``prior_weight`` requests. The mix scorers read is
    *published*: it moves only when the learnt mix has drifted by more than
    ``republish`` (total variation) from the last one published, and each
    publication bumps :attr:`epoch`, so memoised judgements made under the
    old mix can be dropped rather than recomputed at every request.

    Memory is bounded whatever arrives: at most :data:`MAX_SHAPES` shapes are
    kept, the lightest dropped first.

    Args:
        prior: shape -> weight (normalised here); empty: no prior.
        prior_weight: how many requests the prior is worth.
        decay: per request, the factor every count is multiplied by
            (0.999: a half-life of about 700 requests).
        republish: total-variation drift that publishes a new mix.
    """

    #: Most shapes kept (a hostile client may send ever new ones).
    MAX_SHAPES = 64

    def __init__(
        self,
        prior: TaskMix | None = None,
        *,
        prior_weight: float = 200.0,
        decay: float = 0.999,
        republish: float = 0.05,
    ) -> None:
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], not {decay}")
        if prior_weight < 0 or republish < 0:
            raise ValueError("prior_weight and republish must be >= 0")
        self._decay = decay
        self._republish = republish
        self._counts: dict[TaskShape, float] = {}
        total = sum(w for w in (prior or {}).values() if w > 0)
        if total > 0 and prior_weight > 0:
            for shape, w in (prior or {}).items():
                if w > 0:
                    self._counts[shape] = prior_weight * w / total
        self._published: dict[TaskShape, float] = self._normalised()
        self.epoch = 0

    def observe(self, request: PlacementRequest) -> None:
        """Count one request (a no-op for a request that is not a GPU task)."""
        shape = task_shape(request)
        if shape is None:
            return
        if self._decay < 1:
            for key in self._counts:
                self._counts[key] *= self._decay
        self._counts[shape] = self._counts.get(shape, 0.0) + 1.0
        if len(self._counts) > self.MAX_SHAPES:
            del self._counts[min(self._counts, key=self._counts.__getitem__)]
        current = self._normalised()
        keys = current.keys() | self._published.keys()
        drift = sum(abs(current.get(k, 0.0) - self._published.get(k, 0.0)) for k in keys) / 2
        if drift > self._republish or not self._published:
            self._published = current
            self.epoch += 1

    @property
    def mix(self) -> TaskMix:
        """The published mix: shape -> popularity, summing to 1 (empty before any)."""
        return self._published

    def _normalised(self) -> dict[TaskShape, float]:
        total = sum(self._counts.values())
        if total <= 0:
            return {}
        return {k: v / total for k, v in self._counts.items()}


# ---------------------------------------------------------------- what a plan leaves


def occupancy_after(
    view: HostView,
    occupancy: Occupancy,
    picks: Sequence[tuple[DeviceForm, PciAddress, str, int]],
    share: tuple[int, int] = (0, 0),
) -> Occupancy:
    """The host's occupancy once ``picks`` are taken, as far as :func:`host_fragmentation` reads it.

    ``share`` is the host CPU (thousandths) and memory (MiB) taken with them.

    Each pick is ``(form, device, variant, mig_start)``: a whole device puts every endpoint of
    its IOMMU group in whole use, a VF its device in VF use; an mdev adds one of its type (the
    variant) on its parent; a MIG instance of the profile named by the variant goes at
    ``mig_start``. Tenancy, groups and VF indexes are left as they were: the measure does not
    read them.
    """
    modes = dict(occupancy.modes)
    layouts = dict(occupancy.mig_layouts)
    used = {a: dict(c) for a, c in occupancy.mdev_used.items()}
    for form, address, variant, start in picks:
        if form is DeviceForm.WHOLE_DEVICE:
            # Passthrough takes the whole IOMMU group: every endpoint in it
            # goes out of use with the device picked.
            fn = view.functions.get(address)
            group = fn.iommu_group if fn is not None else None
            members = view.group_endpoints(group) if group is not None else ()
            for member in members or (address,):
                modes[member] = DeviceMode.WHOLE
        elif form is DeviceForm.VF:
            modes.setdefault(address, DeviceMode.VF)
        elif form is DeviceForm.MDEV:
            modes.setdefault(address, DeviceMode.MDEV)
            counts = used.setdefault(address, {})
            counts[variant] = counts.get(variant, 0) + 1
        elif form is DeviceForm.MIG:
            modes.setdefault(address, DeviceMode.MIG)
            gpu = view.gpus.get(address)
            layout = layouts.get(address)
            profiles = gpu.mig_profiles if gpu is not None else ()
            profile = next((p for p in profiles if p.name == variant), None)
            if layout is not None and profile is not None:
                layouts[address] = with_instance(layout, profile, start)
    return replace(
        occupancy,
        modes=MappingProxyType(modes),
        mig_layouts=MappingProxyType(layouts),
        mdev_used=MappingProxyType(used),
        cpu_used=occupancy.cpu_used + share[0],
        memory_used=occupancy.memory_used + share[1],
    )
