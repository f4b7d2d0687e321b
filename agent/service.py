"""The Agent gRPC service: carries placements out on this host.

Thin over the actuation layer: it checks that the placement matches the host
as discovered now (the agent never touches a device it was not told to, nor
one outside the operator's allow-list (:mod:`agent.allowlist`), and never a
group whose membership differs from what the scheduler saw), records
each host operation in the checkpoint before and after doing it, and answers
with the handles. A Prepare that fails half way undoes its own steps, in
reverse, before it answers; a crash half way is undone by :meth:`recover`.

Per slot kind (``placement.proto``):

* ``whole_device``: bind the IOMMU group's endpoints to vfio-pci.
* ``vf``: enable the PF's VFs if it has none (autoprobe off first), then bind
  the VF's own group to the placement's VFIO driver.
* ``mdev``: create the mdev (or adopt it when it exists with that type).
* ``mig``: create the GPU instance at exactly the placement and one compute
  instance using all of it.

Unprepare undoes the steps in reverse. A device leaving the VFIO driver is
reset (when it has a reset method) before its host driver takes it back; a
failed reset fails the Unprepare and keeps the entry, so it is retried.
Objects the agent created are tracked in the checkpoint's ledger until
destroyed, and :meth:`AgentServicer.recover` removes those no placement holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from tessera.agent.actuation import ActuationError
from tessera.agent.actuation.mdev import MdevActuationError, MdevManager
from tessera.agent.actuation.mig import MigActuationError, MigPartitioner
from tessera.agent.actuation.sriov import SriovActuationError, SriovConfigurator
from tessera.agent.actuation.steps import (
    MdevCreate,
    MigCreate,
    SriovEnable,
    Step,
    StepRecord,
    StepState,
    VfioBind,
)
from tessera.agent.actuation.vfio import BindingRecord, VfioActuationError, VfioBinder
from tessera.agent.allowlist import AllowList
from tessera.agent.checkpoint import Checkpoint, CheckpointEntry
from tessera.agent.locks import (
    LockSet,
    ResourceLocks,
    device_key,
    group_key,
    mdev_key,
    placement_key,
    vf_slot_key,
)
from tessera.agent.nvml import (
    GpuInstance,
    MigPlacement,
    NullNvmlClient,
    NvmlError,
    NvmlGpu,
    NvmlMigClient,
)
from tessera.agent.probes.host_use import host_use
from tessera.agent.probes.pci import PciAddress, PciFunction, is_pci_address, read_function
from tessera.agent.probes.vfio import VFIO_PCI, is_vfio_driver
from tessera.agent.reporter import HostReporter
from tessera.agent.sysfs import Sysfs
from tessera.v1 import agent_pb2, agent_pb2_grpc, placement_pb2

log = logging.getLogger(__name__)

_T = TypeVar("_T")

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

#: An mdev UUID as ``mdev_uuid_store`` accepts it (the kernel lower-cases it).
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


class InvalidPlacementError(Exception):
    """The placement is malformed, whatever the host (INVALID_ARGUMENT)."""


class StaleFenceError(Exception):
    """A scheduler background job of an older term called (FAILED_PRECONDITION)."""


#: How far above the newest token the scheduler reported (Register and
#: Heartbeat answers) a fencing token may be: a few leadership changes between
#: two heartbeats. Anything beyond is not a term the scheduler issued;
#: persisting it would lock every later term out.
FENCE_STEP = 16


class PlacementMismatchError(Exception):
    """The placement does not match the host (FAILED_PRECONDITION)."""


class _RelockError(Exception):
    """A check found the operation needs more locks than it holds; nothing was written.

    Attributes:
        locks: what it needs besides.
    """

    def __init__(self, locks: LockSet) -> None:
        super().__init__(f"needs {locks}")
        self.locks = locks


#: Relock attempts before an operation takes the whole host instead.
_RELOCK_ATTEMPTS = 3


class RolledBackError(Exception):
    """A Prepare failed after host writes; its own writes were undone first.

    Attributes:
        cause: the failure.
        rollback_failure: when undoing failed too (the entry is kept for
            :meth:`AgentServicer.recover`), that failure.
    """

    def __init__(self, cause: Exception, rollback_failure: Exception | None = None) -> None:
        text = f"{cause} (rolled back)"
        if rollback_failure is not None:
            text = f"{cause}; rollback failed, retried at the next start: {rollback_failure}"
        super().__init__(text)
        self.cause = cause
        self.rollback_failure = rollback_failure


# -- validation (no host access) -------------------------------------------------


def _devices(placement: placement_pb2.Placement) -> list[str]:
    """What each allocation hands the tenant, in a few words (for the log)."""
    out: list[str] = []
    for alloc in placement.allocations:
        kind = alloc.WhichOneof("slot")
        if kind == "whole_device":
            out.append(alloc.whole_device.address)
        elif kind == "vf":
            vf = alloc.vf
            out.append(vf.vf_address or f"{vf.pf_address} VF {vf.vf_index}")
        elif kind == "mdev":
            out.append(f"{alloc.mdev.parent_address} mdev {alloc.mdev.uuid}")
        elif kind == "mig":
            mig = alloc.mig
            words = (mig.gpu_address, "MIG", mig.profile_name, mig.mig_uuid)
            out.append(" ".join(w for w in words if w))
    return out


def _log_done(what: str, state: str, placement: placement_pb2.Placement) -> None:
    """One INFO line per placement prepared or torn down on this host (never per retry).

    Args:
        what: what was done, as the message says it.
        state: the same as the ``state`` field (``prepared``, ``torn-down``).
        placement: the placement, as answered or as checkpointed.
    """
    devices = _devices(placement)
    extra: dict[str, object] = {
        name: value
        for name, value in (
            ("placement", placement.placement_id),
            ("tenant", placement.tenant),
            ("host", placement.host_id),
        )
        if value
    }
    log.info(
        "%s placement %s: %s",
        what, placement.placement_id, ", ".join(devices) or "no devices",
        extra={**extra, "state": state, "devices": devices},
    )  # fmt: skip


def _validate(placement: placement_pb2.Placement) -> None:
    """Check what needs no host: required fields and their forms.

    Raises:
        InvalidPlacementError: naming the field.
    """
    seen: dict[str, str] = {}

    def once(what: str, where: str) -> None:
        # Two allocations of one placement holding one device would hand
        # one tenant the same thing twice and undo it twice.
        if what in seen:
            raise InvalidPlacementError(f"{where}: {what} is also in {seen[what]}")
        seen[what] = where

    def address(value: str, where: str) -> None:
        if not is_pci_address(value):
            raise InvalidPlacementError(f"{where}: {value!r} is not a PCI address")

    for i, alloc in enumerate(placement.allocations):
        at = f"allocations[{i}]"
        kind = alloc.WhichOneof("slot")
        if kind is None:
            raise InvalidPlacementError(f"{at}: no slot (whole_device, vf, mdev or mig) is set")
        if kind == "whole_device":
            address(alloc.whole_device.address, f"{at}.whole_device.address")
            once(alloc.whole_device.address, f"{at}.whole_device.address")
        elif kind == "vf":
            vf = alloc.vf
            address(vf.pf_address, f"{at}.vf.pf_address")
            if vf.vf_address:
                address(vf.vf_address, f"{at}.vf.vf_address")
            if vf.num_vfs == 0:
                raise InvalidPlacementError(f"{at}.vf.num_vfs: at least 1 is required")
            if vf.vf_index >= vf.num_vfs:
                raise InvalidPlacementError(
                    f"{at}.vf.vf_index: {vf.vf_index} is not below num_vfs {vf.num_vfs}"
                )
            if vf.vfio_driver and not is_vfio_driver(vf.vfio_driver):
                raise InvalidPlacementError(
                    f"{at}.vf.vfio_driver: {vf.vfio_driver!r} is not vfio-pci or a VFIO "
                    "variant driver"
                )
            once(f"VF {vf.vf_index} of {vf.pf_address}", f"{at}.vf")
        elif kind == "mdev":
            mdev = alloc.mdev
            address(mdev.parent_address, f"{at}.mdev.parent_address")
            if not mdev.type_id:
                raise InvalidPlacementError(f"{at}.mdev.type_id: required")
            if not mdev.uuid:
                raise InvalidPlacementError(f"{at}.mdev.uuid: required")
            if not _UUID.match(mdev.uuid):
                raise InvalidPlacementError(f"{at}.mdev.uuid: {mdev.uuid!r} is not a UUID")
            once(f"mdev {mdev.uuid.lower()}", f"{at}.mdev.uuid")
        else:
            mig = alloc.mig
            address(mig.gpu_address, f"{at}.mig.gpu_address")
            if not mig.HasField("placement") or mig.placement.size == 0:
                raise InvalidPlacementError(f"{at}.mig.placement: a size of 1 or more is required")


# -- what one Prepare found on the host, before any write -------------------------


@dataclass(frozen=True)
class _WholeDevicePlan:
    where: str
    address: str
    group: int
    endpoints: tuple[str, ...]


@dataclass(frozen=True)
class _VfPlan:
    where: str
    pf: str
    vf_index: int
    num_vfs: int
    driver: str
    #: The agent enables the PF's VFs (it has none, or has the ones an
    #: earlier attempt of this placement enabled).
    enable: bool
    #: The address the placement expects; empty when it left it to the agent.
    expected: str


@dataclass(frozen=True)
class _MdevPlan:
    where: str
    parent: str
    type_id: str
    uuid: str
    #: The agent creates it (or created it in an earlier attempt).
    created: bool


@dataclass(frozen=True)
class _MigPlan:
    where: str
    gpu: NvmlGpu
    address: str
    profile_id: int
    placement: MigPlacement
    #: The GPU instance an earlier attempt of this placement created.
    adopt: GpuInstance | None


_Plan = _WholeDevicePlan | _VfPlan | _MdevPlan | _MigPlan


@dataclass(frozen=True)
class _Held:
    """What the other placements in the checkpoint hold, by owner."""

    devices: dict[str, str]
    vf_pfs: dict[str, str]
    mdevs: dict[str, str]
    migs: tuple[tuple[MigCreate, str], ...]


def _records(entry: CheckpointEntry) -> list[StepRecord]:
    """An entry's step records; an entry from before step records is one bind."""
    if entry.steps:
        return [StepRecord.from_dict(s) for s in entry.steps]
    if entry.bindings:
        bindings = tuple(BindingRecord.from_dict(b) for b in entry.bindings)
        state: StepState = "done" if entry.state == "prepared" else "started"
        return [StepRecord(VfioBind(bindings), state)]
    return []


