"""Enabling and disabling a PF's SR-IOV virtual functions (HW_FACTS §3).

The agent enables VFs only on a PF that has none (``sriov_numvfs`` 0), and
with ``sriov_drivers_autoprobe`` off first: a VF that appears with autoprobe
on is grabbed by the host's VF driver (iavf, mlx5_core) at once, and would
then have to be unbound again before it can go to VFIO. A PF that already
has VFs is never changed: changing the count means writing 0 first, which
would pull every VF out from under whoever uses them.
"""

from __future__ import annotations

import errno as errnos
import os
from dataclasses import dataclass
from pathlib import Path

from tessera.agent.actuation import ActuationError
from tessera.agent.sysfs import Sysfs


class SriovActuationError(ActuationError):
    """A write to a PF's SR-IOV attributes failed.

    Attributes:
        pf: the physical function.
        errno: the kernel's errno.
    """

    def __init__(self, pf: str, errno: int, message: str) -> None:
        name = errnos.errorcode.get(errno, str(errno))
        super().__init__(f"{pf}: sriov: {message} [{name}]")
        self.pf = pf
        self.errno = errno


@dataclass(frozen=True)
class PfState:
    """What a PF's SR-IOV attributes read now.

    Attributes:
        total_vfs: ``sriov_totalvfs``; 0 when the function is not a PF.
        num_vfs: ``sriov_numvfs``.
        drivers_autoprobe: ``sriov_drivers_autoprobe``.
    """

    total_vfs: int
    num_vfs: int
    drivers_autoprobe: bool


class SriovConfigurator:
    """Reads and writes one host's PF SR-IOV attributes.

    Args:
        sysfs: the host's sysfs; every write goes through its writer.
    """

    def __init__(self, sysfs: Sysfs) -> None:
        self._sysfs = sysfs

    def _device(self, pf: str) -> Path:
        return self._sysfs.path("bus", "pci", "devices", pf)

    @staticmethod
    def _int(text: str | None) -> int:
        try:
            return int((text or "0").strip())
        except ValueError:
            return 0

    def state(self, pf: str) -> PfState | None:
        """The PF's SR-IOV state; None when ``pf`` is not an SR-IOV PF here."""
        device = self._device(pf)
        total = self._sysfs.read(device / "sriov_totalvfs")
        if total is None:
            return None
        return PfState(
            total_vfs=self._int(total),
            num_vfs=self._int(self._sysfs.read(device / "sriov_numvfs")),
            drivers_autoprobe=self._int(self._sysfs.read(device / "sriov_drivers_autoprobe")) != 0,
        )

    def vf_address(self, pf: str, index: int) -> str | None:
        """The address of VF ``index`` (the PF's ``virtfn<index>``), None if absent."""
        return self._sysfs.link_name(self._device(pf) / f"virtfn{index}")

    def _write(self, pf: str, name: str, value: str) -> None:
        try:
            self._sysfs.write(self._device(pf) / name, value)
        except OSError as err:
            code = err.errno if err.errno is not None else errnos.EIO
            raise SriovActuationError(
                pf, code, f"writing {value!r} to {name}: {err.strerror or os.strerror(code)}"
            ) from err

    def enable(self, pf: str, num_vfs: int) -> None:
        """Turn driver autoprobing of new VFs off, then create ``num_vfs`` VFs.

        Idempotent: a PF that already has ``num_vfs`` VFs is left alone.

        Raises:
            SriovActuationError: a write failed. Autoprobe may already be off;
                :meth:`disable` with the original value puts it back.
        """
        now = self.state(pf)
        if now is not None and now.num_vfs == num_vfs:
            return
        self._write(pf, "sriov_drivers_autoprobe", "0")
        self._write(pf, "sriov_numvfs", str(num_vfs))

    def disable(self, pf: str, original_autoprobe: bool) -> None:
        """Remove every VF of the PF, then put autoprobing back as it was.

        Idempotent: writes only what differs from the wanted state.

        Raises:
            SriovActuationError: a write failed.
        """
        now = self.state(pf)
        if now is None:
            return  # the PF itself is gone: nothing of ours is left on it
        if now.num_vfs:
            self._write(pf, "sriov_numvfs", "0")
        if now.drivers_autoprobe != original_autoprobe:
            self._write(pf, "sriov_drivers_autoprobe", "1" if original_autoprobe else "0")
