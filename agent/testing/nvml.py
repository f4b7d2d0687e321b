# Names mirror pynvml (camelCase functions, arguments and ctypes types).
# ruff: noqa: N802, N803, N815
"""A fake NVML with nvidia-ml-py's names, for fake hosts and tests.

:class:`FakeNvml` stands in for the ``pynvml`` module: the same function
names, constants, ctypes structures and exception classes (pynvml's own
``NVMLError_*`` classes, so ``except pynvml.NVMLError_InUse`` works), and the
same calling conventions (placements and instance lists are written into a
caller's ctypes array through a count pointer). ``agent.nvml.PynvmlClient``
therefore runs unchanged against it.

The GPUs live in a JSON file in the fake host tree (:data:`STATE_FILE`),
written by the fixture hosts (:func:`write_state`) and re-read on every call,
so a separate agent process given the same root sees the same GPUs and MIG
instances. Each state change of a tree's driver counts as one write for
:mod:`agent.testing.crash`.

Tables are encoded here from the shared reference ``mig_profiles.json`` and
HW_FACTS §9 (MIG User Guide v580, real ``nvidia-smi mig -lgip/-lgipp`` dumps);
nothing reads them at run time. Confidence tags follow HW_FACTS: [C]
confirmed, [I] inferred. Not modelled: processes, compute-instance
placements (no source, [U]), vGPU, and the Hopper no-reset rule.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import threading
import uuid as uuidlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pynvml

from tessera.agent.testing.crash import after_write

_F = TypeVar("_F", bound=Callable[..., Any])


def _mutating(method: _F) -> _F:
    """One state change at a time: read, change and save under the driver's lock.

    The real driver serialises its own state; without this, a thread
    reloading the state file between another's change and its save would
    make that save write the state without the change.
    """

    @functools.wraps(method)
    def locked(self: FakeNvml, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


#: The fake NVML state file in a fake host tree's root.
STATE_FILE = ".tessera-fake-nvml.json"

#: Memory slices per MIG-capable GPU; compute slices per GPU (HW_FACTS §9.1).
MEMORY_SLICES = 8
COMPUTE_SLICES = 7
#: NVML's "no such instance" id in a device handle.
_NONE = 0xFFFFFFFF


@dataclass(frozen=True)
class GiProfile:
    """One GPU-instance profile as ``nvmlDeviceGetGpuInstanceProfileInfo`` gives it.

    Attributes:
        name: ``3g.40gb`` (``+me`` for the media-engine profile).
        index: the ``NVML_GPU_INSTANCE_PROFILE_*`` index (not the ID).
        profile_id: the profile ID every other MIG call takes.
        slice_count: compute slices.
        instance_count: most instances of this profile on one GPU.
        memory_mb: ``memorySizeMB``.
        sm: multiprocessors.
        ce: copy engines.
        dec: decoders.
        jpg: JPEG decoders.
        ofa: optical-flow accelerators.
    """

    name: str
    index: int
    profile_id: int
    slice_count: int
    instance_count: int
    memory_mb: int
    sm: int
    ce: int
    dec: int
    jpg: int
    ofa: int

    @property
    def placements(self) -> tuple[tuple[int, int], ...]:
        """``(start, size)`` in memory slices; the same on A100 and H100 [C]."""
        return PLACEMENTS[self.profile_id]


#: Possible placements per profile ID (``nvidia-smi mig -lgipp``) [C].
PLACEMENTS: Mapping[int, tuple[tuple[int, int], ...]] = {
    19: tuple((s, 1) for s in range(7)),
    20: tuple((s, 1) for s in range(7)),
    15: ((0, 2), (2, 2), (4, 2), (6, 2)),
    14: ((0, 2), (2, 2), (4, 2)),
    9: ((0, 4), (4, 4)),
    5: ((0, 4),),
    0: ((0, 8),),
}


@dataclass(frozen=True)
class GpuModel:
    """A GPU model the fake driver knows.

    Attributes:
        name: ``nvmlDeviceGetName``.
        pci_device_id: ``pciDeviceId`` as NVML gives it, ``(device << 16) | 0x10de``.
        memory_mib: framebuffer total (nvidia-smi's MiB).
        profiles: GPU-instance profiles; empty for a GPU without MIG.
    """

    name: str
    pci_device_id: int
    memory_mib: int
    profiles: tuple[GiProfile, ...]

    @property
    def mig_capable(self) -> bool:
        """Whether the GPU can do MIG."""
        return bool(self.profiles)


def _p(*row: Any) -> GiProfile:
    return GiProfile(*row)


#: mig_profiles.json ``A100-SXM4-40GB`` [C]:
#: name, NVML index, ID, slices, max instances, memory MB, SM, CE, DEC, JPG, OFA.
A100_SXM4_40GB = GpuModel(
    "NVIDIA A100-SXM4-40GB",
    0x20B010DE,
    40537,
    (
        _p("1g.5gb", 0, 19, 1, 7, 4864, 14, 1, 0, 0, 0),
        _p("1g.5gb+me", 7, 20, 1, 1, 4864, 14, 1, 1, 1, 1),
        _p("1g.10gb", 9, 15, 1, 4, 9856, 14, 1, 1, 0, 0),
        _p("2g.10gb", 1, 14, 2, 3, 9856, 28, 2, 1, 0, 0),
        _p("3g.20gb", 2, 9, 3, 2, 19968, 42, 3, 2, 0, 0),
        _p("4g.20gb", 3, 5, 4, 1, 19968, 56, 4, 2, 0, 0),
        _p("7g.40gb", 4, 0, 7, 1, 40192, 98, 7, 5, 1, 1),
    ),
)

#: mig_profiles.json ``A100-80GB`` (PCIe 0x20b5) [C]; 1g.20gb memory is not
#: observed and is taken equal to 2g.20gb's, as 1g.10gb equals 2g.10gb on the
#: 40 GB part [I].
A100_80GB_PCIE = GpuModel(
    "NVIDIA A100 80GB PCIe",
    0x20B510DE,
    81920,
    (
        _p("1g.10gb", 0, 19, 1, 7, 9728, 14, 1, 0, 0, 0),
        _p("1g.10gb+me", 7, 20, 1, 1, 9728, 14, 1, 1, 1, 1),
        _p("1g.20gb", 9, 15, 1, 4, 19968, 14, 1, 1, 0, 0),
        _p("2g.20gb", 1, 14, 2, 3, 19968, 28, 2, 1, 0, 0),
        _p("3g.40gb", 2, 9, 3, 2, 40192, 42, 3, 2, 0, 0),
        _p("4g.40gb", 3, 5, 4, 1, 40192, 56, 4, 2, 0, 0),
        _p("7g.80gb", 4, 0, 7, 1, 80896, 98, 7, 5, 1, 1),
    ),
)

#: mig_profiles.json ``H100-SXM5-80GB`` (real lgip on "NVIDIA H100 80GB HBM3") [C].
H100_80GB_HBM3 = GpuModel(
    "NVIDIA H100 80GB HBM3",
    0x233010DE,
    81559,
    (
        _p("1g.10gb", 0, 19, 1, 7, 9984, 16, 1, 1, 1, 0),
        _p("1g.10gb+me", 7, 20, 1, 1, 9984, 16, 1, 1, 1, 1),
        _p("1g.20gb", 9, 15, 1, 4, 20096, 26, 1, 1, 1, 0),
        _p("2g.20gb", 1, 14, 2, 3, 20096, 32, 2, 2, 2, 0),
        _p("3g.40gb", 2, 9, 3, 2, 40448, 60, 3, 3, 3, 0),
        _p("4g.40gb", 3, 5, 4, 1, 40448, 64, 4, 4, 4, 0),
        _p("7g.80gb", 4, 0, 7, 1, 81152, 132, 8, 7, 7, 1),
    ),
)

#: GPUs without MIG; names as nvidia-smi prints them, memory [I].
TESLA_P4 = GpuModel("Tesla P4", 0x1BB310DE, 7611, ())
RTX_A6000 = GpuModel("NVIDIA RTX A6000", 0x223010DE, 49140, ())

#: Model key (as the state file names it) -> model.
MODELS: Mapping[str, GpuModel] = {
    "A100-SXM4-40GB": A100_SXM4_40GB,
    "A100-80GB-PCIe": A100_80GB_PCIE,
    "H100-80GB-HBM3": H100_80GB_HBM3,
    "Tesla-P4": TESLA_P4,
    "RTX-A6000": RTX_A6000,
}

#: Compute-instance profiles a GI of N compute slices offers: CI profile ID
#: -> most instances (A100-40GB ``-lcip`` [C]; 7g counts and other GPUs [I]).
CI_PROFILES: Mapping[int, Mapping[int, int]] = {
    1: {0: 1},
    2: {0: 2, 1: 1},
    3: {0: 3, 1: 1, 2: 1},
    4: {0: 4, 1: 2, 3: 1},
    7: {0: 7, 1: 3, 2: 2, 3: 1, 4: 1},
}
#: Compute slices of a CI profile ID (``NVML_COMPUTE_INSTANCE_PROFILE_*``).
CI_SLICES: Mapping[int, int] = {0: 1, 1: 2, 2: 3, 3: 4, 4: 7}


def nvml_bus_id(address: str) -> str:
    """A sysfs address (``0000:4b:00.0``) in NVML's form (``00000000:4B:00.0``)."""
    domain, _, rest = address.partition(":")
    return f"{int(domain, 16):08X}:{rest.upper()}"


def fake_gpu(
    model: str,
    address: str,
    *,
    seed: str,
    mig_enabled: bool = False,
    reset_required: bool = False,
) -> dict[str, Any]:
    """One GPU entry of the state file.

    Args:
        model: a key of :data:`MODELS`.
        address: sysfs PCI address, ``0000:4b:00.0``.
        seed: makes the UUID stable per host (the host name).
        mig_enabled: MIG mode at "boot" (ignored for a GPU without MIG).
        reset_required: a mode change stays pending, as in a passthrough VM.

    Raises:
        KeyError: unknown model.
    """
    spec = MODELS[model]
    mode = int(mig_enabled) if spec.mig_capable else None
    gpu_uuid = uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"tessera-fake-gpu:{seed}:{address}")
    return {
        "model": model,
        "uuid": f"GPU-{gpu_uuid}",
        "bus_id": nvml_bus_id(address),
        "mig_current": mode,
        "mig_pending": mode,
        "reset_required": reset_required,
        "instances": [],
    }


