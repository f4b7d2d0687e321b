"""The Agent gRPC service: carries placements out on this host.

Thin over the actuation layer: it checks that the placement matches the host
as discovered now (the agent never touches a device it was not told to, and
never a group whose membership differs from what the scheduler saw), records
intent in the checkpoint, moves the devices, and answers with the handles.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from agent.actuation.vfio import BindingRecord, VfioActuationError, VfioBinder
from agent.checkpoint import Checkpoint, CheckpointEntry
from agent.probes.host_use import host_use
from agent.probes.pci import PciAddress, read_function
from agent.reporter import HostReporter
from agent.sysfs import Sysfs
from tessera.v1 import agent_pb2, agent_pb2_grpc, placement_pb2

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]


class PlacementMismatchError(Exception):
    """The placement does not match the host (FAILED_PRECONDITION)."""


def _expected_groups(
    placement: placement_pb2.Placement, host_id: str, sysfs: Sysfs
) -> list[tuple[int, list[str]]]:
    """Each allocation's group and endpoints, checked against the host as it is now.

    Reads only the devices and groups the placement names (not a whole
    discovery): the check sits on the Prepare path, under the host lock.

    Raises:
        PlacementMismatchError: wrong host, an unknown device, or a group
            whose members differ from the placement's.
        NotImplementedError: a slot form this agent does not carry out yet.
    """
    if placement.host_id != host_id:
        raise PlacementMismatchError(
            f"placement is for host {placement.host_id!r}, this is {host_id!r}"
        )
    out: list[tuple[int, list[str]]] = []
    for i, alloc in enumerate(placement.allocations):
        if alloc.WhichOneof("slot") != "whole_device":
            raise NotImplementedError(
                f"allocations[{i}]: {alloc.WhichOneof('slot')} slots are not carried out yet"
            )
        slot = alloc.whole_device
        device = sysfs.path("bus", "pci", "devices", slot.address)
        if not device.exists():
            raise PlacementMismatchError(f"allocations[{i}]: no device {slot.address} on this host")
        group = sysfs.link_name(device / "iommu_group")
        if group is None or int(group) != alloc.iommu_group:
            raise PlacementMismatchError(
                f"allocations[{i}]: {slot.address} is in IOMMU group {group or 'none'}, "
                f"not {alloc.iommu_group}"
            )
        members = sysfs.listdir(sysfs.path("kernel", "iommu_groups", group, "devices"))
        endpoints = sorted(m for m in members if not read_function(sysfs, m).is_bridge)
        if endpoints != sorted(slot.group_endpoints):
            raise PlacementMismatchError(
                f"allocations[{i}]: group {alloc.iommu_group} has endpoints {endpoints}, "
                f"the placement expects {sorted(slot.group_endpoints)}"
            )
        in_use = [f"{e} ({why})" for e in endpoints if (why := host_use(sysfs, PciAddress(e)))]
        if in_use:
            raise PlacementMismatchError(
                f"allocations[{i}]: the host itself uses {', '.join(in_use)}; not handing it over"
            )
        out.append((int(group), endpoints))
    return out


class AgentServicer(agent_pb2_grpc.AgentServicer):
    """Prepare, Unprepare and GetState on one host.

    Args:
        sysfs: the host's sysfs (real or fake root).
        reporter: discovers the host.
        checkpoint: the on-disk record of prepared placements.
        on_change: called after the host changed, to report it early.
    """

    def __init__(
        self,
        sysfs: Sysfs,
        reporter: HostReporter,
        checkpoint: Checkpoint,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._sysfs = sysfs
        self._binder = VfioBinder(sysfs)
        self._reporter = reporter
        self._checkpoint = checkpoint
        self._on_change = on_change
        # One host operation at a time: sysfs writes on one device tree must
        # not interleave (an unbind racing a drivers_probe on a group member).
        # A thread lock, taken inside the worker thread: when a caller's
        # deadline cancels the RPC, the thread goes on, and so must the lock,
        # or an Unprepare could run beside the Prepare it is meant to undo.
        self._lock = threading.Lock()

    def recover(self) -> None:
        """Roll back placements a crash left half done (``started`` entries).

        One entry that cannot be rolled back is logged and kept for the next
        start; it does not stop the others nor the agent.
        """
        with self._lock:
            for entry in self._checkpoint.entries().values():
                if entry.state != "started":
                    continue
                log.warning("rolling back half-done placement %s", entry.placement_id)
                try:
                    self._binder.restore([BindingRecord.from_dict(b) for b in entry.bindings])
                except VfioActuationError as err:
                    log.error("cannot roll back %s yet: %s", entry.placement_id, err)
                    continue
                self._checkpoint.remove(entry.placement_id)

    def _owned_elsewhere(self, placement_id: str, endpoints: list[str]) -> list[str]:
        """Endpoints another placement held here already has."""
        held = {
            str(b["address"]): pid
            for pid, entry in self._checkpoint.entries().items()
            if pid != placement_id
            for b in entry.bindings
        }
        return [f"{e} (placement {held[e]})" for e in endpoints if e in held]

    def _prepare(self, placement: placement_pb2.Placement) -> placement_pb2.Placement:
        with self._lock:
            return self._prepare_locked(placement)

    def _prepare_locked(self, placement: placement_pb2.Placement) -> placement_pb2.Placement:
        existing = self._checkpoint.get(placement.placement_id)
        if existing is not None and existing.state == "prepared":
            return placement_pb2.Placement.FromString(existing.placement)
        groups = _expected_groups(placement, self._reporter.host_id, self._sysfs)
        endpoints = [e for _, members in groups for e in members]
        taken = self._owned_elsewhere(placement.placement_id, endpoints)
        if taken:
            # The scheduler's store says these are free, the host says not:
            # never hand one device to two tenants, whoever is wrong.
            raise PlacementMismatchError(f"devices already handed out here: {', '.join(taken)}")
        # Record intent (with every device's current driver) before any write,
        # so a crash mid-way can be rolled back on restart.
        if existing is not None:
            # A started entry survives only if a previous attempt died between
            # writes; its recorded drivers are the true originals.
            planned = [BindingRecord.from_dict(b) for b in existing.bindings]
        else:
            planned = [self._binder.current(e) for e in endpoints]
        self._checkpoint.put(
            CheckpointEntry(
                placement.placement_id,
                "started",
                tuple(r.to_dict() for r in planned),
                placement.SerializeToString(),
            )
        )
        try:
            self._binder.bind_group(endpoints)
        except VfioActuationError:
            # bind_group rolled its own work back; drop the intent.
            self._checkpoint.remove(placement.placement_id)
            raise
        result = placement_pb2.Placement()
        result.CopyFrom(placement)
        for alloc, (group, _) in zip(result.allocations, groups, strict=True):
            node = self._sysfs.dev / "vfio" / str(group)
            if not node.exists():
                # Bound but unusable by the tenant: undo it all, then fail.
                self._binder.restore(planned)
                self._checkpoint.remove(placement.placement_id)
                raise VfioActuationError(
                    alloc.whole_device.address, "verify", errno.ENOENT, f"{node} did not appear"
                )
            alloc.vfio_path = f"/dev/vfio/{group}"
        self._checkpoint.put(
            CheckpointEntry(
                placement.placement_id,
                "prepared",
                tuple(r.to_dict() for r in planned),
                result.SerializeToString(),
            )
        )
        return result

    def _unprepare(self, placement_id: str) -> None:
        with self._lock:
            self._unprepare_locked(placement_id)

    def _unprepare_locked(self, placement_id: str) -> None:
        entry = self._checkpoint.get(placement_id)
        if entry is None:
            return  # never prepared here, or already torn down: idempotent
        self._binder.restore([BindingRecord.from_dict(b) for b in entry.bindings])
        self._checkpoint.remove(placement_id)

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
            result = await asyncio.to_thread(self._prepare, placement)
        except PlacementMismatchError as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except NotImplementedError as err:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(err))
        except VfioActuationError as err:
            log.error("prepare %s failed: %s", placement.placement_id, err)
            await context.abort(grpc.StatusCode.INTERNAL, f"{err} (rolled back)")
        finally:
            self._on_change()
        return agent_pb2.PrepareResponse(placement=result)

    async def Unprepare(  # noqa: N802
        self, request: agent_pb2.UnprepareRequest, context: Context
    ) -> agent_pb2.UnprepareResponse:
        """Tear a placement down and restore the original drivers."""
        if not request.placement.placement_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "placement.placement_id: required"
            )
        try:
            await asyncio.to_thread(self._unprepare, request.placement.placement_id)
        except VfioActuationError as err:
            log.error("unprepare %s failed: %s", request.placement.placement_id, err)
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
