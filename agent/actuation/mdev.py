"""Creating and removing mediated devices (HW_FACTS §7).

An mdev is created by writing its UUID to
``/sys/class/mdev_bus/<parent>/mdev_supported_types/<type>/create`` and
removed by writing 1 to ``/sys/bus/mdev/devices/<uuid>/remove``. The UUID is
chosen by the scheduler, so a retried create finds its own device and adopts
it instead of failing with EEXIST.
"""

from __future__ import annotations

import errno as errnos
import os
from pathlib import Path

from tessera.agent.actuation import ActuationError
from tessera.agent.sysfs import Sysfs


class MdevActuationError(ActuationError):
    """A write creating or removing an mdev failed.

    Attributes:
        uuid: the mdev.
        errno: the kernel's errno.
    """

    def __init__(self, uuid: str, errno: int, message: str) -> None:
        name = errnos.errorcode.get(errno, str(errno))
        super().__init__(f"mdev {uuid}: {message} [{name}]")
        self.uuid = uuid
        self.errno = errno


class MdevManager:
    """Creates, finds and removes one host's mdevs.

    Args:
        sysfs: the host's sysfs; every write goes through its writer.
    """

    def __init__(self, sysfs: Sysfs) -> None:
        self._sysfs = sysfs

    def _mdev(self, uuid: str) -> Path:
        return self._sysfs.path("bus", "mdev", "devices", uuid)

    def type_dir(self, parent: str, type_id: str) -> Path:
        """``mdev_supported_types/<type_id>`` of a parent (it may not exist)."""
        return self._sysfs.path("class", "mdev_bus", parent, "mdev_supported_types", type_id)

    def is_parent(self, parent: str) -> bool:
        """Whether ``parent`` is a registered mdev parent now."""
        return self._sysfs.exists(self._sysfs.path("class", "mdev_bus", parent))

    def available(self, parent: str, type_id: str) -> int:
        """``available_instances`` of a type on a parent; 0 when unreadable."""
        text = self._sysfs.read(self.type_dir(parent, type_id) / "available_instances")
        try:
            return int(text or "0")
        except ValueError:
            return 0

    def type_of(self, uuid: str) -> str | None:
        """The type of an existing mdev; None when no such mdev exists."""
        if not self._sysfs.exists(self._mdev(uuid)):
            return None
        return self._sysfs.link_name(self._mdev(uuid) / "mdev_type") or ""

    def parent_of(self, uuid: str) -> str | None:
        """The parent device of an existing mdev; None when it does not exist."""
        if not self._sysfs.exists(self._mdev(uuid)):
            return None
        return self._sysfs.resolve(self._mdev(uuid)).parent.name

    def iommu_group(self, uuid: str) -> int | None:
        """The mdev's IOMMU group, from its ``iommu_group`` link."""
        group = self._sysfs.link_name(self._mdev(uuid) / "iommu_group")
        return int(group) if group is not None and group.isdigit() else None

    def create(self, parent: str, type_id: str, uuid: str) -> None:
        """Create the mdev; idempotent when it exists with that type.

        Raises:
            MdevActuationError: the kernel refused (EUSERS: no instance left,
                EEXIST: the UUID exists with another type, ...).
        """
        existing = self.type_of(uuid)
        if existing == type_id:
            return
        path = self.type_dir(parent, type_id) / "create"
        try:
            self._sysfs.write(path, uuid)
        except OSError as err:
            code = err.errno if err.errno is not None else errnos.EIO
            raise MdevActuationError(
                uuid,
                code,
                f"creating {type_id} on {parent}: {err.strerror or os.strerror(code)}",
            ) from err

    def remove(self, uuid: str) -> None:
        """Remove the mdev; an mdev that is already gone is fine.

        Raises:
            MdevActuationError: the kernel refused.
        """
        path = self._mdev(uuid) / "remove"
        if not self._sysfs.exists(self._mdev(uuid)):
            return
        try:
            self._sysfs.write(path, "1")
        except OSError as err:
            code = err.errno if err.errno is not None else errnos.EIO
            if code == errnos.ENOENT:
                return  # removed between the check and the write
            raise MdevActuationError(
                uuid, code, f"removing: {err.strerror or os.strerror(code)}"
            ) from err