def write_state(
    root: Path, gpus: Sequence[dict[str, Any]], driver_version: str = "550.54.15"
) -> None:
    """Write the fake driver's state into a fake host tree (atomically)."""
    _write(root / STATE_FILE, {"driver_version": driver_version, "gpus": list(gpus)})


def _write(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, path)


class _Device(ctypes.Structure):
    """A device handle: a GPU index, or a MIG device (its GI and CI ids)."""

    _fields_ = [
        ("index", ctypes.c_uint),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    ]


class _GpuInstance(ctypes.Structure):
    """A GPU-instance handle (opaque in pynvml; here by value)."""

    _fields_ = [("device", ctypes.c_uint), ("id", ctypes.c_uint)]


class _ComputeInstance(ctypes.Structure):
    """A compute-instance handle (opaque in pynvml; here by value)."""

    _fields_ = [
        ("device", ctypes.c_uint),
        ("gpuInstance", ctypes.c_uint),
        ("id", ctypes.c_uint),
    ]


class _GpuInstanceInfo(ctypes.Structure):
    """pynvml's ``c_nvmlGpuInstanceInfo_t`` fields, with this fake's handle type."""

    _fields_ = [
        ("device", _Device),
        ("id", ctypes.c_uint),
        ("profileId", ctypes.c_uint),
        ("placement", pynvml.c_nvmlGpuInstancePlacement_t),
    ]