def _creates(step: Step) -> bool:
    """Whether the step creates a host object the ledger tracks."""
    if isinstance(step, MdevCreate):
        return step.created
    return isinstance(step, SriovEnable | MigCreate)


def _record_locks(records: Iterable[StepRecord]) -> LockSet:
    """What undoing (or redoing) step records touches.

    Disabling a PF's VFs (an :class:`SriovEnable` undone) needs the PF
    exclusive; a VF's bind needs it shared, so that its VFs stay.
    """
    locks = LockSet()
    for record in records:
        step = record.step
        if isinstance(step, VfioBind):
            locks.exclusive(*(device_key(b.address) for b in step.bindings))
            if step.pf is not None:
                locks.shared(device_key(step.pf))
        elif isinstance(step, SriovEnable):
            locks.exclusive(device_key(step.pf))
        elif isinstance(step, MdevCreate):
            locks.exclusive(device_key(step.parent), mdev_key(step.uuid))
        else:
            locks.exclusive(device_key(step.gpu_address))
    return locks


class _Journal:
    """One placement's checkpoint entry while it is prepared, a step at a time.

    Records of an earlier attempt of the same placement (a ``started`` entry)
    stay in the entry until a step of this attempt takes them over, so that
    a crash now still knows everything that was done.
    """

    def __init__(
        self, checkpoint: Checkpoint, placement: placement_pb2.Placement, prior: list[StepRecord]
    ) -> None:
        self._checkpoint = checkpoint
        self._id = placement.placement_id
        self._request = placement.SerializeToString()
        self.leftover = list(prior)
        self.records: list[StepRecord] = []

    def prior(self, key: str) -> Step | None:
        """Take over an earlier attempt's record of the step acting on ``key``."""
        for record in self.leftover:
            if record.step.key == key:
                self.leftover.remove(record)
                return record.step
        return None

    def all(self) -> list[StepRecord]:
        """Every record in the order it is undone backwards."""
        return self.leftover + self.records

    def _put(
        self,
        state: str = "started",
        placement: bytes | None = None,
        *,
        created: Step | None = None,
        forget: str | None = None,
    ) -> None:
        # A created object enters the ledger (see agent.checkpoint) in the
        # same write as its started step: before the host write creating it.
        remember = (
            {created.key: StepRecord(created).to_dict()}
            if created is not None and _creates(created)
            else None
        )
        self._checkpoint.put(
            CheckpointEntry(
                self._id,
                "prepared" if state == "prepared" else "started",
                (),
                placement if placement is not None else self._request,
                tuple(r.to_dict() for r in self.all()),
            ),
            remember=remember,
            forget=forget,
        )

    def start(self) -> None:
        """Record intent before the first write."""
        self._put()

    def begin(self, step: Step) -> None:
        """Record a step as started, before its first host write."""
        self.records.append(StepRecord(step))
        self._put(created=step)

    def update(self, step: Step) -> None:
        """Record what a started step learned (a GPU-instance id)."""
        self.records[-1] = StepRecord(step)
        self._put(created=step)

    def done(self, step: Step) -> None:
        """Record a step as done, after its last host write."""
        self.records[-1] = StepRecord(step, "done")
        self._put()

    def drop(self) -> None:
        """Forget the started step: its only operation failed, so nothing was done.

        Undoing it would act on whatever is there now, which is not ours
        (the mdev UUID another created, the partition another holds).
        """
        # Out of the ledger with it: the next start must never destroy it.
        step = self.records.pop().step
        self._put(forget=step.key)

    def prepared(self, result: placement_pb2.Placement) -> None:
        """Mark the entry prepared, with the placement as answered."""
        self._put("prepared", result.SerializeToString())


