"""PCI functions as ``/sys/bus/pci/devices/<address>/`` shows them.

Formats follow ``drivers/pci/pci-sysfs.c`` (HW_FACTS §1): ids and class print
as ``0x%04x`` / ``0x%06x``, ``driver_override`` reads ``(null)`` when unset,
``numa_node`` is ``-1`` when the firmware gave no proximity, and the link
attributes exist only on PCIe functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NewType

from tessera.agent.sysfs import Sysfs

#: A PCI function address in sysfs form, lower-case ``DDDD:BB:DD.F``.
PciAddress = NewType("PciAddress", str)

#: What ``driver_override`` reads when no override is set.
_NO_OVERRIDE = "(null)"

#: Domains may be wider than 4 digits (VMD uses ``10000``), hence ``{4,}``.
_ADDRESS = re.compile(r"^[0-9a-f]{4,}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$")

#: Class codes (the upper 16 bits) of bridges with a type-1 header: PCI-to-PCI
#: (0x0604, which covers PCIe ports and subtractive bridges 0x060401) and
#: semi-transparent PCI-to-PCI (0x0609). Host and ISA bridges are endpoints.
_BRIDGE_CLASSES = frozenset({0x0604, 0x0609})


def is_pci_address(text: str) -> bool:
    """Whether ``text`` is a sysfs PCI address (``0000:4b:00.0``)."""
    return _ADDRESS.match(text) is not None


def pci_address(text: str) -> PciAddress:
    """Validate and normalise (lower-case) a sysfs PCI address.

    Raises:
        ValueError: ``text`` is not of the form ``DDDD:BB:DD.F``.
    """
    lowered = text.strip().lower()
    if not is_pci_address(lowered):
        raise ValueError(f"not a PCI address: {text!r}")
    return PciAddress(lowered)


@dataclass(frozen=True)
class PcieLink:
    """Link state of a PCIe function (``current_link_*``, ``max_link_*``).

    Speeds are kept exactly as sysfs prints them (``16.0 GT/s PCIe``,
    ``Unknown``); widths are lanes, 0 when sysfs does not give a number.
    """

    current_speed: str
    current_width: int
    max_speed: str
    max_width: int


@dataclass(frozen=True)
class PciFunction:
    """One PCI function.

    Attributes:
        address: ``0000:4b:00.0``.
        vendor_id: 16-bit vendor id.
        device_id: 16-bit device id.
        subsystem_vendor_id: 16-bit subsystem vendor id.
        subsystem_device_id: 16-bit subsystem device id.
        class_code: 24-bit class code (``0x030200`` 3D controller, ...).
        driver: the bound driver's name, None when unbound.
        driver_override: the override, None when it reads ``(null)``.
        numa_node: the node, -1 when the firmware gave none.
        local_cpulist: CPUs local to the function, None if not exposed.
        link: PCIe link state; None for conventional PCI functions.
        reset_methods: ``reset_method`` in priority order; empty when the
            device has none (the file is then absent).
        physfn: for an SR-IOV VF, its PF's address.
        device_path: the realpath of the function under ``/sys/devices``,
            relative to ``/sys/devices``: the root bus, then every bridge,
            then the function itself.
    """

    address: PciAddress
    vendor_id: int
    device_id: int
    subsystem_vendor_id: int
    subsystem_device_id: int
    class_code: int
    driver: str | None
    driver_override: str | None
    numa_node: int
    local_cpulist: str | None
    link: PcieLink | None
    reset_methods: tuple[str, ...]
    physfn: PciAddress | None
    device_path: tuple[str, ...]

    @property
    def is_bridge(self) -> bool:
        """A PCI-to-PCI bridge (root/switch port or conventional bridge)."""
        return (self.class_code >> 8) in _BRIDGE_CLASSES

    @property
    def is_vf(self) -> bool:
        """An SR-IOV virtual function."""
        return self.physfn is not None


def _hex(sysfs: Sysfs, path: Path) -> int:
    """A ``0x%x`` attribute as an int; 0 when absent or malformed."""
    text = sysfs.read(path)
    if text is None:
        return 0
    try:
        return int(text.strip(), 16)
    except ValueError:
        return 0


def _dec(text: str | None, default: int) -> int:
    if text is None:
        return default
    try:
        return int(text.strip())
    except ValueError:
        # "Unknown" widths on VFs, or a kernel printing something new.
        return default


def _link(sysfs: Sysfs, device: Path) -> PcieLink | None:
    current_speed = sysfs.read(device / "current_link_speed")
    max_speed = sysfs.read(device / "max_link_speed")
    if current_speed is None and max_speed is None:
        return None
    return PcieLink(
        current_speed=current_speed if current_speed is not None else "Unknown",
        current_width=_dec(sysfs.read(device / "current_link_width"), 0),
        max_speed=max_speed if max_speed is not None else "Unknown",
        max_width=_dec(sysfs.read(device / "max_link_width"), 0),
    )


def device_path(sysfs: Sysfs, address: str) -> tuple[str, ...]:
    """Components of a function's realpath below ``/sys/devices``.

    ``("pci0000:30", "0000:30:02.0", "0000:31:00.2")`` for a VF under a root
    port; empty if the function is missing or lives outside ``/sys/devices``.
    """
    real = sysfs.resolve(sysfs.path("bus", "pci", "devices", address))
    try:
        return real.relative_to(sysfs.resolve(sysfs.path("devices"))).parts
    except ValueError:
        return ()


def read_function(sysfs: Sysfs, address: str) -> PciFunction:
    """Read one function's attributes.

    Args:
        sysfs: the host's sysfs.
        address: an entry of ``/sys/bus/pci/devices``.
    """
    device = sysfs.path("bus", "pci", "devices", address)
    override = sysfs.read(device / "driver_override")
    reset = sysfs.read(device / "reset_method")
    physfn = sysfs.link_name(device / "physfn")
    return PciFunction(
        address=PciAddress(address),
        vendor_id=_hex(sysfs, device / "vendor"),
        device_id=_hex(sysfs, device / "device"),
        subsystem_vendor_id=_hex(sysfs, device / "subsystem_vendor"),
        subsystem_device_id=_hex(sysfs, device / "subsystem_device"),
        class_code=_hex(sysfs, device / "class"),
        driver=sysfs.link_name(device / "driver"),
        driver_override=None if override in (None, "", _NO_OVERRIDE) else override,
        numa_node=_dec(sysfs.read(device / "numa_node"), -1),
        local_cpulist=sysfs.read(device / "local_cpulist"),
        link=_link(sysfs, device),
        reset_methods=tuple(reset.split()) if reset else (),
        physfn=PciAddress(physfn) if physfn is not None else None,
        device_path=device_path(sysfs, address),
    )


def probe_pci(sysfs: Sysfs) -> tuple[PciFunction, ...]:
    """Every function of ``/sys/bus/pci/devices``, in address order.

    Entries that are not PCI addresses are skipped rather than guessed at.
    """
    return tuple(
        read_function(sysfs, name)
        for name in sysfs.listdir(sysfs.path("bus", "pci", "devices"))
        if is_pci_address(name)
    )
