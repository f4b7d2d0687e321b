"""What scheduling returns: a plan to commit, or why there is none."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.core.identity import HostId, IommuGroupNumber, PciAddress, SlotKey


@dataclass(frozen=True)
class WholeDeviceAssignment:
    """A whole device by VFIO passthrough, with every endpoint of its group."""

    claim: str
    address: PciAddress
    iommu_group: IommuGroupNumber
    group_endpoints: tuple[PciAddress, ...]
    numa_node: int
    vfio_path: str


#: One claim's concrete slot. Later increments add VF, mdev and MIG variants.
Assignment = WholeDeviceAssignment


@dataclass(frozen=True)
class Plan:
    """A decision to commit: these slots on this host, if nothing moved.

    Attributes:
        host_id: where the request goes.
        expected_alloc_generation: the host's allocation generation the plan
            was made against; the applier refuses it if the host moved on.
        slots: every slot the plan takes.
        assignments: per claim, what it gets (claims with count > 1 appear
            once per unit).
    """

    host_id: HostId
    expected_alloc_generation: int
    slots: tuple[SlotKey, ...]
    assignments: tuple[Assignment, ...]


@dataclass(frozen=True)
class Rejection:
    """Why a plugin rejected candidates, with a greppable reason name."""

    plugin: str
    reason: str
    count: int
    detail: str = ""

    def __str__(self) -> str:
        text = f"{self.plugin}/{self.reason}: {self.count}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass(frozen=True)
class Unschedulable:
    """No host can take the request now; the rejections say why."""

    summary: str
    rejections: tuple[Rejection, ...] = ()

    def reasons(self) -> list[str]:
        """Rejections as strings, for the wire."""
        return [str(r) for r in self.rejections]
