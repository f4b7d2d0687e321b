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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from agent.actuation.vfio import BindingRecord, VfioActuationError, VfioBinder
from agent.checkpoint import Checkpoint, CheckpointEntry
from agent.reporter import HostReporter
from agent.sysfs import Sysfs
from tessera.v1 import agent_pb2, agent_pb2_grpc, inventory_pb2, placement_pb2

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

#: Roles that stay on their own driver when a group is passed through.
_BRIDGE_ROLES = frozenset(
    {
        inventory_pb2.PCI_ROLE_ROOT_PORT,
        inventory_pb2.PCI_ROLE_SWITCH_UPSTREAM,
        inventory_pb2.PCI_ROLE_SWITCH_DOWNSTREAM,
        inventory_pb2.PCI_ROLE_PCI_BRIDGE,
    }
)


class PlacementMismatchError(Exception):
    """The placement does not match the host (FAILED_PRECONDITION)."""


def _expected_groups(
    placement: placement_pb2.Placement, inventory: inventory_pb2.HostInventory
) -> list[tuple[int, list[str]]]:
    """Each allocation's group and endpoints, checked against the host.

    Raises:
        PlacementMismatchError: wrong host, an unknown device, or a group
            whose members differ from the placement's.
        NotImplementedError: a slot form this agent does not carry out yet.
    """
    if placement.host_id != inventory.host_id:
        raise PlacementMismatchError(
            f"placement is for host {placement.host_id!r}, this is {inventory.host_id!r}"
        )
    functions = {f.address: f for f in inventory.pci_functions}
    groups = {g.number: g for g in inventory.iommu_groups}
    out: list[tuple[int, list[str]]] = []
    for i, alloc in enumerate(placement.allocations):
        if alloc.WhichOneof("slot") != "whole_device":
            raise NotImplementedError(
                f"allocations[{i}]: {alloc.WhichOneof('slot')} slots are not carried out yet"
            )
        slot = alloc.whole_device
        device = functions.get(slot.address)
        if device is None:
            raise PlacementMismatchError(f"allocations[{i}]: no device {slot.address} on this host")
        if not device.has_iommu_group or device.iommu_group != alloc.iommu_group:
            raise PlacementMismatchError(
                f"allocations[{i}]: {slot.address} is in IOMMU group "
                f"{device.iommu_group if device.has_iommu_group else 'none'}, "
                f"not {alloc.iommu_group}"
            )
        members = groups[device.iommu_group].members
        endpoints = sorted(
            m for m in members if m in functions and functions[m].role not in _BRIDGE_ROLES
        )
        if endpoints != sorted(slot.group_endpoints):
            raise PlacementMismatchError(
                f"allocations[{i}]: group {alloc.iommu_group} has endpoints {endpoints}, "
                f"the placement expects {sorted(slot.group_endpoints)}"
            )
        out.append((device.iommu_group, endpoints))
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
        self._lock = asyncio.Lock()

    def recover(self) -> None:
        """Roll back placements a crash left half done (``started`` entries)."""
        for entry in self._checkpoint.entries().values():
            if entry.state == "started":
                log.warning("rolling back half-done placement %s", entry.placement_id)
                records = [BindingRecord.from_dict(b) for b in entry.bindings]
                self._binder.restore(records)
                self._checkpoint.remove(entry.placement_id)

    def _prepare(self, placement: placement_pb2.Placement) -> placement_pb2.Placement:
        existing = self._checkpoint.get(placement.placement_id)
        if existing is not None and existing.state == "prepared":
            return placement_pb2.Placement.FromString(existing.placement)
        inventory, _ = self._reporter.report()
        groups = _expected_groups(placement, inventory)
        endpoints = [e for _, members in groups for e in members]
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
        async with self._lock:
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
        async with self._lock:
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
