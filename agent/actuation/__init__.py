"""Host changes the agent makes on the scheduler's behalf, through sysfs writes and NVML."""


class ActuationError(Exception):
    """A host change failed part-way or could not start.

    Each mechanism (VFIO binding, SR-IOV, mdev, MIG) raises its own subclass;
    the service answers every one of them the same way (INTERNAL, after
    rolling its own work back).
    """
