"""What scheduling returns: a plan to commit, or why there is none."""

from __future__ import annotations

from dataclasses import dataclass

from tessera.scheduler.core.identity import HostId, IommuGroupNumber, PciAddress, SlotKey


@dataclass(frozen=True)
class WholeDeviceAssignment:
    """A whole device by VFIO passthrough, with every endpoint of its group."""

    claim: str
    address: PciAddress
    iommu_group: IommuGroupNumber
    group_endpoints: tuple[PciAddress, ...]
    numa_node: int
    vfio_path: str


@dataclass(frozen=True)
class VfAssignment:
    """An SR-IOV VF, bound to a VFIO driver.

    Attributes:
        pf_address: the PF.
        vf_index: which VF.
        vf_address: the VF, None while it does not exist (the agent enables
            ``num_vfs`` VFs first).
        iommu_group: the VF's own group, None while it does not exist.
        num_vfs: the PF's VF count the placement needs.
        vfio_driver: "vfio-pci" or a migration-capable variant driver.
    """

    claim: str
    pf_address: PciAddress
    vf_index: int
    vf_address: PciAddress | None
    iommu_group: IommuGroupNumber | None
    numa_node: int
    num_vfs: int
    vfio_driver: str


@dataclass(frozen=True)
class MdevAssignment:
    """A mediated device of a type, with the UUID the agent creates it under."""

    claim: str
    parent_address: PciAddress
    type_id: str
    uuid: str
    numa_node: int


@dataclass(frozen=True)
class MigAssignment:
    """A MIG GPU instance at a placement of memory slices."""

    claim: str
    gpu_address: PciAddress
    profile_name: str
    profile_id: int
    start: int
    size: int
    numa_node: int


#: One claim unit's concrete slot.
Assignment = WholeDeviceAssignment | VfAssignment | MdevAssignment | MigAssignment


def assignment_device(a: Assignment) -> PciAddress:
    """The physical device an assignment lives on (the GPU, PF or parent)."""
    if isinstance(a, WholeDeviceAssignment):
        return a.address
    if isinstance(a, VfAssignment):
        return a.pf_address
    if isinstance(a, MdevAssignment):
        return a.parent_address
    return a.gpu_address


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
        score: the plan's quality as the engine scored it (higher is
            better); informational.
        reasons: why this host and these devices, one line per scoring
            plugin, for Explain.
    """

    host_id: HostId
    expected_alloc_generation: int
    slots: tuple[SlotKey, ...]
    assignments: tuple[Assignment, ...]
    score: int = 0
    reasons: tuple[str, ...] = ()


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
