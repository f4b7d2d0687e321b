"""Free GPU capacity a placement strands under the task mix: the measure Tessera packs by.

FGD's measure (:mod:`scheduler.core.fragmentation`) is the loss expected
should the *next* task be drawn from the mix. Filling the Alibaba 2023 trace
on MIG and vGPU geometry (bench (h), BENCHMARKS.md) showed three places where
that one-step view misleads:

* a hole that tasks of the placing task's own kind fill heals itself (the
  next three quarter-GPU vGPUs fill the GPU the first one opened), yet it
  counts as lost to every other shape of the mix;
* a 2-slice MIG instance in a 3-slice hole shrinks the hole, so it scores
  well, but the one slice it leaves serves only 1-slice tasks, under 1% of
  the trace: such slices were most of what stayed free at the end;
* a whole-GPU task may take a vGPU GPU, the one geometry on which half- and
  quarter-GPU tasks waste nothing, while a MIG GPU would have served it as
  well.

So the measure reads, in GPUs:

* **stranded** (:func:`stranded_share`): free share on GPUs that the shapes
  able to use it, among those the host still has CPU and memory for, make
  up less than a floor of the mix;
* **unfillable hole** (:func:`unfillable_hole`): the hole a shared task
  leaves on its GPU, for the part by which the shapes that can still use
  that hole fall short of the placing shape's own popularity;
* **gangs lost** (:func:`gangs_lost`): FGD's host-level term, for whole
  multi-GPU shapes only: the host's free share, for the shapes it no longer
  has enough untouched GPUs for;
* **geometry spent** (:func:`geometry_value`): how much of the mix an
  untouched GPU serves at the least share that shape can take anywhere,
  charged when a whole-device placement takes it;
* **rare hole closed** (:func:`rare_hole_closed`), a credit: the share a
  shared unit fills of a hole on a partly used GPU that few shapes of the
  mix can use. The unfillable hole charges the placement that opens such a
  hole; nothing sent the few tasks that fit it there rather than onto a
  vGPU GPU of their own type. Filling the trace's multigpu50 list, 4-slice
  instances left 3-slice holes on 23 H100s (0.63% of the GPUs at 100%
  arrived, one seed) while 20 tasks a 3-slice hole takes went elsewhere;
* **short of CPU or memory** (:func:`cpu_memory_shortfall`): the free share
  the host's CPU and memory left cannot serve at the rate the mix asks per
  GPU (:func:`demand_per_gpu`). The stranded share sees a host's CPU only
  once no shape fits it any more; by then the placements that ran it down
  are made. Filling the trace, whole GPUs on hosts with too little CPU left
  for any task were most of what packing left free on gpushare100 (0.83
  of 1.25% at 100% arrived, one seed) before this charge.

The scorer (:class:`scheduler.core.engine.plugins.PackingScorer`) weighs
them with the capacity a placement consumes. Pure: no store, no network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tessera.scheduler.core.fragmentation import TaskMix, TaskShape, free_shares, usable_by
from tessera.scheduler.core.host import HostView
from tessera.scheduler.core.identity import PciAddress
from tessera.scheduler.core.mig_geometry import COMPUTE_SLICES
from tessera.scheduler.core.occupancy import Occupancy


def geometry_of(shape: TaskShape) -> TaskShape:
    """A shape's GPU geometry alone: its host CPU and memory dropped."""
    return TaskShape(
        gpus=shape.gpus,
        mig_profiles=shape.mig_profiles,
        mdev_types=shape.mdev_types,
        models=shape.models,
    )


def geometry_mix(mix: TaskMix) -> dict[TaskShape, float]:
    """The mix by GPU geometry: shapes that differ in CPU and memory only merged, normalised."""
    out: dict[TaskShape, float] = {}
    for shape, p in mix.items():
        if p > 0:
            key = geometry_of(shape)
            out[key] = out.get(key, 0.0) + p
    total = sum(out.values())
    return {k: v / total for k, v in out.items()} if total > 0 else {}


def _untouched(free: Mapping[PciAddress, float], occupancy: Occupancy) -> list[PciAddress]:
    return [
        a
        for a, f in free.items()
        if f > 0 and a not in occupancy.modes and a not in occupancy.unusable
    ]


def _gang_fits(
    view: HostView, occupancy: Occupancy, untouched: Sequence[PciAddress], shape: TaskShape
) -> bool:
    """Whether enough untouched GPUs a whole shape can use are left together (of its models)."""
    return sum(1 for a in untouched if usable_by(view, occupancy, a, shape)) >= shape.gpus


