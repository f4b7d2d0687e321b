"""Creating and destroying MIG partitions through NVML (HW_FACTS §9).

A MIG slot becomes one GPU instance at exactly the placement the scheduler
chose, holding one compute instance that uses the whole GPU instance. GI ids
are the driver's and are reused after a GI is destroyed (and after a reboot,
which destroys every GI), so an id from the checkpoint is trusted only while
the GI it names still has the recorded profile and placement: the agent
never destroys a partition it cannot show is its own.
"""

from __future__ import annotations

from tessera.agent.actuation import ActuationError
from tessera.agent.nvml import (
    ComputeInstance,
    GpuInstance,
    GpuInstanceProfile,
    MigMode,
    MigPlacement,
    NvmlError,
    NvmlGpu,
    NvmlMigClient,
    sysfs_address,
)


class MigActuationError(ActuationError):
    """An NVML call creating or destroying a MIG partition failed.

    Attributes:
        gpu: the GPU's PCI address.
        step: ``gpu_instance``, ``compute_instance`` or ``destroy``.
    """

    def __init__(self, gpu: str, step: str, message: str) -> None:
        super().__init__(f"{gpu}: mig {step}: {message}")
        self.gpu = gpu
        self.step = step


class MigPartitioner:
    """MIG partitions of one host's GPUs.

    Args:
        nvml: the host's NVML (a :class:`agent.nvml.NullNvmlClient` without a
            driver: no GPU is found, nothing can be created).
    """

    def __init__(self, nvml: NvmlMigClient) -> None:
        self._nvml = nvml

    def gpu(self, address: str) -> NvmlGpu | None:
        """The GPU NVML manages at a PCI address (sysfs form); None if none.

        Raises:
            NvmlError: NVML failed to list its GPUs.
        """
        for gpu in self._nvml.gpus():
            if sysfs_address(gpu.pci_bus_id) == address:
                return gpu
        return None

    def mig_enabled(self, gpu: NvmlGpu) -> bool:
        """Whether MIG mode is on now (not merely pending a reset)."""
        mode = self._nvml.mig_mode(gpu.uuid)
        return mode is not None and mode.current is MigMode.ENABLED

    def profile(self, gpu: NvmlGpu, profile_id: int) -> GpuInstanceProfile | None:
        """A GPU-instance profile of the GPU by profile ID; None if it has none."""
        for profile in self._nvml.gpu_instance_profiles(gpu.uuid):
            if profile.profile_id == profile_id:
                return profile
        return None

    def instances(self, gpu: NvmlGpu) -> list[GpuInstance]:
        """The GPU instances that exist now."""
        return list(self._nvml.gpu_instances(gpu.uuid))

    def instance_at(
        self, gpu: NvmlGpu, profile_id: int, placement: MigPlacement
    ) -> GpuInstance | None:
        """The GPU instance of that profile at exactly that placement, if any."""
        for gi in self.instances(gpu):
            if gi.profile_id == profile_id and gi.placement == placement:
                return gi
        return None

    def create_gpu_instance(
        self, gpu: NvmlGpu, address: str, profile_id: int, placement: MigPlacement
    ) -> int:
        """Create the GPU instance at exactly ``placement``; its GI id.

        Raises:
            MigActuationError: NVML refused (``INSUFFICIENT_RESOURCES`` when
                the slices are taken, ...).
        """
        try:
            return self._nvml.create_gpu_instance(gpu.uuid, profile_id, placement)
        except NvmlError as err:
            raise MigActuationError(
                address,
                "gpu_instance",
                f"profile {profile_id} at slices {placement.start}+{placement.size}: {err}",
            ) from err

    def create_compute_instance(self, gpu: NvmlGpu, address: str, gi_id: int) -> ComputeInstance:
        """Create the compute instance using the whole GPU instance ``gi_id``.

        Raises:
            MigActuationError: NVML refused.
        """
        try:
            return self._nvml.create_compute_instance(gpu.uuid, gi_id)
        except NvmlError as err:
            raise MigActuationError(
                address, "compute_instance", f"in GPU instance {gi_id}: {err}"
            ) from err

    def destroy(
        self, gpu_uuid: str, address: str, profile_id: int, placement: MigPlacement, gi_id: int
    ) -> None:
        """Destroy the GPU instance (its compute instances first) if it is still there.

        ``gi_id`` is the id recorded when it was created, or -1 when a crash
        came before it was recorded; either way the GI must still have
        ``profile_id`` and ``placement`` to be destroyed. Idempotent.

        Raises:
            MigActuationError: NVML refused (``IN_USE``: a process holds it).
        """
        try:
            found = [
                gi
                for gi in self._nvml.gpu_instances(gpu_uuid)
                if gi.profile_id == profile_id
                and gi.placement == placement
                and gi_id in (-1, gi.gi_id)
            ]
            for gi in found:
                # CIs before their GI: NVML refuses a GI that still has any.
                for ci in gi.compute_instances:
                    self._nvml.destroy_compute_instance(gpu_uuid, gi.gi_id, ci.ci_id)
                self._nvml.destroy_gpu_instance(gpu_uuid, gi.gi_id)
        except NvmlError as err:
            raise MigActuationError(
                address,
                "destroy",
                f"GPU instance of profile {profile_id} at slices "
                f"{placement.start}+{placement.size}: {err}",
            ) from err
