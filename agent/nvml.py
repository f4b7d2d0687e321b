"""What the agent asks NVIDIA's management library, as a small Protocol.

Discovery depends on :class:`NvmlClient` only, so hosts without an NVIDIA
driver use :class:`NullNvmlClient` and tests use a fake; a pynvml-backed
client plugs in later without touching discovery.

Terms follow NVML (HW_FACTS §9): a GPU-instance *profile* is identified by its
profile **ID** (19, 20, 15, 14, 9, 5, 0 on A100/H100), not the NVML profile
index; placements count memory slices (8 per GPU) as ``nvidia-smi mig
-lgipp`` prints them; GPU-instance ids are assigned by the driver.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class NvmlError(Exception):
    """An NVML call failed (the NVML return code's name in the message)."""


class MigMode(enum.Enum):
    """A MIG mode, as ``nvmlDeviceGetMigMode`` returns it."""

    DISABLED = 0
    ENABLED = 1


@dataclass(frozen=True)
class MigModeState:
    """Current and pending MIG mode.

    They differ while a mode change waits for a GPU reset
    (``NVML_ERROR_RESET_REQUIRED``, e.g. in a passthrough VM).
    """

    current: MigMode
    pending: MigMode


@dataclass(frozen=True)
class NvmlGpu:
    """A GPU the driver manages.

    Attributes:
        uuid: ``GPU-4101de38-...``.
        name: ``NVIDIA A100 80GB PCIe``.
        pci_bus_id: as NVML prints it, ``00000000:4B:00.0`` (upper case, 8
            digit domain); see :func:`sysfs_address`.
        memory_mib: total framebuffer memory in MiB.
    """

    uuid: str
    name: str
    pci_bus_id: str
    memory_mib: int


@dataclass(frozen=True)
class MigPlacement:
    """Memory slices ``[start, start + size)`` of a GPU instance."""

    start: int
    size: int


@dataclass(frozen=True)
class GpuInstanceProfile:
    """A GPU-instance profile (``nvidia-smi mig -lgip`` / ``-lgipp``).

    Attributes:
        profile_id: the profile ID (not the NVML index).
        name: ``3g.40gb``; ``+me`` for the media-engine profile.
        slice_count: compute slices.
        memory_mib: memory of one instance.
        multiprocessor_count: SMs of one instance.
        placements: every placement NVIDIA allows, occupied or not.
    """

    profile_id: int
    name: str
    slice_count: int
    memory_mib: int
    multiprocessor_count: int
    placements: tuple[MigPlacement, ...]


@dataclass(frozen=True)
class ComputeInstance:
    """A compute instance inside a GPU instance.

    Attributes:
        ci_id: the compute-instance id within its GPU instance.
        profile_id: the compute-instance profile ID.
        uuid: the MIG device's ``MIG-<uuid>``; empty when NVML gave none.
    """

    ci_id: int
    profile_id: int
    uuid: str


@dataclass(frozen=True)
class GpuInstance:
    """An existing GPU instance.

    Attributes:
        gi_id: the GPU-instance id, assigned by the driver.
        profile_id: its GPU-instance profile ID.
        placement: the memory slices it holds.
        compute_instances: compute instances inside it.
    """

    gi_id: int
    profile_id: int
    placement: MigPlacement
    compute_instances: tuple[ComputeInstance, ...]


class NvmlClient(Protocol):
    """The NVML queries discovery makes.

    Methods taking a ``uuid`` take a GPU's UUID from :meth:`gpus`. Any of
    them may raise :class:`NvmlError`; discovery records it as a note.
    """

    def driver_version(self) -> str | None:
        """The NVIDIA driver version; None when no driver is loaded."""
        ...

    def gpus(self) -> Sequence[NvmlGpu]:
        """Every GPU the driver manages (not those bound to vfio-pci)."""
        ...

    def mig_mode(self, uuid: str) -> MigModeState | None:
        """Current and pending MIG mode; None when the GPU cannot do MIG."""
        ...

    def gpu_instance_profiles(self, uuid: str) -> Sequence[GpuInstanceProfile]:
        """The GPU-instance profiles the GPU supports, with placements."""
        ...

    def gpu_instances(self, uuid: str) -> Sequence[GpuInstance]:
        """The GPU instances that exist now, with their compute instances."""
        ...


class NullNvmlClient:
    """NVML on a host without an NVIDIA driver: no driver, no GPUs."""

    def driver_version(self) -> str | None:
        """No driver."""
        return None

    def gpus(self) -> Sequence[NvmlGpu]:
        """No GPUs."""
        return ()

    def mig_mode(self, uuid: str) -> MigModeState | None:
        """No MIG."""
        return None

    def gpu_instance_profiles(self, uuid: str) -> Sequence[GpuInstanceProfile]:
        """No profiles."""
        return ()

    def gpu_instances(self, uuid: str) -> Sequence[GpuInstance]:
        """No instances."""
        return ()


def sysfs_address(pci_bus_id: str) -> str:
    """A PCI bus id in NVML form (``00000000:4B:00.0``) in sysfs form.

    NVML prints an 8-digit upper-case domain (``NVML_DEVICE_PCI_BUS_ID_FMT``),
    sysfs a 4-digit lower-case one (``0000:4b:00.0``); the legacy 4-digit
    NVML form converts too.

    Raises:
        ValueError: not a PCI bus id.
    """
    domain, sep, rest = pci_bus_id.strip().partition(":")
    if not sep or not rest:
        raise ValueError(f"not a PCI bus id: {pci_bus_id!r}")
    try:
        number = int(domain, 16)
    except ValueError:
        raise ValueError(f"not a PCI bus id: {pci_bus_id!r}") from None
    return f"{number:04x}:{rest.lower()}"