class AgentServicer(agent_pb2_grpc.AgentServicer):
    """Prepare, Unprepare and GetState on one host.

    Args:
        sysfs: the host's sysfs (real or fake root).
        reporter: discovers the host.
        checkpoint: the on-disk record of prepared placements.
        on_change: called after the host changed, to report it early.
        nvml: NVML, for MIG slots; without it (the default) they are refused.
        allow: the operator's allow-list; a placement touching a function
            outside it is refused. Default: :meth:`AllowList.default`.
    """

    def __init__(
        self,
        sysfs: Sysfs,
        reporter: HostReporter,
        checkpoint: Checkpoint,
        *,
        on_change: Callable[[], None] = lambda: None,
        nvml: NvmlMigClient | None = None,
        allow: AllowList | None = None,
    ) -> None:
        self._sysfs = sysfs
        self._allow = allow if allow is not None else AllowList.default()
        self._binder = VfioBinder(sysfs)
        self._sriov = SriovConfigurator(sysfs)
        self._mdev = MdevManager(sysfs)
        self._nvml: NvmlMigClient = nvml if nvml is not None else NullNvmlClient("not configured")
        self._mig = MigPartitioner(self._nvml)
        self._reporter = reporter
        self._checkpoint = checkpoint
        self._on_change = on_change
        # Host operations touching the same device, group, VF, mdev or
        # placement run one at a time (an unbind must not race a
        # drivers_probe on a group member; sriov_numvfs changes only while
        # no operation uses a VF of the PF); others run side by side. See
        # agent.locks. Taken inside the worker thread: when a caller's
        # deadline cancels the RPC, the thread goes on, and so must the locks,
        # or an Unprepare could run beside the Prepare it is meant to undo.
        self._locks = ResourceLocks()
        # The fence check and raise are one step for every caller.
        self._fence_lock = threading.Lock()
        # The newest fencing token the scheduler reported (Register and
        # Heartbeat answers): tokens far above it are refused, not persisted.
        self._reported_fence = 0

    # -- undoing ---------------------------------------------------------------

    def _undo(self, record: StepRecord, owner: str, *, releasing: bool) -> None:
        """Undo one step, done or half done. Idempotent.

        Args:
            record: the step.
            owner: the placement whose step it is.
            releasing: an Unprepare of a prepared placement (not a rollback):
                devices leaving VFIO are reset, and an adopted mdev goes too,
                since the placement held it.

        Raises:
            ActuationError: a host write failed.
        """
        step = record.step
        if isinstance(step, VfioBind):
            # A tenant had the devices only when releasing: reset them then.
            self._binder.restore(step.bindings, reset=releasing)
        elif isinstance(step, SriovEnable):
            self._undo_sriov(step, owner)
        elif isinstance(step, MdevCreate):
            if step.created or releasing:
                self._mdev.remove(step.uuid)
                self._checkpoint.forget(step.key)
        else:
            self._mig.destroy(
                step.gpu_uuid,
                step.gpu_address,
                step.profile_id,
                MigPlacement(step.start, step.size),
                step.gi_id,
            )
            self._checkpoint.forget(step.key)

    def _undo_sriov(self, step: SriovEnable, owner: str) -> None:
        """Disable the VFs the agent enabled, unless another placement still holds one.

        Then the record moves to that placement, so whoever releases the
        PF's last VF disables them. The caller holds the PF exclusive (see
        :func:`_record_locks`), so no operation on a VF of it runs meanwhile:
        the entries read here are the PF's VF holders, and none is being
        written.
        """
        for pid, entry in sorted(self._checkpoint.entries().items()):
            if pid == owner:
                continue
            records = _records(entry)
            if not any(isinstance(r.step, VfioBind) and r.step.pf == step.pf for r in records):
                continue
            if not any(r.step == step for r in records):
                # First, so that it is undone after that placement's VF.
                moved = (StepRecord(step, "done").to_dict(), *(r.to_dict() for r in records))
                self._checkpoint.put(replace(entry, bindings=(), steps=moved))
            log.info("VFs of %s stay enabled for placement %s", step.pf, pid)
            return
        self._sriov.disable(step.pf, step.original_autoprobe)
        self._checkpoint.forget(step.key)

    def _undo_all(self, records: Sequence[StepRecord], owner: str, *, releasing: bool) -> None:
        """Undo steps in reverse; stops at the first failure (the rest stay recorded)."""
        for record in reversed(records):
            self._undo(record, owner, releasing=releasing)

    def recover(self) -> None:
        """Roll back placements a crash left half done, then remove orphans.

        Every step recorded in a ``started`` entry is undone in reverse,
        whether it completed or not; ``prepared`` placements are kept. One
        entry that cannot be rolled back is logged and kept for the next
        start; it does not stop the others nor the agent. Then every object
        the ledger says the agent created and no entry holds is destroyed
        (:meth:`_reconcile_locked`).
        """
        with self._locks.host():
            for pid in sorted(self._checkpoint.entries()):
                # Read afresh: undoing one entry may hand its SR-IOV record
                # to another.
                entry = self._checkpoint.get(pid)
                if entry is None or entry.state != "started":
                    continue
                log.warning("rolling back half-done placement %s", entry.placement_id)
                try:
                    self._undo_all(_records(entry), entry.placement_id, releasing=False)
                except ActuationError as err:
                    log.error("cannot roll back %s yet: %s", entry.placement_id, err)
                    continue
                self._checkpoint.remove(entry.placement_id)
            self._reconcile_locked()

    def _reconcile_locked(self) -> None:
        """Destroy what the agent created that no placement holds any more.

        The ledger (see :mod:`agent.checkpoint`) lists every object the agent
        created and has not destroyed; one that no entry's step owns is an
        orphan. Objects the agent did not create are not in it, whatever
        they are. A failure is logged and the object kept for the next start.
        """
        owned = {
            record.step.key
            for entry in self._checkpoint.entries().values()
            for record in _records(entry)
        }
        for key, data in sorted(self._checkpoint.created().items()):
            if key in owned:
                continue
            try:
                step = StepRecord.from_dict(data).step
            except ValueError as err:
                log.error("ledger entry %s unreadable, kept: %s", key, err)
                continue
            log.warning("removing %s: created by this agent, held by no placement", key)
            try:
                # releasing: an orphan mdev in the ledger was created by the agent.
                self._undo(StepRecord(step, "done"), "", releasing=True)
            except ActuationError as err:
                log.error("cannot remove orphan %s yet: %s", key, err)
                continue
            self._checkpoint.forget(key)

    # -- checking (reads only) ---------------------------------------------------

    def _held_elsewhere(self, placement_id: str) -> _Held:
        devices: dict[str, str] = {}
        vf_pfs: dict[str, str] = {}
        mdevs: dict[str, str] = {}
        migs: list[tuple[MigCreate, str]] = []
        for pid, entry in self._checkpoint.entries().items():
            if pid == placement_id:
                continue
            for record in _records(entry):
                step = record.step
                if isinstance(step, VfioBind):
                    devices.update({b.address: pid for b in step.bindings})
                    if step.pf is not None:
                        vf_pfs[step.pf] = pid
                elif isinstance(step, MdevCreate):
                    mdevs[step.uuid] = pid
                elif isinstance(step, MigCreate):
                    migs.append((step, pid))
        return _Held(devices, vf_pfs, mdevs, tuple(migs))

    def _device(self, address: str) -> Path:
        return self._sysfs.path("bus", "pci", "devices", address)

    def _refuse_unless_allowed(self, where: str, address: str) -> None:
        """Refuse a device outside the operator's allow-list.

        Reads only the device, its PF and the other functions of its slot:
        what :meth:`AllowList.refusal` needs.
        """
        if not self._sysfs.exists(self._device(address)):
            return  # the caller reports a missing device in its own words
        fn = read_function(self._sysfs, address)
        slots = {address.rsplit(".", 1)[0]}
        if fn.physfn is not None:
            slots.add(fn.physfn.rsplit(".", 1)[0])
        functions: dict[PciAddress, PciFunction] = {
            PciAddress(a): fn if a == address else read_function(self._sysfs, a)
            for a in self._sysfs.listdir(self._sysfs.path("bus", "pci", "devices"))
            if a.rsplit(".", 1)[0] in slots
        }
        why = self._allow.refusal(address, functions)
        if why is not None:
            raise PlacementMismatchError(f"{where}: {address} is {why} ({self._allow})")

    def _group_endpoints(self, group: str) -> list[str]:
        members = self._sysfs.listdir(self._sysfs.path("kernel", "iommu_groups", group, "devices"))
        return sorted(m for m in members if not read_function(self._sysfs, m).is_bridge)

    def _check_whole_device(
        self, at: str, alloc: placement_pb2.ClaimAllocation, held: _Held, locks: LockSet
    ) -> _WholeDevicePlan:
        slot = alloc.whole_device
        device = self._device(slot.address)
        if not device.exists():
            raise PlacementMismatchError(f"{at}: no device {slot.address} on this host")
        group = self._sysfs.link_name(device / "iommu_group")
        if group is None or int(group) != alloc.iommu_group:
            raise PlacementMismatchError(
                f"{at}: {slot.address} is in IOMMU group {group or 'none'}, not {alloc.iommu_group}"
            )
        endpoints = self._group_endpoints(group)
        if endpoints != sorted(slot.group_endpoints):
            raise PlacementMismatchError(
                f"{at}: group {alloc.iommu_group} has endpoints {endpoints}, "
                f"the placement expects {sorted(slot.group_endpoints)}"
            )
        for e in endpoints:
            pf = self._physfn(e)
            if pf is not None and not locks.holds_exclusive(device_key(pf)):
                # A VF that appeared since the locks were taken.
                needed = LockSet()
                needed.exclusive(device_key(pf))
                raise _RelockError(needed)
        for e in endpoints:
            field = "address" if e == slot.address else "group_endpoints"
            self._refuse_unless_allowed(f"{at}.whole_device.{field}", e)
        in_use = [
            f"{e} ({why})" for e in endpoints if (why := host_use(self._sysfs, PciAddress(e)))
        ]
        if in_use:
            raise PlacementMismatchError(
                f"{at}: the host itself uses {', '.join(in_use)}; not handing it over"
            )
        taken = [f"{e} (placement {held.devices[e]})" for e in endpoints if e in held.devices]
        # Unbinding a PF's driver takes its VFs away from whoever holds them.
        taken += [
            f"{e} (VFs held by placement {held.vf_pfs[e]})" for e in endpoints if e in held.vf_pfs
        ]
        if taken:
            # The scheduler's store says these are free, the host says not:
            # never hand one device to two tenants, whoever is wrong.
            raise PlacementMismatchError(f"devices already handed out here: {', '.join(taken)}")
        return _WholeDevicePlan(at, slot.address, int(group), tuple(endpoints))

    def _check_vf_device(self, at: str, vf: str, held: _Held) -> int:
        """Refuse a VF that is not the tenant's to have; its IOMMU group."""
        if vf in held.devices:
            raise PlacementMismatchError(
                f"{at}.vf: VF {vf} is already handed out here (placement {held.devices[vf]})"
            )
        why = host_use(self._sysfs, PciAddress(vf))
        if why:
            raise PlacementMismatchError(
                f"{at}.vf: the host itself uses VF {vf} ({why}); not handing it over"
            )
        group = self._sysfs.link_name(self._device(vf) / "iommu_group")
        if group is None:
            raise PlacementMismatchError(f"{at}.vf: VF {vf} has no IOMMU group")
        others = [e for e in self._group_endpoints(group) if e != vf]
        if others:
            # Binding the group would take devices the placement does not name.
            raise PlacementMismatchError(
                f"{at}.vf: VF {vf} shares IOMMU group {group} with {', '.join(others)}"
            )
        return int(group)

    def _check_vf(
        self,
        at: str,
        alloc: placement_pb2.ClaimAllocation,
        held: _Held,
        journal: _Journal,
        locks: LockSet,
    ) -> _VfPlan:
        slot = alloc.vf
        pf = slot.pf_address
        if pf in held.devices:
            raise PlacementMismatchError(
                f"{at}.vf.pf_address: {pf} itself is handed out here (placement {held.devices[pf]})"
            )
        state = self._sriov.state(pf)
        if state is None:
            raise PlacementMismatchError(f"{at}.vf.pf_address: {pf} is not an SR-IOV PF here")
        # A VF is allowed when its PF is: enabling it writes to the PF.
        self._refuse_unless_allowed(f"{at}.vf.pf_address", pf)
        if slot.num_vfs > state.total_vfs:
            raise PlacementMismatchError(
                f"{at}.vf.num_vfs: {pf} supports at most {state.total_vfs} VFs, not {slot.num_vfs}"
            )
        ours = any(isinstance(r.step, SriovEnable) and r.step.pf == pf for r in journal.leftover)
        enable = state.num_vfs == 0 or ours
        if enable and not locks.holds_exclusive(device_key(pf)):
            # Only with no VF operation on the PF running: whoever holds it
            # shared relies on its VFs staying as they are.
            needed = LockSet()
            needed.exclusive(device_key(pf))
            raise _RelockError(needed)
        if not enable:
            # Never change a PF that has VFs: a new count means writing 0
            # first, which pulls every VF from under whoever uses it.
            if slot.vf_index >= state.num_vfs:
                raise PlacementMismatchError(
                    f"{at}.vf.vf_index: {pf} has {state.num_vfs} VFs, so no VF {slot.vf_index}; "
                    "the agent never changes the VF count of a PF that has VFs"
                )
            vf = self._sriov.vf_address(pf, slot.vf_index)
            if vf is None:
                raise PlacementMismatchError(f"{at}.vf.vf_index: {pf} has no virtfn{slot.vf_index}")
            if slot.vf_address and slot.vf_address != vf:
                raise PlacementMismatchError(
                    f"{at}.vf.vf_address: VF {slot.vf_index} of {pf} is {vf}, not {slot.vf_address}"
                )
            self._check_vf_device(at, vf, held)
        return _VfPlan(
            at,
            pf,
            slot.vf_index,
            slot.num_vfs,
            slot.vfio_driver or VFIO_PCI,
            enable,
            slot.vf_address,
        )

    def _check_mdev(
        self, at: str, alloc: placement_pb2.ClaimAllocation, held: _Held, journal: _Journal
    ) -> _MdevPlan:
        slot = alloc.mdev
        uuid = slot.uuid.lower()
        self._refuse_unless_allowed(f"{at}.mdev.parent_address", slot.parent_address)
        if uuid in held.mdevs:
            raise PlacementMismatchError(
                f"{at}.mdev.uuid: mdev {uuid} is already handed out here "
                f"(placement {held.mdevs[uuid]})"
            )
        existing = self._mdev.type_of(uuid)
        ours = any(
            isinstance(r.step, MdevCreate) and r.step.uuid == uuid and r.step.created
            for r in journal.leftover
        )
        if existing is not None:
            parent = self._mdev.parent_of(uuid)
            if existing != slot.type_id or parent != slot.parent_address:
                raise PlacementMismatchError(
                    f"{at}.mdev.uuid: mdev {uuid} exists as {existing or 'an unknown type'} "
                    f"on {parent}, not {slot.type_id} on {slot.parent_address}"
                )
            return _MdevPlan(at, slot.parent_address, slot.type_id, uuid, ours)
        if not self._mdev.is_parent(slot.parent_address):
            raise PlacementMismatchError(
                f"{at}.mdev.parent_address: {slot.parent_address} is not an mdev parent here"
            )
        if not self._sysfs.exists(self._mdev.type_dir(slot.parent_address, slot.type_id)):
            raise PlacementMismatchError(
                f"{at}.mdev.type_id: {slot.parent_address} has no mdev type {slot.type_id}"
            )
        if self._mdev.available(slot.parent_address, slot.type_id) == 0:
            raise PlacementMismatchError(
                f"{at}.mdev.type_id: no instance of {slot.type_id} is available on "
                f"{slot.parent_address}"
            )
        return _MdevPlan(at, slot.parent_address, slot.type_id, uuid, True)

    def _check_mig(
        self, at: str, alloc: placement_pb2.ClaimAllocation, held: _Held, journal: _Journal
    ) -> _MigPlan:
        slot = alloc.mig
        self._refuse_unless_allowed(f"{at}.mig.gpu_address", slot.gpu_address)
        gpu = self._mig.gpu(slot.gpu_address)
        if gpu is None:
            why = (
                f" (NVML unavailable: {self._nvml.reason})"
                if isinstance(self._nvml, NullNvmlClient)
                else ""
            )
            raise PlacementMismatchError(
                f"{at}.mig.gpu_address: NVML manages no GPU at {slot.gpu_address}{why}"
            )
        if not self._mig.mig_enabled(gpu):
            raise PlacementMismatchError(
                f"{at}.mig.gpu_address: MIG mode is not enabled on {slot.gpu_address}"
            )
        profile = self._mig.profile(gpu, slot.profile_id)
        if profile is None:
            raise InvalidPlacementError(
                f"{at}.mig.profile_id: {slot.gpu_address} ({gpu.name}) has no GPU-instance "
                f"profile {slot.profile_id}"
            )
        if slot.profile_name and slot.profile_name != profile.name:
            raise InvalidPlacementError(
                f"{at}.mig.profile_name: profile {slot.profile_id} is {profile.name} on "
                f"{gpu.name}, not {slot.profile_name}"
            )
        where = MigPlacement(slot.placement.start, slot.placement.size)
        if where not in profile.placements:
            allowed = ", ".join(f"{p.start}+{p.size}" for p in profile.placements)
            raise InvalidPlacementError(
                f"{at}.mig.placement: {where.start}+{where.size} is not a placement of "
                f"{profile.name} (allowed: {allowed})"
            )
        step = MigCreate(gpu.uuid, slot.gpu_address, slot.profile_id, where.start, where.size)
        for other, pid in held.migs:
            if step.overlaps(other):
                raise PlacementMismatchError(
                    f"{at}.mig.placement: slices {where.start}+{where.size} of "
                    f"{slot.gpu_address} are held by placement {pid}"
                )
        existing = self._mig.instance_at(gpu, slot.profile_id, where)
        if existing is not None:
            ours = any(r.step.key == step.key for r in journal.leftover)
            if not ours:
                # Adopting it would hand the tenant a partition someone else
                # made (and destroy it on release).
                raise PlacementMismatchError(
                    f"{at}.mig.placement: a GPU instance this agent did not create "
                    f"(id {existing.gi_id}) is already at {where.start}+{where.size}"
                )
        return _MigPlan(at, gpu, slot.gpu_address, slot.profile_id, where, existing)

    def _check(
        self,
        placement: placement_pb2.Placement,
        held: _Held,
        journal: _Journal,
        locks: LockSet,
    ) -> list[_Plan]:
        """Each allocation checked against the host as it is now; no writes.

        Reads only the devices the placement names (not a whole discovery):
        the check sits on the Prepare path, under the host lock.
        """
        if placement.host_id != self._reporter.host_id:
            raise PlacementMismatchError(
                f"placement is for host {placement.host_id!r}, this is {self._reporter.host_id!r}"
            )
        plans: list[_Plan] = []
        for i, alloc in enumerate(placement.allocations):
            at = f"allocations[{i}]"
            kind = alloc.WhichOneof("slot")
            if kind == "whole_device":
                plans.append(self._check_whole_device(at, alloc, held, locks))
            elif kind == "vf":
                plans.append(self._check_vf(at, alloc, held, journal, locks))
            elif kind == "mdev":
                plans.append(self._check_mdev(at, alloc, held, journal))
            else:
                plans.append(self._check_mig(at, alloc, held, journal))
        return plans

    # -- carrying out ------------------------------------------------------------

    def _bind(
        self, journal: _Journal, endpoints: Iterable[str], driver: str, pf: str | None = None
    ) -> None:
        endpoints = list(endpoints)
        bind = VfioBind(tuple(self._binder.current(e) for e in endpoints), driver, pf)
        prior = journal.prior(bind.key)
        if isinstance(prior, VfioBind):
            # An earlier attempt moved them already: its drivers are the originals.
            bind = replace(bind, bindings=prior.bindings)
        journal.begin(bind)
        self._binder.bind_group(endpoints, driver)
        journal.done(bind)

    def _verify_node(self, address: str, group: int) -> str:
        node = self._sysfs.dev / "vfio" / str(group)
        if not node.exists():
            # Bound but unusable by the tenant: fail, and have it all undone.
            raise VfioActuationError(address, "verify", errno.ENOENT, f"{node} did not appear")
        return f"/dev/vfio/{group}"

    def _run_whole_device(
        self, plan: _WholeDevicePlan, journal: _Journal, out: placement_pb2.ClaimAllocation
    ) -> None:
        self._bind(journal, plan.endpoints, VFIO_PCI)
        out.vfio_path = self._verify_node(plan.address, plan.group)

    def _run_vf(
        self, plan: _VfPlan, journal: _Journal, out: placement_pb2.ClaimAllocation, held: _Held
    ) -> None:
        if plan.enable:
            original = self._sriov.state(plan.pf)
            assert original is not None  # checked before
            step = SriovEnable(plan.pf, plan.num_vfs, original.drivers_autoprobe)
            prior = journal.prior(step.key)
            if isinstance(prior, SriovEnable):
                step = prior  # an earlier attempt turned autoprobe off
            journal.begin(step)
            self._sriov.enable(plan.pf, plan.num_vfs)
            journal.done(step)
        vf = self._sriov.vf_address(plan.pf, plan.vf_index)
        if vf is None:
            raise SriovActuationError(
                plan.pf, errno.ENODEV, f"VF {plan.vf_index} did not appear (virtfn{plan.vf_index})"
            )
        if plan.expected and plan.expected != vf:
            raise PlacementMismatchError(
                f"{plan.where}.vf.vf_address: VF {plan.vf_index} of {plan.pf} is {vf}, "
                f"not {plan.expected}"
            )
        group = self._check_vf_device(plan.where, vf, held)
        self._bind(journal, [vf], plan.driver, plan.pf)
        out.vf.vf_address = vf
        out.iommu_group = group
        out.vfio_path = self._verify_node(vf, group)

    def _run_mdev(
        self, plan: _MdevPlan, journal: _Journal, out: placement_pb2.ClaimAllocation
    ) -> None:
        step = MdevCreate(plan.parent, plan.type_id, plan.uuid, plan.created)
        journal.prior(step.key)
        journal.begin(step)
        try:
            self._mdev.create(plan.parent, plan.type_id, plan.uuid)
        except MdevActuationError:
            journal.drop()
            raise
        journal.done(step)
        group = self._mdev.iommu_group(plan.uuid)
        if group is None:
            raise MdevActuationError(plan.uuid, errno.ENODEV, "has no IOMMU group")
        out.iommu_group = group
        # The mdev's group node appears once its vendor driver binds it;
        # the tenant's VMM opens it, so it is not checked here.
        out.vfio_path = f"/dev/vfio/{group}"

    def _run_mig(
        self, plan: _MigPlan, journal: _Journal, out: placement_pb2.ClaimAllocation
    ) -> None:
        step = MigCreate(
            plan.gpu.uuid,
            plan.address,
            plan.profile_id,
            plan.placement.start,
            plan.placement.size,
            plan.adopt.gi_id if plan.adopt is not None else -1,
        )
        journal.prior(step.key)
        journal.begin(step)
        if plan.adopt is None:
            try:
                gi_id = self._mig.create_gpu_instance(
                    plan.gpu, plan.address, plan.profile_id, plan.placement
                )
            except MigActuationError:
                journal.drop()
                raise
            step = replace(step, gi_id=gi_id)
            journal.update(step)
        cis = plan.adopt.compute_instances if plan.adopt is not None else ()
        ci = (
            cis[0] if cis else self._mig.create_compute_instance(plan.gpu, plan.address, step.gi_id)
        )
        step = replace(step, ci_id=ci.ci_id)
        journal.done(step)
        out.mig.gpu_instance_id = step.gi_id
        out.mig.compute_instance_id = ci.ci_id
        out.mig.mig_uuid = ci.uuid

    def _admit_fence(self, token: int) -> None:
        """Refuse a scheduler background job whose term is older than one already seen.

        Called with the operation's locks held, so the check and the
        operation it admits are one step for any other caller touching the
        same devices or placement.

        Raises:
            StaleFenceError: ``token`` is lower than the highest seen, or
                further above the newest the scheduler reported than any
                term it issued can be (see :data:`FENCE_STEP`).
        """
        if not token:
            return  # an ordinary placement call, not a background job
        with self._fence_lock:
            if token < self._checkpoint.fence:
                raise StaleFenceError(
                    f"fencing_token: {token} is stale; this host has seen "
                    f"{self._checkpoint.fence} (another scheduler replica now runs the "
                    "background jobs)"
                )
            # From what the scheduler reported only: a ceiling from the
            # highest token seen would let a caller climb it step by step.
            ceiling = self._reported_fence + FENCE_STEP
            if token > ceiling:
                raise StaleFenceError(
                    f"fencing_token: {token} is beyond any term the scheduler has issued "
                    f"(it reported {self._reported_fence}); refused and not remembered"
                )
            self._checkpoint.raise_fence(token)

    def learn_fence(self, token: int) -> None:
        """Remember the newest fencing token the scheduler reported (never persisted)."""
        with self._fence_lock:
            self._reported_fence = max(self._reported_fence, token)

    # -- locks -------------------------------------------------------------------

    def _physfn(self, address: str) -> str | None:
        """The PF of a VF, None for any other function (or a malformed address)."""
        if not is_pci_address(address):
            return None
        return self._sysfs.link_name(self._device(address) / "physfn")

    def _placement_locks(self, placement: placement_pb2.Placement) -> LockSet:
        """What carrying out (or undoing) ``placement`` touches, before any host read.

        Enabling a PF's VFs needs the PF exclusive; it is asked for only
        once a check finds the PF has none (:class:`_RelockError`).
        """
        locks = LockSet()
        locks.exclusive(placement_key(placement.placement_id))
        for alloc in placement.allocations:
            kind = alloc.WhichOneof("slot")
            if kind == "whole_device":
                slot = alloc.whole_device
                addresses = {a for a in (slot.address, *slot.group_endpoints) if a}
                locks.exclusive(group_key(alloc.iommu_group))
                for address in addresses:
                    locks.exclusive(device_key(address))
                    pf = self._physfn(address)
                    if pf is not None:
                        # A VF handed over whole: its PF must not drop it meanwhile.
                        locks.exclusive(device_key(pf))
            elif kind == "vf":
                vf = alloc.vf
                locks.shared(device_key(vf.pf_address))
                locks.exclusive(vf_slot_key(vf.pf_address, vf.vf_index))
                if vf.vf_address:
                    locks.exclusive(device_key(vf.vf_address))
            elif kind == "mdev":
                # One create at a time per parent: its available_instances
                # check and the create are one step.
                locks.exclusive(device_key(alloc.mdev.parent_address))
                locks.exclusive(mdev_key(alloc.mdev.uuid))
            elif kind == "mig":
                locks.exclusive(device_key(alloc.mig.gpu_address))
        return locks

    def _entry_locks(self, placement_id: str) -> LockSet:
        """What undoing (or redoing) a placement's checkpoint entry touches."""
        locks = LockSet()
        locks.exclusive(placement_key(placement_id))
        entry = self._checkpoint.get(placement_id)
        if entry is None:
            return locks
        # Undecodable: the records alone say what the entry touched.
        with contextlib.suppress(DecodeError):
            locks.update(self._placement_locks(placement_pb2.Placement.FromString(entry.placement)))
        locks.update(_record_locks(_records(entry)))
        return locks

    def _locked(self, placement_id: str, base: LockSet, op: Callable[[LockSet], _T]) -> _T:
        """Run ``op`` holding ``base``, the placement entry's locks and what checks ask for.

        ``op`` raises :class:`_RelockError` (before any host write) when it
        finds it needs more; it then runs again with those too, and after
        :data:`_RELOCK_ATTEMPTS` with the whole host.
        """
        extra = LockSet()
        for _ in range(_RELOCK_ATTEMPTS):
            locks = LockSet()
            locks.update(base)
            locks.update(extra)
            locks.update(self._entry_locks(placement_id))
            with self._locks.hold(locks):
                # The entry may have changed while this waited (an SR-IOV
                # record moved to it): it must still be covered.
                need = self._entry_locks(placement_id)
                if not locks.covers(need):
                    extra.update(need)
                    continue
                try:
                    return op(locks)
                except _RelockError as err:
                    extra.update(err.locks)
        everything = LockSet.everything()
        with self._locks.hold(everything):
            return op(everything)

    def _prepare(
        self, placement: placement_pb2.Placement, fencing_token: int = 0
    ) -> placement_pb2.Placement:
        def op(locks: LockSet) -> placement_pb2.Placement:
            self._admit_fence(fencing_token)
            return self._prepare_locked(placement, locks)

        return self._locked(placement.placement_id, self._placement_locks(placement), op)

    def _prepare_locked(
        self, placement: placement_pb2.Placement, locks: LockSet
    ) -> placement_pb2.Placement:
        existing = self._checkpoint.get(placement.placement_id)
        if existing is not None and existing.state == "prepared":
            return placement_pb2.Placement.FromString(existing.placement)
        _validate(placement)
        # A started entry survives only if an earlier attempt died between
        # writes (and recover could not undo it); its records are the truth
        # about the originals, and what it created is this placement's own.
        prior = _records(existing) if existing is not None else []
        journal = _Journal(self._checkpoint, placement, prior)
        held = self._held_elsewhere(placement.placement_id)
        plans = self._check(placement, held, journal, locks)
        result = placement_pb2.Placement()
        result.CopyFrom(placement)
        # Record intent before any write, so a crash mid-way is rolled back.
        journal.start()
        try:
            for plan, out in zip(plans, result.allocations, strict=True):
                if isinstance(plan, _WholeDevicePlan):
                    self._run_whole_device(plan, journal, out)
                elif isinstance(plan, _VfPlan):
                    self._run_vf(plan, journal, out, held)
                elif isinstance(plan, _MdevPlan):
                    self._run_mdev(plan, journal, out)
                else:
                    self._run_mig(plan, journal, out)
            # What an earlier attempt did that this one did not redo.
            self._undo_all(journal.leftover, placement.placement_id, releasing=False)
        except (ActuationError, PlacementMismatchError, NvmlError) as err:
            try:
                self._undo_all(journal.all(), placement.placement_id, releasing=False)
            except ActuationError as undo_err:
                log.error("rolling back %s failed: %s", placement.placement_id, undo_err)
                raise RolledBackError(err, undo_err) from err
            self._checkpoint.remove(placement.placement_id)
            raise RolledBackError(err) from err
        journal.leftover.clear()
        journal.prepared(result)
        _log_done("prepared", "prepared", result)
        return result

    def _unprepare(self, placement_id: str, fencing_token: int = 0) -> None:
        def op(_: LockSet) -> None:
            self._admit_fence(fencing_token)
            self._unprepare_locked(placement_id)

        self._locked(placement_id, LockSet(), op)

    def _unprepare_locked(self, placement_id: str) -> None:
        entry = self._checkpoint.get(placement_id)
        if entry is None:
            return  # never prepared here, or already torn down: idempotent
        # Every undo is idempotent, so a failure keeps the whole entry and a
        # retried Unprepare simply runs it all again.
        self._undo_all(_records(entry), placement_id, releasing=entry.state == "prepared")
        self._checkpoint.remove(placement_id)
        _log_done("torn down", "torn-down", placement_pb2.Placement.FromString(entry.placement))

    # -- gRPC ----------------------------------------------------------------------

    async def Prepare(  # noqa: N802 - gRPC method names are CamelCase
        self, request: agent_pb2.PrepareRequest, context: Context
    ) -> agent_pb2.PrepareResponse:
        """Carry a placement out."""
        placement = request.placement
        if not placement.placement_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "placement.placement_id: required"
            )
        if not placement.allocations:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "placement.allocations: at least one is required"
            )
        try:
            result = await asyncio.to_thread(self._prepare, placement, request.fencing_token)
        except StaleFenceError as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except InvalidPlacementError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except PlacementMismatchError as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except RolledBackError as err:
            log.error(
                "prepare %s failed: %s",
                placement.placement_id, err,
                extra={"placement": placement.placement_id, "reason": str(err)},
            )  # fmt: skip
            code = (
                grpc.StatusCode.FAILED_PRECONDITION
                if isinstance(err.cause, PlacementMismatchError)
                else grpc.StatusCode.INTERNAL
            )
            await context.abort(code, str(err))
        except (ActuationError, NvmlError) as err:
            log.error(
                "prepare %s failed: %s",
                placement.placement_id, err,
                extra={"placement": placement.placement_id, "reason": str(err)},
            )  # fmt: skip
            await context.abort(grpc.StatusCode.INTERNAL, str(err))
        finally:
            self._on_change()
        return agent_pb2.PrepareResponse(placement=result)

    async def Unprepare(  # noqa: N802
        self, request: agent_pb2.UnprepareRequest, context: Context
    ) -> agent_pb2.UnprepareResponse:
        """Tear a placement down: original drivers back, created devices removed."""
        if not request.placement.placement_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "placement.placement_id: required"
            )
        try:
            await asyncio.to_thread(
                self._unprepare, request.placement.placement_id, request.fencing_token
            )
        except StaleFenceError as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except ActuationError as err:
            log.error(
                "unprepare %s failed: %s",
                request.placement.placement_id, err,
                extra={"placement": request.placement.placement_id, "reason": str(err)},
            )  # fmt: skip
            await context.abort(grpc.StatusCode.INTERNAL, str(err))
        finally:
            self._on_change()
        return agent_pb2.UnprepareResponse()

    async def GetState(  # noqa: N802
        self, request: agent_pb2.GetStateRequest, context: Context
    ) -> agent_pb2.GetStateResponse:
        """The host as discovered now, and the placements held."""
        inventory, _ = await asyncio.to_thread(self._reporter.report)
        prepared = sorted(
            pid for pid, e in self._checkpoint.entries().items() if e.state == "prepared"
        )
        return agent_pb2.GetStateResponse(inventory=inventory, prepared_placements=prepared)
