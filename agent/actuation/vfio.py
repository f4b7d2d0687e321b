"""Whole-IOMMU-group passthrough: moving endpoints to vfio-pci and back.

Each endpoint goes through driverctl's ``set-override`` sequence (HW_FACTS
§2): unbind from the current driver, write ``vfio-pci`` (or a VFIO variant
driver such as ``mlx5_vfio_pci``) to ``driver_override``, write the address
to ``/sys/bus/pci/drivers_probe``, then check the ``driver`` link, because
drivers_probe succeeds even when nothing binds. A group is bound whole or
not at all: if any step fails, the endpoints already moved are restored
before the error is raised.

Unbinding a device that userspace holds open through VFIO does not fail, it
blocks until the device is released; such writes run in a daemon thread with
a timeout, so a stuck VMM cannot wedge the agent.
"""

from __future__ import annotations

import errno as errnos
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.agent.actuation import ActuationError
from tessera.agent.probes.pci import is_pci_address, read_function
from tessera.agent.probes.vfio import VFIO_PCI, is_vfio_driver
from tessera.agent.sysfs import Sysfs

#: What ``driver_override`` reads when unset.
_NO_OVERRIDE = "(null)"


class VfioActuationError(ActuationError):
    """A sysfs step of binding or restoring a device failed.

    Attributes:
        address: the device.
        step: ``check``, ``unbind``, ``driver_override``, ``drivers_probe``,
            ``bind``, ``verify`` or ``reset``.
        errno: the kernel's errno (``ETIMEDOUT`` for a write that blocked).
        message: what happened.
        rollback_failures: when a failed bind could not restore every device
            it had moved, those failures.
    """

    def __init__(
        self,
        address: str,
        step: str,
        errno: int,
        message: str,
        rollback_failures: Sequence[VfioActuationError] = (),
    ) -> None:
        name = errnos.errorcode.get(errno, str(errno))
        text = f"{address}: {step}: {message} [{name}]"
        if rollback_failures:
            text += "; rollback also failed: " + "; ".join(str(f) for f in rollback_failures)
        super().__init__(text)
        self.address = address
        self.step = step
        self.errno = errno
        self.message = message
        self.rollback_failures = tuple(rollback_failures)


class VfioRestoreError(VfioActuationError):
    """Restoring one or more devices failed; the others were restored.

    The error's own fields are those of the first failure.

    Attributes:
        failures: every device's failure, in the order attempted.
    """

    def __init__(self, failures: Sequence[VfioActuationError]) -> None:
        first = failures[0]
        super().__init__(first.address, first.step, first.errno, first.message)
        self.failures = tuple(failures)
        if len(failures) > 1:
            self.args = ("; ".join(str(f) for f in failures),)


