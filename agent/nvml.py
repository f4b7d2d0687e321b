"""What the agent asks NVIDIA's management library, as a small Protocol.

Discovery depends on :class:`NvmlClient` only; MIG actuation on
:class:`NvmlMigClient`, which adds the create and destroy calls. :func:`open_nvml` gives a
:class:`PynvmlClient` (NVIDIA's ``nvidia-ml-py`` bindings, module ``pynvml``)
where the driver answers and a :class:`NullNvmlClient` elsewhere, so the agent
never fails on a host without NVIDIA. :class:`PynvmlClient` takes the module as
an argument: tests hand it ``agent.testing.nvml.FakeNvml``, which has pynvml's
names, so the production code path is what runs against the fake.

Terms follow NVML (HW_FACTS §9): a GPU-instance *profile* is identified by its
profile **ID** (19, 20, 15, 14, 9, 5, 0 on A100/H100), not the NVML profile
index; placements count memory slices (8 per GPU) as ``nvidia-smi mig
-lgipp`` prints them; GPU-instance ids are assigned by the driver.
"""

from __future__ import annotations

import ctypes
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

_T = TypeVar("_T")

log = logging.getLogger(__name__)


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


class NvmlMigClient(NvmlClient, Protocol):
    """The NVML queries of :class:`NvmlClient` plus the MIG changes actuation makes.

    Methods take a GPU's UUID from :meth:`NvmlClient.gpus`; any may raise
    :class:`NvmlError`, whose message names the ``NVML_ERROR_*`` code
    (``NVML_ERROR_INSUFFICIENT_RESOURCES`` for an occupied placement).
    """

    def create_gpu_instance(self, uuid: str, profile_id: int, placement: MigPlacement) -> int:
        """Create a GPU instance of a profile at exactly ``placement``; its GI id."""
        ...

    def create_compute_instance(self, uuid: str, gi_id: int) -> ComputeInstance:
        """Create one compute instance using the whole GPU instance."""
        ...

    def destroy_compute_instance(self, uuid: str, gi_id: int, ci_id: int) -> None:
        """Destroy a compute instance; one already gone is fine."""
        ...

    def destroy_gpu_instance(self, uuid: str, gi_id: int) -> None:
        """Destroy a GPU instance without compute instances; one already gone is fine."""
        ...


class NullNvmlClient:
    """NVML on a host without an NVIDIA driver: no driver, no GPUs.

    Attributes:
        reason: why NVML is not available (empty when not known).
    """

    def __init__(self, reason: str = "") -> None:
        self.reason = reason

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

    def _unavailable(self) -> NvmlError:
        return NvmlError(f"NVML is not available: {self.reason or 'no NVIDIA driver'}")

    def create_gpu_instance(self, uuid: str, profile_id: int, placement: MigPlacement) -> int:
        """Nothing to create on."""
        raise self._unavailable()

    def create_compute_instance(self, uuid: str, gi_id: int) -> ComputeInstance:
        """Nothing to create on."""
        raise self._unavailable()

    def destroy_compute_instance(self, uuid: str, gi_id: int, ci_id: int) -> None:
        """No instance exists without a driver (MIG instances do not survive one)."""

    def destroy_gpu_instance(self, uuid: str, gi_id: int) -> None:
        """No instance exists without a driver (MIG instances do not survive one)."""


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


#: NVML_ERROR_* codes this module reacts to (nvml.h, NVML API v13). They are
#: stable ABI values, so they are spelled here instead of read from the module
#: handed in, which may be a fake.
_NOT_SUPPORTED = 3
_INVALID_ARGUMENT = 2
_NOT_FOUND = 6
_DRIVER_NOT_LOADED = 9
_LIBRARY_NOT_FOUND = 12
_FUNCTION_NOT_FOUND = 13
#: NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED: the only engine profile.
_ENGINE_PROFILE_SHARED = 0

#: Largest placement / instance buffer NVML could fill: 8 memory slices give at
#: most 8 placements, and a GPU has at most 7 GPU instances (HW_FACTS §9).
_MAX_ENTRIES = 16
#: Bytes per MiB (nvmlMemory_t counts bytes).
_MIB = 1024 * 1024


def _text(value: str | bytes) -> str:
    """Text from pynvml: str for most strings, raw ctypes bytes in some structs."""
    return value.decode() if isinstance(value, bytes) else value