def stranded_share(
    view: HostView,
    occupancy: Occupancy,
    mix: TaskMix,
    floor: float,
    *,
    free: Mapping[PciAddress, float] | None = None,
) -> float:
    """Free share, in GPUs, on the host's GPUs that less than ``floor`` of the mix can use.

    A shape can use a GPU when the host has its CPU and memory left and the
    GPU can take a unit of it now (a whole shape: an untouched GPU on a host
    with enough of them). A host none of the mix fits for CPU or memory
    strands all its free share. ``free`` is :func:`free_shares` of the host,
    when the caller has it.
    """
    if free is None:
        free = free_shares(view, occupancy)
    weight = sum(p for p in mix.values() if p > 0)
    if not free or weight <= 0:
        return 0.0
    cpu_left = view.cpu_milli - occupancy.cpu_used
    memory_left = view.memory_mib - occupancy.memory_used
    fitting = [
        (shape, p / weight)
        for shape, p in mix.items()
        if p > 0
        and not (shape.cpu_milli and shape.cpu_milli > cpu_left)
        and not (shape.memory_mib and shape.memory_mib > memory_left)
    ]
    untouched = _untouched(free, occupancy)
    together = {
        shape: _gang_fits(view, occupancy, untouched, shape)
        for shape, _ in fitting
        if not shape.shared
    }
    stranded = 0.0
    for address, share in free.items():
        if share <= 0:
            continue
        users = 0.0
        for shape, p in fitting:
            placeable = shape.shared or (address in untouched and together[shape])
            if placeable and usable_by(view, occupancy, address, shape):
                users += p
                if users >= floor:
                    break
        if users < floor:
            stranded += share
    return stranded


def gangs_lost(
    view: HostView,
    occupancy: Occupancy,
    mix: TaskMix,
    *,
    free: Mapping[PciAddress, float] | None = None,
) -> float:
    """The host's free share, in GPUs, times the popularity of the multi-GPU shapes it cannot take.

    FGD's host-level loss restricted to whole shapes of more than one GPU:
    a host keeps its worth to them only while enough of its GPUs are
    untouched together. (CPU and memory are left to :func:`stranded_share`:
    charging each shape a host falls short of, as FGD does, spread tasks
    over the trace's hosts and stranded more.) ``free`` is
    :func:`free_shares` of the host, when the caller has it.
    """
    if free is None:
        free = free_shares(view, occupancy)
    total = sum(free.values())
    weight = sum(p for p in mix.values() if p > 0)
    if total <= 0 or weight <= 0:
        return 0.0
    untouched: list[PciAddress] | None = None
    lost = 0.0
    for shape, p in mix.items():
        if p <= 0 or shape.shared or shape.gpus < 2:
            continue
        if untouched is None:
            untouched = _untouched(free, occupancy)
        if not _gang_fits(view, occupancy, untouched, shape):
            lost += p
    return lost / weight * total


def unfillable_hole(
    view: HostView,
    after: Occupancy,
    address: PciAddress,
    me: TaskShape,
    geometry: Mapping[TaskShape, float],
    *,
    free_after: Mapping[PciAddress, float] | None = None,
) -> float:
    """The hole a shared task of geometry ``me`` leaves on its GPU, for what will not fill it.

    ``after`` is the host's occupancy with the task placed, ``geometry`` the
    mix by geometry (:func:`geometry_mix`), ``free_after`` :func:`free_shares`
    of ``after`` when the caller has it. The hole counts in full when
    nothing else can use it, not at all when the shapes that can (``me``
    itself on a vGPU GPU of its type) are at least as popular as ``me``:
    holes are opened as often as ``me`` arrives and closed as often as
    those shapes do.
    """
    if free_after is None:
        free_after = free_shares(view, after)
    hole = free_after.get(address, 0.0)
    if hole <= 0:
        return 0.0
    mine = geometry.get(me, 0.0)
    fillers = sum(
        p
        for shape, p in geometry.items()
        if shape.shared and usable_by(view, after, address, shape)
    )
    if mine <= 0:
        # A shape the published mix does not have yet (or no longer): rarer
        # than anything, so any filler outnumbers it; and it fills what it
        # leaves on a vGPU GPU of its type as a shape of the mix does.
        return 0.0 if fillers > 0 or usable_by(view, after, address, me) else hole
    return hole * max(0.0, 1.0 - fillers / mine)