@dataclass(frozen=True)
class BindingRecord:
    """A device's binding before the agent moved it: what restore brings back.

    Attributes:
        address: the device.
        original_driver: the driver it was bound to, None if unbound.
        original_override: its ``driver_override``, None if unset.
    """

    address: str
    original_driver: str | None
    original_override: str | None

    def to_dict(self) -> dict[str, str | None]:
        """JSON form, for the agent's checkpoint."""
        return {
            "address": self.address,
            "original_driver": self.original_driver,
            "original_override": self.original_override,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BindingRecord:
        """Parse the JSON form.

        Raises:
            ValueError: a field is missing or has the wrong type.
        """
        address = data.get("address")
        if not isinstance(address, str) or not is_pci_address(address):
            raise ValueError(f"binding record: bad address {address!r}")
        fields: dict[str, str | None] = {}
        for key in ("original_driver", "original_override"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"binding record {address}: {key} must be a string or null")
            fields[key] = value or None
        return cls(address, fields["original_driver"], fields["original_override"])


class VfioBinder:
    """Binds IOMMU groups' endpoints to vfio-pci (or a variant) and restores them.

    Args:
        sysfs: the host's sysfs; every write goes through its writer.
        write_timeout_s: how long a write that may block (an unbind) may
            take before it is reported as ``ETIMEDOUT``.
    """

    def __init__(self, sysfs: Sysfs, *, write_timeout_s: float = 10.0) -> None:
        self._sysfs = sysfs
        self._timeout = write_timeout_s

    # -- reading ---------------------------------------------------------

    def _device(self, address: str) -> Path:
        return self._sysfs.path("bus", "pci", "devices", address)

    def _driver(self, address: str) -> str | None:
        return self._sysfs.link_name(self._device(address) / "driver")

    def _override(self, address: str) -> str | None:
        value = self._sysfs.read(self._device(address) / "driver_override")
        return None if value in (None, "", _NO_OVERRIDE) else value

    def current(self, address: str) -> BindingRecord:
        """The device's binding now, as a record to restore later."""
        return BindingRecord(address, self._driver(address), self._override(address))

    # -- writing ---------------------------------------------------------

    def _write(self, address: str, step: str, path: Path, data: str) -> None:
        try:
            self._sysfs.write(path, data)
        except OSError as err:
            code = err.errno if err.errno is not None else errnos.EIO
            raise VfioActuationError(
                address,
                step,
                code,
                f"writing {data.strip()!r} to {path.name}: {err.strerror or os.strerror(code)}",
            ) from err

    def _write_may_block(self, address: str, step: str, path: Path, data: str) -> None:
        """A write that blocks while VFIO userspace holds the device open.

        It runs in a daemon thread: a write stuck in the kernel cannot be
        cancelled, and a daemon thread does not keep the agent from exiting
        (an executor's worker would be joined at exit, and hang).
        """
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                self._write(address, step, path, data)
                outcome.append(None)
            except BaseException as err:  # handed to the caller's thread
                outcome.append(err)

        worker = threading.Thread(target=run, name=f"sysfs-write-{address}-{step}", daemon=True)
        worker.start()
        worker.join(self._timeout)
        if worker.is_alive():
            raise VfioActuationError(
                address,
                step,
                errnos.ETIMEDOUT,
                f"writing to {path.name} blocked for {self._timeout:g}s "
                "(is the device held open by a VM?)",
            )
        if outcome and outcome[0] is not None:
            raise outcome[0]

    def _unbind(self, address: str, driver: str) -> None:
        path = self._sysfs.path("bus", "pci", "drivers", driver, "unbind")
        self._write_may_block(address, "unbind", path, address)

    def _set_override(self, address: str, override: str | None) -> None:
        # An empty write may never reach the kernel's store(); "\n" is what
        # driverctl's unset-override writes, and clears the override.
        self._write(
            address, "driver_override", self._device(address) / "driver_override", override or "\n"
        )

    def _probe(self, address: str) -> None:
        self._write(
            address, "drivers_probe", self._sysfs.path("bus", "pci", "drivers_probe"), address
        )

    # -- binding ---------------------------------------------------------

    def _check(self, address: str, driver: str) -> None:
        """Refuse, before any write, what must never be unbound or cannot bind."""
        if not self._sysfs.exists(self._device(address)):
            raise VfioActuationError(address, "check", errnos.ENODEV, "no such PCI device")
        if not is_vfio_driver(driver):
            # Handing a tenant a device on a host driver would give it nothing
            # to open, and take the device from the host for no reason.
            raise VfioActuationError(
                address, "check", errnos.EINVAL, f"{driver} is not a VFIO driver"
            )
        if not self._sysfs.exists(self._sysfs.path("bus", "pci", "drivers", driver)):
            raise VfioActuationError(
                address, "check", errnos.ENOENT, f"the {driver} driver is not loaded"
            )
        if read_function(self._sysfs, address).is_bridge:
            # Unbinding pcieport from a port takes its hotplug and AER
            # services away from everything below it; vfio-pci refuses
            # bridges anyway (EINVAL).
            raise VfioActuationError(
                address, "check", errnos.EINVAL, "is a bridge; only endpoints are passed through"
            )

    def _bind_one(self, record: BindingRecord, driver: str) -> None:
        address = record.address
        if record.original_driver == driver:
            # Already on the driver without the override: pin it there for
            # the next probe without a needless unbind.
            self._set_override(address, driver)
            return
        if record.original_driver is not None:
            self._unbind(address, record.original_driver)
        self._set_override(address, driver)
        self._probe(address)
        now = self._driver(address)
        if now != driver:
            raise VfioActuationError(
                address,
                "verify",
                errnos.ENODEV,
                f"bound to {now or 'no driver'} after drivers_probe, not {driver}",
            )

    def bind_group(self, endpoints: Sequence[str], driver: str = VFIO_PCI) -> list[BindingRecord]:
        """Bind every endpoint of an IOMMU group to a VFIO driver.

        Idempotent: an endpoint already on ``driver`` with the override
        ``driver`` is left alone.

        Args:
            endpoints: the group's endpoints (members minus bridges).
            driver: ``vfio-pci`` or a VFIO variant driver (``mlx5_vfio_pci``).

        Returns:
            Each endpoint's binding before the call, in the given order
            (repeats dropped).

        Raises:
            VfioActuationError: a step failed; every endpoint moved by this
                call was restored first (failures to restore are attached as
                ``rollback_failures``).
        """
        # A repeated address would be "moved" twice from a stale record.
        records = [self.current(address) for address in dict.fromkeys(endpoints)]
        for record in records:
            self._check(record.address, driver)
        moved: list[BindingRecord] = []
        for record in records:
            if record.original_driver == driver and record.original_override == driver:
                continue
            # Counted before the first write: a half-done endpoint (unbound,
            # not yet on vfio-pci) needs restoring as much as a done one.
            moved.append(record)
            try:
                self._bind_one(record, driver)
            except VfioActuationError as err:
                rollback = self._restore_all(reversed(moved))
                raise VfioActuationError(
                    err.address, err.step, err.errno, err.message, rollback
                ) from err
        return records

    # -- restoring -------------------------------------------------------

    def has_reset(self, address: str) -> bool:
        """Whether the function can be reset (its ``reset_method`` names a method)."""
        device = self._device(address)
        return bool(self._sysfs.read(device / "reset_method")) and self._sysfs.exists(
            device / "reset"
        )

    def _reset(self, address: str) -> None:
        self._write(address, "reset", self._device(address) / "reset", "1")

    def _restore_one(self, record: BindingRecord, reset: bool) -> None:
        address = record.address
        if not self._sysfs.exists(self._device(address)):
            # A VF removed with its PF's sriov_numvfs, say: nothing to restore.
            return
        driver = self._driver(address)
        if driver == record.original_driver and self._override(address) == record.original_override:
            return
        if driver is not None and driver != record.original_driver:
            self._unbind(address, driver)
        if reset and driver != record.original_driver and self.has_reset(address):
            # Off the tenant's driver and not yet on the host's: clear what
            # the tenant left in the device (also when an earlier attempt
            # unbound it and failed here: ``driver`` is then None).
            self._reset(address)
        self._set_override(address, record.original_override)
        if record.original_driver is None:
            # It was unbound: probing would bind whatever matches now.
            return
        if self._driver(address) is None:
            self._probe(address)
        now = self._driver(address)
        if now != record.original_driver:
            # The original driver did not take it by id match (it was bound
            # through new_id or by hand), or another driver matched first:
            # bind it explicitly.
            if now is not None:
                self._unbind(address, now)
            self._write(
                address,
                "bind",
                self._sysfs.path("bus", "pci", "drivers", record.original_driver, "bind"),
                address,
            )
        now = self._driver(address)
        if now != record.original_driver:
            raise VfioActuationError(
                address,
                "verify",
                errnos.ENODEV,
                f"bound to {now or 'no driver'}, not its original {record.original_driver}",
            )

    def _restore_all(
        self, records: Iterable[BindingRecord], reset: bool = False
    ) -> list[VfioActuationError]:
        failures: list[VfioActuationError] = []
        for record in records:
            try:
                self._restore_one(record, reset)
            except VfioActuationError as err:
                failures.append(err)
        return failures

    def restore(self, records: Sequence[BindingRecord], *, reset: bool = False) -> None:
        """Put devices back on their original drivers and overrides.

        Idempotent: a device already back as recorded is left alone, and a
        device that no longer exists is skipped. One device's failure does
        not stop the others.

        Args:
            records: the devices' original bindings.
            reset: reset each device that has a reset method (write 1 to
                ``reset``) after it leaves the VFIO driver and before its
                original driver probes it, so a tenant's state never reaches
                the host. A device whose reset fails is left unbound, on its
                override, for a retry.

        Raises:
            VfioRestoreError: one or more devices could not be restored; its
                ``failures`` lists each (step ``reset`` for a failed reset).
        """
        failures = self._restore_all(records, reset)
        if failures:
            raise VfioRestoreError(failures)