class _ComputeInstanceInfo(ctypes.Structure):
    """pynvml's ``c_nvmlComputeInstanceInfo_t`` fields, with this fake's handle types."""

    _fields_ = [
        ("device", _Device),
        ("gpuInstance", _GpuInstance),
        ("id", ctypes.c_uint),
        ("profileId", ctypes.c_uint),
        ("placement", pynvml.c_nvmlComputeInstancePlacement_t),
    ]


def _error(code: int) -> Exception:
    """The pynvml exception for a return code (``NVMLError(3)`` is ``NVMLError_NotSupported``)."""
    err: Exception = pynvml.NVMLError(code)
    return err


def _ref(count_ref: Any) -> Any:
    """The ``c_uint`` behind ``ctypes.pointer(c)`` or ``ctypes.byref(c)``."""
    return count_ref.contents if hasattr(count_ref, "contents") else count_ref._obj


class FakeNvml:
    """The ``pynvml`` module's MIG-relevant surface over a fake driver state.

    Build with :meth:`from_tree` (state in a fake host tree, shared with
    other processes) or :meth:`in_memory`. Call ``nvmlInit`` first, as with
    pynvml; until then every call raises ``NVMLError_Uninitialized``.
    """

    # Return codes and MIG constants: pynvml's own values (nvml.h, API v13).
    NVML_SUCCESS = pynvml.NVML_SUCCESS
    NVML_DEVICE_MIG_DISABLE = pynvml.NVML_DEVICE_MIG_DISABLE
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
    NVML_GPU_INSTANCE_PROFILE_COUNT = pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT
    NVML_COMPUTE_INSTANCE_PROFILE_COUNT = pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT
    NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED = pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
    NVML_ERROR_UNINITIALIZED = pynvml.NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = pynvml.NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
    NVML_ERROR_INSUFFICIENT_SIZE = pynvml.NVML_ERROR_INSUFFICIENT_SIZE
    NVML_ERROR_DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_RESET_REQUIRED = pynvml.NVML_ERROR_RESET_REQUIRED
    NVML_ERROR_IN_USE = pynvml.NVML_ERROR_IN_USE
    NVML_ERROR_INSUFFICIENT_RESOURCES = pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES

    # pynvml's exception classes, so callers catch exactly what they would.
    NVMLError = pynvml.NVMLError
    NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
    NVMLError_InvalidArgument = pynvml.NVMLError_InvalidArgument
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_NotFound = pynvml.NVMLError_NotFound
    NVMLError_InsufficientSize = pynvml.NVMLError_InsufficientSize
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_InUse = pynvml.NVMLError_InUse
    NVMLError_InsufficientResources = pynvml.NVMLError_InsufficientResources
    NVMLError_ResetRequired = pynvml.NVMLError_ResetRequired

    # Structures: pynvml's where they hold no handle, this module's otherwise.
    c_nvmlGpuInstancePlacement_t = pynvml.c_nvmlGpuInstancePlacement_t
    c_nvmlGpuInstanceProfileInfo_t = pynvml.c_nvmlGpuInstanceProfileInfo_t
    c_nvmlGpuInstanceProfileInfo_v2_t = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t
    c_nvmlMemory_t = pynvml.c_nvmlMemory_t
    c_nvmlComputeInstanceProfileInfo_v2_t = pynvml.c_nvmlComputeInstanceProfileInfo_v2_t
    nvmlPciInfo_t = pynvml.nvmlPciInfo_t
    c_nvmlDevice_t = _Device
    c_nvmlGpuInstance_t = _GpuInstance
    c_nvmlComputeInstance_t = _ComputeInstance
    c_nvmlGpuInstanceInfo_t = _GpuInstanceInfo
    c_nvmlComputeInstanceInfo_t = _ComputeInstanceInfo

    def __init__(self, state: dict[str, Any], path: Path | None = None) -> None:
        self._state = state
        self._path = path
        self._initialized = 0
        self._lock = threading.RLock()

    @classmethod
    def from_tree(cls, root: Path) -> FakeNvml:
        """The fake driver of a fake host tree (its :data:`STATE_FILE`).

        Raises:
            FileNotFoundError: the tree has no NVML state.
        """
        path = root / STATE_FILE
        return cls(json.loads(path.read_text()), path)

    @classmethod
    def in_memory(
        cls, gpus: Sequence[dict[str, Any]], driver_version: str = "550.54.15"
    ) -> FakeNvml:
        """A fake driver whose state lives only in this object."""
        return cls({"driver_version": driver_version, "gpus": list(gpus)})

    # -- state ---------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        if not self._initialized:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        if self._path is not None:
            # Another process (an agent, a test) may have changed the GPUs.
            with self._lock:
                self._state = json.loads(self._path.read_text())
        return self._state

    def _save(self) -> None:
        if self._path is not None:
            _write(self._path, self._state)
            # Every state change saves once: count it (and maybe crash).
            after_write(self._path.parent)

    def _gpu(self, handle: Any) -> tuple[dict[str, Any], GpuModel]:
        gpus = self._load()["gpus"]
        index = getattr(handle, "index", None)
        if not isinstance(index, int) or not 0 <= index < len(gpus):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = gpus[index]
        return gpu, MODELS[gpu["model"]]

    def _mig_gpu(self, handle: Any) -> tuple[dict[str, Any], GpuModel]:
        gpu, model = self._gpu(handle)
        if not model.mig_capable:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu, model

    def _enabled_gpu(self, handle: Any) -> tuple[dict[str, Any], GpuModel]:
        gpu, model = self._mig_gpu(handle)
        if gpu["mig_current"] != pynvml.NVML_DEVICE_MIG_ENABLE:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu, model

    @staticmethod
    def _profile_by_id(model: GpuModel, profile_id: int) -> GiProfile:
        for p in model.profiles:
            if p.profile_id == profile_id:
                return p
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def _gi(self, gi: Any) -> tuple[dict[str, Any], GpuModel, dict[str, Any]]:
        gpu, model = self._enabled_gpu(_Device(gi.device, _NONE, _NONE))
        for inst in gpu["instances"]:
            if inst["id"] == gi.id:
                return gpu, model, inst
        raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    # -- library ---------------------------------------------------------------

    def nvmlInit(self) -> None:
        """Initialise (counted, as NVML's init/shutdown pairs are)."""
        self._initialized += 1

    def nvmlShutdown(self) -> None:
        """Undo one :meth:`nvmlInit`."""
        if not self._initialized:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        self._initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        """The driver version string."""
        return str(self._load()["driver_version"])

    # -- devices ---------------------------------------------------------------

    def nvmlDeviceGetCount(self) -> int:
        """GPUs the driver manages."""
        return len(self._load()["gpus"])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Device:
        """A GPU's handle (NVML index = PCI bus order)."""
        if not 0 <= index < self.nvmlDeviceGetCount():
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _Device(index, _NONE, _NONE)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> _Device:
        """A GPU's handle by ``GPU-...`` UUID."""
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        for index, gpu in enumerate(self._load()["gpus"]):
            if gpu["uuid"] == text:
                return _Device(index, _NONE, _NONE)
        raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetName(self, handle: Any) -> str:
        """``NVIDIA A100 80GB PCIe``."""
        return self._gpu(handle)[1].name

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        """``GPU-...``, or a MIG device's ``MIG-...``."""
        gpu, _ = self._gpu(handle)
        if handle.gpuInstanceId == _NONE:
            return str(gpu["uuid"])
        for inst in gpu["instances"]:
            for ci in inst["cis"]:
                if (inst["id"], ci["id"]) == (handle.gpuInstanceId, handle.computeInstanceId):
                    return str(ci["uuid"])
        raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        """PCI info; ``busId`` in NVML's form (``00000000:4B:00.0``)."""
        gpu, model = self._gpu(handle)
        info = pynvml.nvmlPciInfo_t()
        bus_id = gpu["bus_id"]
        info.busId = bus_id.encode()
        info.busIdLegacy = bus_id[4:].encode()
        info.domain = int(bus_id[:8], 16)
        info.bus = int(bus_id[9:11], 16)
        info.device = int(bus_id[12:14], 16)
        info.pciDeviceId = model.pci_device_id
        return info

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        """Framebuffer memory in bytes, all free."""
        _, model = self._gpu(handle)
        total = model.memory_mib * 1024 * 1024
        return pynvml.c_nvmlMemory_t(total=total, free=total, used=0)

    # -- MIG mode --------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        """``[current, pending]``; NOT_SUPPORTED on a GPU without MIG."""
        gpu, _ = self._mig_gpu(handle)
        return [int(gpu["mig_current"]), int(gpu["mig_pending"])]

    @_mutating
    def nvmlDeviceSetMigMode(self, handle: Any, mode: int) -> int:
        """Set MIG mode; returns the activation status.

        The "GPU reset" is immediate unless the GPU was built with
        ``reset_required`` (a passthrough VM): then the change stays pending
        and the status is ``NVML_ERROR_RESET_REQUIRED``.

        Raises:
            NVMLError_InUse: disabling MIG while GPU instances exist.
        """
        gpu, _ = self._mig_gpu(handle)
        if mode not in (pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_ENABLE):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if mode == pynvml.NVML_DEVICE_MIG_DISABLE and gpu["instances"]:
            raise _error(pynvml.NVML_ERROR_IN_USE)
        gpu["mig_pending"] = mode
        status = pynvml.NVML_SUCCESS
        if gpu["reset_required"]:
            status = pynvml.NVML_ERROR_RESET_REQUIRED
        else:
            gpu["mig_current"] = mode
        self._save()
        return int(status)

    # -- GPU-instance profiles -------------------------------------------------

    def nvmlDeviceGetGpuInstanceProfileInfo(
        self, handle: Any, profile: int, version: int = 2
    ) -> Any:
        """Profile info by NVML profile **index**; ``.id`` is the profile ID.

        Answers whatever the MIG mode, as the possible placements do.
        """
        _, model = self._mig_gpu(handle)
        if not 0 <= profile < pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for p in model.profiles:
            if p.index == profile:
                return self._profile_info(p, version)
        raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetGpuInstanceProfileInfoById(self, handle: Any, profileId: int) -> Any:
        """Profile info (v2) by profile ID."""
        _, model = self._mig_gpu(handle)
        return self._profile_info(self._profile_by_id(model, profileId), 2)

    @staticmethod
    def _profile_info(p: GiProfile, version: int) -> Any:
        info: Any
        if version == 2:
            info = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t()
            # The name as nvidia-smi -lgip prints it ("MIG 1g.5gb") [I].
            info.name = f"MIG {p.name}".encode()
        elif version == 1:
            info = pynvml.c_nvmlGpuInstanceProfileInfo_t()
        else:
            raise _error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        info.id = p.profile_id
        info.isP2pSupported = 0
        info.sliceCount = p.slice_count
        info.instanceCount = p.instance_count
        info.multiprocessorCount = p.sm
        info.copyEngineCount = p.ce
        info.decoderCount = p.dec
        info.encoderCount = 0
        info.jpegCount = p.jpg
        info.ofaCount = p.ofa
        info.memorySizeMB = p.memory_mb
        return info

    def nvmlDeviceGetGpuInstancePossiblePlacements(
        self,
        handle: Any,
        profileId: int,
        placementsRef: Any,
        countRef: Any,
    ) -> int:
        """Every placement of a profile, occupied or not, into the caller's array."""
        _, model = self._mig_gpu(handle)
        placements = self._profile_by_id(model, profileId).placements
        count = _ref(countRef)
        if count.value < len(placements):
            count.value = len(placements)
            raise _error(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
        for i, (start, size) in enumerate(placements):
            placementsRef[i].start = start
            placementsRef[i].size = size
        count.value = len(placements)
        return int(pynvml.NVML_SUCCESS)

    # -- GPU instances ---------------------------------------------------------

    @staticmethod
    def _fits(model: GpuModel, gpu: dict[str, Any], p: GiProfile, start: int, size: int) -> bool:
        """Whether a new instance of ``p`` at ``start`` leaves every limit kept."""
        insts = gpu["instances"]
        if sum(1 for i in insts if i["profile_id"] == p.profile_id) >= p.instance_count:
            return False
        used = sum(FakeNvml._profile_by_id(model, i["profile_id"]).slice_count for i in insts)
        if used + p.slice_count > COMPUTE_SLICES:
            return False
        taken = {s for i in insts for s in range(i["start"], i["start"] + i["size"])}
        return not taken & set(range(start, start + size))

    @_mutating
    def _create_gi(
        self, handle: Any, profile_id: int, placement: tuple[int, int] | None
    ) -> _GpuInstance:
        gpu, model = self._enabled_gpu(handle)
        p = self._profile_by_id(model, profile_id)
        if placement is not None:
            if placement not in p.placements:
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if not self._fits(model, gpu, p, *placement):
                raise _error(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
            start, size = placement
        else:
            # The driver's choice is unspecified; the highest free start was
            # observed first for 1g/2g/3g (HW_FACTS §9.4) [I].
            free = [pl for pl in p.placements if self._fits(model, gpu, p, *pl)]
            if not free:
                raise _error(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
            start, size = max(free)
        # GI ids are the driver's: the lowest unused one, whatever the
        # placement (real drivers differ; callers must not assume either).
        ids = {i["id"] for i in gpu["instances"]}
        gi_id = min(n for n in range(1, 64) if n not in ids)
        gpu["instances"].append(
            {"id": gi_id, "profile_id": profile_id, "start": start, "size": size, "cis": []}
        )
        self._save()
        return _GpuInstance(handle.index, gi_id)

    def nvmlDeviceCreateGpuInstance(self, handle: Any, profileId: int) -> _GpuInstance:
        """Create a GPU instance where the driver chooses."""
        return self._create_gi(handle, profileId, None)

    def nvmlDeviceCreateGpuInstanceWithPlacement(
        self,
        handle: Any,
        profileId: int,
        placement: Any,
    ) -> _GpuInstance:
        """Create a GPU instance at a placement (a struct, or ``byref`` of one)."""
        pl = getattr(placement, "_obj", placement)
        return self._create_gi(handle, profileId, (int(pl.start), int(pl.size)))

    def nvmlDeviceGetGpuInstanceRemainingCapacity(self, handle: Any, profileId: int) -> int:
        """How many more instances of a profile fit now."""
        gpu, model = self._enabled_gpu(handle)
        p = self._profile_by_id(model, profileId)
        trial = {"instances": list(gpu["instances"])}
        n = 0
        for start, size in p.placements:
            if self._fits(model, trial, p, start, size):
                trial["instances"].append(
                    {"id": 0, "profile_id": profileId, "start": start, "size": size}
                )
                n += 1
        return n

    def nvmlDeviceGetGpuInstances(
        self,
        handle: Any,
        profileId: int,
        gpuInstancesRef: Any,
        countRef: Any,
    ) -> int:
        """The GPU instances of one profile, into the caller's handle array."""
        gpu, model = self._enabled_gpu(handle)
        self._profile_by_id(model, profileId)
        found = sorted(i["id"] for i in gpu["instances"] if i["profile_id"] == profileId)
        count = _ref(countRef)
        if count.value < len(found):
            count.value = len(found)
            raise _error(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
        for k, gi_id in enumerate(found):
            gpuInstancesRef[k] = _GpuInstance(handle.index, gi_id)
        count.value = len(found)
        return int(pynvml.NVML_SUCCESS)

    def nvmlDeviceGetGpuInstanceById(self, handle: Any, id: int) -> _GpuInstance:
        """A GPU instance's handle by its id."""
        gpu, _ = self._enabled_gpu(handle)
        if not any(i["id"] == id for i in gpu["instances"]):
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)
        return _GpuInstance(handle.index, id)

    def nvmlGpuInstanceGetInfo(self, gpuInstance: Any) -> _GpuInstanceInfo:
        """The id, profileId and placement of a GPU instance."""
        _, _, inst = self._gi(gpuInstance)
        info = _GpuInstanceInfo()
        info.device = _Device(gpuInstance.device, _NONE, _NONE)
        info.id = inst["id"]
        info.profileId = inst["profile_id"]
        info.placement.start = inst["start"]
        info.placement.size = inst["size"]
        return info

    @_mutating
    def nvmlGpuInstanceDestroy(self, gpuInstance: Any) -> int:
        """Destroy a GPU instance.

        Raises:
            NVMLError_InUse: it still holds compute instances.
        """
        gpu, _, inst = self._gi(gpuInstance)
        if inst["cis"]:
            raise _error(pynvml.NVML_ERROR_IN_USE)
        gpu["instances"].remove(inst)
        self._save()
        return int(pynvml.NVML_SUCCESS)

    # -- compute instances -----------------------------------------------------

    @_mutating
    def nvmlGpuInstanceCreateComputeInstance(
        self,
        gpuInstance: Any,
        profileId: int,
    ) -> _ComputeInstance:
        """Create a compute instance in a GPU instance."""
        _, model, inst = self._gi(gpuInstance)
        if not 0 <= profileId < pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gi_slices = self._profile_by_id(model, inst["profile_id"]).slice_count
        offered = CI_PROFILES[gi_slices]
        if profileId not in offered:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        cis = inst["cis"]
        used = sum(CI_SLICES[c["profile_id"]] for c in cis)
        same = sum(1 for c in cis if c["profile_id"] == profileId)
        if used + CI_SLICES[profileId] > gi_slices or same >= offered[profileId]:
            raise _error(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
        ids = {c["id"] for c in cis}
        ci_id = min(n for n in range(64) if n not in ids)
        cis.append({"id": ci_id, "profile_id": profileId, "uuid": f"MIG-{uuidlib.uuid4()}"})
        self._save()
        return _ComputeInstance(gpuInstance.device, inst["id"], ci_id)

    def nvmlGpuInstanceGetComputeInstanceProfileInfo(
        self,
        gpuInstance: Any,
        profile: int,
        engProfile: int,
        version: int = 2,
    ) -> Any:
        """A compute-instance profile of a GPU instance (v2 struct).

        ``.id`` is the CI profile ID and ``.sliceCount`` its compute slices.
        NOT_SUPPORTED for a CI profile the GI does not offer (HW_FACTS §9.2:
        no 3-slice CI on a 4g GI).
        """
        _, model, inst = self._gi(gpuInstance)
        if version != 2:
            raise _error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        if not 0 <= profile < pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if engProfile != pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        offered = CI_PROFILES[self._profile_by_id(model, inst["profile_id"]).slice_count]
        if profile not in offered:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        info = pynvml.c_nvmlComputeInstanceProfileInfo_v2_t()
        info.id = profile
        info.sliceCount = CI_SLICES[profile]
        info.instanceCount = offered[profile]
        info.name = f"MIG {CI_SLICES[profile]}c".encode()
        return info

    def nvmlGpuInstanceGetComputeInstanceById(
        self, gpuInstance: Any, computeInstanceId: int
    ) -> _ComputeInstance:
        """A compute instance's handle by its id; NOT_FOUND when there is none."""
        _, _, inst = self._gi(gpuInstance)
        if not any(c["id"] == computeInstanceId for c in inst["cis"]):
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)
        return _ComputeInstance(gpuInstance.device, inst["id"], computeInstanceId)

    def nvmlGpuInstanceGetComputeInstances(
        self,
        gpuInstance: Any,
        profileId: int,
        computeInstancesRef: Any,
        countRef: Any,
    ) -> int:
        """The compute instances of one CI profile, into the caller's array."""
        _, model, inst = self._gi(gpuInstance)
        if not 0 <= profileId < pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if profileId not in CI_PROFILES[self._profile_by_id(model, inst["profile_id"]).slice_count]:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        found = sorted(c["id"] for c in inst["cis"] if c["profile_id"] == profileId)
        count = _ref(countRef)
        if count.value < len(found):
            count.value = len(found)
            raise _error(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
        for k, ci_id in enumerate(found):
            computeInstancesRef[k] = _ComputeInstance(gpuInstance.device, inst["id"], ci_id)
        count.value = len(found)
        return int(pynvml.NVML_SUCCESS)

    def _ci(self, ci: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        _, _, inst = self._gi(_GpuInstance(ci.device, ci.gpuInstance))
        for c in inst["cis"]:
            if c["id"] == ci.id:
                return inst, c
        raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlComputeInstanceGetInfo(self, computeInstance: Any) -> _ComputeInstanceInfo:
        """The id and profileId of a compute instance."""
        inst, c = self._ci(computeInstance)
        info = _ComputeInstanceInfo()
        info.device = _Device(computeInstance.device, _NONE, _NONE)
        info.gpuInstance = _GpuInstance(computeInstance.device, inst["id"])
        info.id = c["id"]
        info.profileId = c["profile_id"]
        return info

    @_mutating
    def nvmlComputeInstanceDestroy(self, computeInstance: Any) -> int:
        """Destroy a compute instance."""
        inst, c = self._ci(computeInstance)
        inst["cis"].remove(c)
        self._save()
        return int(pynvml.NVML_SUCCESS)

    # -- MIG devices -----------------------------------------------------------

    def _mig_devices(self, handle: Any) -> list[tuple[int, int]]:
        gpu, _ = self._mig_gpu(handle)
        return sorted((i["id"], c["id"]) for i in gpu["instances"] for c in i["cis"])

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        """At most one MIG device per compute slice."""
        self._mig_gpu(handle)
        return COMPUTE_SLICES

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> _Device:
        """The ``index``-th MIG device (a compute instance); NOT_FOUND past the last."""
        devices = self._mig_devices(handle)
        if not 0 <= index < len(devices):
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)
        gi_id, ci_id = devices[index]
        return _Device(handle.index, gi_id, ci_id)

    def nvmlDeviceGetGpuInstanceId(self, handle: Any) -> int:
        """A MIG device's GI id; INVALID_ARGUMENT for a whole GPU."""
        if handle.gpuInstanceId == _NONE:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(handle.gpuInstanceId)

    def nvmlDeviceGetComputeInstanceId(self, handle: Any) -> int:
        """A MIG device's CI id; INVALID_ARGUMENT for a whole GPU."""
        if handle.computeInstanceId == _NONE:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(handle.computeInstanceId)


# Every other NVML_ERROR_* code and NVMLError_* class, so the fake names all of
# pynvml's errors (PynvmlClient names codes from the module it is given).
for _name in dir(pynvml):
    if _name.startswith(("NVML_ERROR_", "NVMLError_")) and not hasattr(FakeNvml, _name):
        setattr(FakeNvml, _name, getattr(pynvml, _name))