class PynvmlClient:
    """:class:`NvmlClient` over NVIDIA's Python bindings (``pynvml``).

    The caller initialises NVML first (:func:`open_nvml` does). Every
    ``pynvml.NVMLError`` becomes an :class:`NvmlError` named after its
    ``NVML_ERROR_*`` code; "not supported" answers become the domain's
    absences (no MIG, no such profile).

    Args:
        nvml: the ``pynvml`` module, or an object with its names (a fake).
    """

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        # Code -> NVML_ERROR_* name, for messages that name the return code.
        self._names: dict[int, str] = {
            getattr(nvml, n): n
            for n in dir(nvml)
            if n.startswith("NVML_ERROR_") and isinstance(getattr(nvml, n), int)
        }

    def _error(self, err: Exception) -> NvmlError:
        code = getattr(err, "value", None)
        name = self._names.get(code, f"NVML error {code}") if isinstance(code, int) else "?"
        return NvmlError(f"{name}: {err}")

    def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run one NVML call, turning NVMLError into NvmlError."""
        try:
            return fn(*args)
        except self._nvml.NVMLError as err:
            raise self._error(err) from err

    def _handle(self, uuid: str) -> Any:
        return self._call(self._nvml.nvmlDeviceGetHandleByUUID, uuid)

    def driver_version(self) -> str | None:
        """``nvmlSystemGetDriverVersion``."""
        return _text(self._call(self._nvml.nvmlSystemGetDriverVersion))

    def gpus(self) -> Sequence[NvmlGpu]:
        """Every GPU NVML enumerates, in NVML index order."""
        nvml = self._nvml
        out = []
        for index in range(self._call(nvml.nvmlDeviceGetCount)):
            handle = self._call(nvml.nvmlDeviceGetHandleByIndex, index)
            pci = self._call(nvml.nvmlDeviceGetPciInfo, handle)
            memory = self._call(nvml.nvmlDeviceGetMemoryInfo, handle)
            out.append(
                NvmlGpu(
                    uuid=_text(self._call(nvml.nvmlDeviceGetUUID, handle)),
                    name=_text(self._call(nvml.nvmlDeviceGetName, handle)),
                    pci_bus_id=_text(pci.busId),
                    memory_mib=int(memory.total) // _MIB,
                )
            )
        return out

    def mig_mode(self, uuid: str) -> MigModeState | None:
        """``nvmlDeviceGetMigMode``; NOT_SUPPORTED (a non-MIG GPU) is None."""
        handle = self._handle(uuid)
        try:
            current, pending = self._nvml.nvmlDeviceGetMigMode(handle)
        except self._nvml.NVMLError as err:
            # An old driver lacks the entry point: no MIG either.
            if getattr(err, "value", None) in (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND):
                return None
            raise self._error(err) from err
        return MigModeState(current=MigMode(current), pending=MigMode(pending))

    def _placements(self, handle: Any, profile_id: int) -> tuple[MigPlacement, ...]:
        nvml = self._nvml
        buf = (nvml.c_nvmlGpuInstancePlacement_t * _MAX_ENTRIES)()
        count = ctypes.c_uint(_MAX_ENTRIES)
        self._call(
            nvml.nvmlDeviceGetGpuInstancePossiblePlacements,
            handle,
            profile_id,
            buf,
            ctypes.pointer(count),
        )
        return tuple(MigPlacement(p.start, p.size) for p in buf[: count.value])

    def gpu_instance_profiles(self, uuid: str) -> Sequence[GpuInstanceProfile]:
        """Profiles by NVML profile index, each with its possible placements.

        nvml.h: an index the GPU lacks answers NOT_SUPPORTED; past the last
        index NVML answers INVALID_ARGUMENT, which ends the walk.
        """
        nvml = self._nvml
        handle = self._handle(uuid)
        out = []
        for index in range(int(nvml.NVML_GPU_INSTANCE_PROFILE_COUNT)):
            try:
                info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index)
            except nvml.NVMLError as err:
                code = getattr(err, "value", None)
                if code == _NOT_SUPPORTED:
                    continue
                if code == _INVALID_ARGUMENT:
                    break
                raise self._error(err) from err
            name = _text(getattr(info, "name", "") or "").removeprefix("MIG ").strip()
            out.append(
                GpuInstanceProfile(
                    profile_id=int(info.id),
                    name=name or f"{info.sliceCount}g.{int(info.memorySizeMB) // 1024}gb",
                    slice_count=int(info.sliceCount),
                    memory_mib=int(info.memorySizeMB),
                    multiprocessor_count=int(info.multiprocessorCount),
                    placements=self._placements(handle, int(info.id)),
                )
            )
        return out

    def _mig_uuids(self, handle: Any) -> dict[tuple[int, int], str]:
        """(GI id, CI id) -> ``MIG-...`` UUID, through the MIG device handles."""
        nvml = self._nvml
        out: dict[tuple[int, int], str] = {}
        for index in range(self._call(nvml.nvmlDeviceGetMaxMigDeviceCount, handle)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)
            except nvml.NVMLError as err:
                # Indexes past the existing MIG devices are NOT_FOUND.
                if getattr(err, "value", None) == _NOT_FOUND:
                    continue
                raise self._error(err) from err
            gi = self._call(nvml.nvmlDeviceGetGpuInstanceId, mig)
            ci = self._call(nvml.nvmlDeviceGetComputeInstanceId, mig)
            out[(int(gi), int(ci))] = _text(self._call(nvml.nvmlDeviceGetUUID, mig))
        return out

    def _compute_instances(
        self, gi: Any, gi_id: int, uuids: dict[tuple[int, int], str]
    ) -> list[ComputeInstance]:
        nvml = self._nvml
        out = []
        for profile_id in range(int(nvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT)):
            buf = (nvml.c_nvmlComputeInstance_t * _MAX_ENTRIES)()
            count = ctypes.c_uint(_MAX_ENTRIES)
            try:
                nvml.nvmlGpuInstanceGetComputeInstances(gi, profile_id, buf, ctypes.pointer(count))
            except nvml.NVMLError as err:
                if getattr(err, "value", None) in (_NOT_SUPPORTED, _INVALID_ARGUMENT):
                    continue
                raise self._error(err) from err
            for ci in buf[: count.value]:
                info = self._call(nvml.nvmlComputeInstanceGetInfo, ci)
                out.append(
                    ComputeInstance(
                        ci_id=int(info.id),
                        profile_id=int(info.profileId),
                        uuid=uuids.get((gi_id, int(info.id)), ""),
                    )
                )
        return sorted(out, key=lambda c: c.ci_id)

    def gpu_instances(self, uuid: str) -> Sequence[GpuInstance]:
        """GPU instances of every supported profile, with their compute instances."""
        nvml = self._nvml
        handle = self._handle(uuid)
        uuids = self._mig_uuids(handle)
        out = []
        for profile in self.gpu_instance_profiles(uuid):
            buf = (nvml.c_nvmlGpuInstance_t * _MAX_ENTRIES)()
            count = ctypes.c_uint(_MAX_ENTRIES)
            self._call(
                nvml.nvmlDeviceGetGpuInstances,
                handle,
                profile.profile_id,
                buf,
                ctypes.pointer(count),
            )
            for gi in buf[: count.value]:
                info = self._call(nvml.nvmlGpuInstanceGetInfo, gi)
                gi_id = int(info.id)
                out.append(
                    GpuInstance(
                        gi_id=gi_id,
                        profile_id=int(info.profileId),
                        placement=MigPlacement(info.placement.start, info.placement.size),
                        compute_instances=tuple(self._compute_instances(gi, gi_id, uuids)),
                    )
                )
        return sorted(out, key=lambda g: g.gi_id)

    # -- MIG changes -------------------------------------------------------

    def _gpu_instance(self, handle: Any, gi_id: int) -> Any | None:
        """A GPU-instance handle by id; None when it does not exist."""
        try:
            return self._nvml.nvmlDeviceGetGpuInstanceById(handle, gi_id)
        except self._nvml.NVMLError as err:
            if getattr(err, "value", None) == _NOT_FOUND:
                return None
            raise self._error(err) from err

    def create_gpu_instance(self, uuid: str, profile_id: int, placement: MigPlacement) -> int:
        """``nvmlDeviceCreateGpuInstanceWithPlacement``; the new GI's id."""
        nvml = self._nvml
        handle = self._handle(uuid)
        where = nvml.c_nvmlGpuInstancePlacement_t()
        where.start = placement.start
        where.size = placement.size
        gi = self._call(
            nvml.nvmlDeviceCreateGpuInstanceWithPlacement, handle, profile_id, ctypes.byref(where)
        )
        return int(self._call(nvml.nvmlGpuInstanceGetInfo, gi).id)

    def _default_ci_profile(self, handle: Any, gi: Any) -> int:
        """The CI profile ID whose slices are the whole GI's (HW_FACTS §9.2)."""
        nvml = self._nvml
        info = self._call(nvml.nvmlGpuInstanceGetInfo, gi)
        gi_profile = self._call(
            nvml.nvmlDeviceGetGpuInstanceProfileInfoById, handle, int(info.profileId)
        )
        for index in range(int(nvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT)):
            try:
                ci_profile = nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                    gi, index, _ENGINE_PROFILE_SHARED
                )
            except nvml.NVMLError as err:
                # Profiles this GI does not offer (no 3c on a 4g GI).
                if getattr(err, "value", None) in (_NOT_SUPPORTED, _INVALID_ARGUMENT):
                    continue
                raise self._error(err) from err
            if int(ci_profile.sliceCount) == int(gi_profile.sliceCount):
                return int(ci_profile.id)
        raise NvmlError(
            f"GPU instance {int(info.id)} offers no compute-instance profile of "
            f"{int(gi_profile.sliceCount)} slices"
        )

    def create_compute_instance(self, uuid: str, gi_id: int) -> ComputeInstance:
        """``nvmlGpuInstanceCreateComputeInstance`` with the GI's default (whole) CI profile."""
        nvml = self._nvml
        handle = self._handle(uuid)
        gi = self._gpu_instance(handle, gi_id)
        if gi is None:
            raise NvmlError(f"NVML_ERROR_NOT_FOUND: no GPU instance {gi_id}")
        profile_id = self._default_ci_profile(handle, gi)
        ci = self._call(nvml.nvmlGpuInstanceCreateComputeInstance, gi, profile_id)
        ci_id = int(self._call(nvml.nvmlComputeInstanceGetInfo, ci).id)
        return ComputeInstance(
            ci_id=ci_id,
            profile_id=profile_id,
            uuid=self._mig_uuids(handle).get((gi_id, ci_id), ""),
        )

    def destroy_compute_instance(self, uuid: str, gi_id: int, ci_id: int) -> None:
        """``nvmlComputeInstanceDestroy``; a CI or GI already gone is fine."""
        nvml = self._nvml
        gi = self._gpu_instance(self._handle(uuid), gi_id)
        if gi is None:
            return
        try:
            ci = nvml.nvmlGpuInstanceGetComputeInstanceById(gi, ci_id)
        except nvml.NVMLError as err:
            if getattr(err, "value", None) == _NOT_FOUND:
                return
            raise self._error(err) from err
        self._call(nvml.nvmlComputeInstanceDestroy, ci)

    def destroy_gpu_instance(self, uuid: str, gi_id: int) -> None:
        """``nvmlGpuInstanceDestroy``; a GI already gone is fine."""
        gi = self._gpu_instance(self._handle(uuid), gi_id)
        if gi is not None:
            self._call(self._nvml.nvmlGpuInstanceDestroy, gi)