def least_share(view: HostView, address: PciAddress, shape: TaskShape) -> float | None:
    """The least share of GPU ``address`` a unit of shared ``shape`` takes there, or None.

    Its smallest MIG profile among the GPU's (compute slices of 7), or its
    smallest vGPU type the GPU offers (one instance of the type's maximum);
    None when the shape names models and this GPU is of none of them.
    """
    if shape.models:
        fn = view.functions.get(address)
        if fn is None or fn.model not in shape.models:
            return None
    least: float | None = None
    gpu = view.gpus.get(address)
    if gpu is not None and gpu.mig_enabled and shape.mig_profiles:
        for profile in gpu.mig_profiles:
            if profile.name in shape.mig_profiles:
                share = profile.slices / COMPUTE_SLICES
                least = share if least is None else min(least, share)
    parent = view.mdev_parents.get(address)
    if parent is not None:
        for type_id in shape.mdev_types:
            offered = parent.types.get(type_id)
            if offered is not None:
                share = 1 / max(1, offered.max_instances)
                least = share if least is None else min(least, share)
    return least


def geometry_value(
    view: HostView,
    address: PciAddress,
    geometry: Mapping[TaskShape, float],
    least: dict[TaskShape, float],
) -> float:
    """The popularity of the shared shapes an untouched GPU serves at their least share.

    ``least`` is the least share each shape was seen to take anywhere; it is
    updated here with this GPU's. A whole-device placement that takes the
    GPU spends that much of the mix's best geometry.
    """
    value = 0.0
    for shape, p in geometry.items():
        if not shape.shared:
            continue
        share = least_share(view, address, shape)
        if share is None:
            continue
        best = least.get(shape)
        if best is None or share < best:
            least[shape] = best = share
        if share <= best + 1e-9:
            value += p
    return value


def demand_per_gpu(mix: TaskMix, least: Mapping[TaskShape, float]) -> tuple[float, float]:
    """Host CPU (thousandths) and memory (MiB) the mix asks per GPU of capacity it takes.

    A whole shape takes its GPUs; a shared one the least share its geometry
    (:func:`geometry_of`) was seen to take anywhere (``least``, as
    :func:`geometry_value` learns it). A shared shape whose least share is
    not known yet is left out of both sums. (0, 0) when nothing is known,
    or the mix asks no CPU and memory: then nothing is short.
    """
    cpu = memory = gpus = 0.0
    for shape, p in mix.items():
        if p <= 0:
            continue
        share = float(shape.gpus) if not shape.shared else least.get(geometry_of(shape))
        if share is None or share <= 0:
            continue
        cpu += p * shape.cpu_milli
        memory += p * shape.memory_mib
        gpus += p * share
    if gpus <= 0:
        return 0.0, 0.0
    return cpu / gpus, memory / gpus


def cpu_memory_shortfall(
    view: HostView, occupancy: Occupancy, free: float, per_gpu: tuple[float, float]
) -> float:
    """The part of a host's free GPU share, in GPUs, that its CPU or memory left cannot serve.

    ``free`` is the host's free GPU share (:func:`free_shares`, summed) and
    ``per_gpu`` the CPU and memory the mix asks per GPU taken
    (:func:`demand_per_gpu`). Serving ``free`` GPUs takes ``free`` times
    each rate; the share of that the host lacks, of CPU or of memory
    whichever is shorter, is the share of its free GPUs expected to stay
    free for want of it. Smooth where :func:`stranded_share` is a cliff: a
    placement that eats a host's CPU faster than its GPUs is charged as it
    does so, one that eats little CPU on a CPU-poor host is credited.
    """
    if free <= 0:
        return 0.0
    short = 0.0
    for have, rate in (
        (view.cpu_milli - occupancy.cpu_used, per_gpu[0]),
        (view.memory_mib - occupancy.memory_used, per_gpu[1]),
    ):
        if rate > 0:
            short = max(short, 1.0 - max(0, have) / (free * rate))
    return free * short


def rare_hole_closed(
    view: HostView,
    before: Occupancy,
    address: PciAddress,
    geometry: Mapping[TaskShape, float],
    rare: float,
    *,
    free_before: Mapping[PciAddress, float],
    free_after: Mapping[PciAddress, float],
) -> float:
    """The share of GPU ``address``'s hole a shared placement fills, weighted by the hole's rarity.

    A hole is the free share of a GPU already partly used (an untouched GPU
    is not one). The shared shapes of ``geometry`` (:func:`geometry_mix`)
    able to use it before the placement make up ``u`` of the mix; below
    ``rare`` it is filled seldom, and each share of it a placement fills
    counts ``1 - u / rare``. ``free_before`` and ``free_after`` are
    :func:`free_shares` of the host before and after the placement.
    """
    hole = free_before.get(address, 0.0)
    filled = hole - free_after.get(address, 0.0)
    if hole <= 0 or hole >= 1 or filled <= 0 or rare <= 0:
        return 0.0
    users = 0.0
    for shape, p in geometry.items():
        if shape.shared and usable_by(view, before, address, shape):
            users += p
            if users >= rare:
                return 0.0
    return filled * (1.0 - users / rare)
