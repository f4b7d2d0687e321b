"""Which PCI functions the host itself is using, and so must never be handed over.

Handing a tenant the boot display or the NIC carrying the host's own traffic
would take the host down with it. Both show in sysfs: ``boot_vga`` reads 1 on
the firmware's boot display (drivers/pci/pci-sysfs.c), and a function driving
a network interface has ``net/<ifname>/`` whose ``operstate`` reads ``up``
while the link is in use (Documentation/ABI/testing/sysfs-class-net).
"""

from __future__ import annotations

from tessera.agent.probes.pci import PciAddress
from tessera.agent.sysfs import Sysfs


def host_use(sysfs: Sysfs, address: PciAddress) -> str | None:
    """Why the host needs this function, or None if it does not."""
    device = sysfs.path("bus", "pci", "devices", address)
    if sysfs.read(device / "boot_vga") == "1":
        return "boot display"
    up = [
        ifname
        for ifname in sysfs.listdir(device / "net")
        if sysfs.read(device / "net" / ifname / "operstate") == "up"
    ]
    if up:
        return f"network interface {', '.join(up)} is up"
    return None