def open_nvml(nvml: Any = None) -> NvmlMigClient:
    """NVML if the driver answers, else a :class:`NullNvmlClient` saying why.

    Never raises for a missing library or driver: a host without NVIDIA is a
    normal host, and discovery reports it as such.

    Args:
        nvml: the module to use; ``pynvml`` when None.

    Returns:
        A :class:`PynvmlClient` after a successful ``nvmlInit``, otherwise a
        :class:`NullNvmlClient` whose ``reason`` names the failure.
    """
    if nvml is None:
        try:
            import pynvml
        except ImportError as err:
            return NullNvmlClient(f"nvidia-ml-py not installed ({err})")
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as err:
        code = getattr(err, "value", None)
        if code == _LIBRARY_NOT_FOUND:
            reason = f"NVML library (libnvidia-ml.so.1) not found: {err}"
        elif code == _DRIVER_NOT_LOADED:
            reason = f"NVIDIA driver not loaded: {err}"
        else:
            reason = f"nvmlInit failed: {err}"
        log.info("NVML unavailable: %s", reason)
        return NullNvmlClient(reason)
    except OSError as err:
        # A broken libnvidia-ml (wrong architecture, missing symbols).
        log.info("NVML unavailable: %s", err)
        return NullNvmlClient(f"NVML library unusable: {err}")
    return PynvmlClient(nvml)
