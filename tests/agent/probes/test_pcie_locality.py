"""Locality levels and port types, from positions and config space alone."""

from __future__ import annotations

import pytest

from tessera.agent.probes.pci import PciAddress
from tessera.agent.probes.pcie import Locality, PciRole, TreePosition, config_port_role, locality


def at(address: str, *chain: str, root: str = "pci0000:00", node: int = 0) -> TreePosition:
    return TreePosition(
        address=PciAddress(address),
        root_bus=root,
        bridge_chain=tuple(PciAddress(c) for c in chain),
        role=PciRole.ENDPOINT,
        numa_node=node,
    )


RP, USP, DSP1, DSP2 = "0000:00:01.0", "0000:01:00.0", "0000:02:00.0", "0000:02:01.0"


def test_two_devices_under_one_switch_port_are_pix() -> None:
    assert locality(at("0000:03:00.0", RP, USP, DSP1), at("0000:03:00.1", RP, USP, DSP1)) == (
        Locality.PIX
    )


def test_functions_of_one_device_under_a_root_port_are_pix() -> None:
    assert locality(at("0000:01:00.0", RP), at("0000:01:00.1", RP)) == Locality.PIX


def test_devices_under_different_ports_of_one_switch_are_pxb() -> None:
    assert locality(at("0000:03:00.0", RP, USP, DSP1), at("0000:04:00.0", RP, USP, DSP2)) == (
        Locality.PXB
    )


def test_a_device_on_the_root_port_and_one_behind_a_switch_below_it_are_pxb() -> None:
    assert locality(at("0000:01:00.1", RP), at("0000:03:00.0", RP, USP, DSP1)) == Locality.PXB


def test_different_root_ports_of_one_root_bus_meet_at_the_host_bridge() -> None:
    assert locality(at("0000:01:00.0", RP), at("0000:05:00.0", "0000:00:02.0")) == Locality.PHB


def test_an_rciep_reaches_a_device_on_its_root_bus_through_the_host_bridge() -> None:
    assert locality(at("0000:00:0a.0"), at("0000:01:00.0", RP)) == Locality.PHB


def test_root_buses_of_one_numa_node_are_node_apart() -> None:
    a = at("0000:31:00.0", "0000:30:02.0", root="pci0000:30", node=0)
    b = at("0000:4b:00.0", "0000:4a:01.0", root="pci0000:4a", node=0)
    assert locality(a, b) == Locality.NODE


def test_root_buses_on_different_numa_nodes_are_sys() -> None:
    a = at("0000:4b:00.0", "0000:4a:01.0", root="pci0000:4a", node=0)
    b = at("0000:b1:00.0", "0000:b0:02.0", root="pci0000:b0", node=1)
    assert locality(a, b) == Locality.SYS


def test_an_unknown_numa_node_is_never_taken_for_a_near_one() -> None:
    a = at("0000:4b:00.0", root="pci0000:4a", node=-1)
    b = at("0000:b1:00.0", root="pci0000:b0", node=0)
    assert locality(a, b) == Locality.SYS


def test_levels_order_from_near_to_far_with_nvml_values() -> None:
    assert Locality.PIX < Locality.PXB < Locality.PHB < Locality.NODE < Locality.SYS
    assert [level.value for level in Locality] == [10, 20, 30, 40, 50]


def config_with_pcie_port(port_type: int, *, size: int = 256) -> bytes:
    space = bytearray(size)
    space[0x06] = 0x10  # status: capability list present
    space[0x34] = 0x40  # first capability
    space[0x40:0x42] = bytes([0x01, 0x60])  # power management -> next at 0x60
    space[0x60:0x64] = bytes([0x10, 0x00, (port_type << 4) | 0x2, 0x00])  # PCIe cap v2
    return bytes(space)


@pytest.mark.parametrize(
    ("port_type", "role"),
    [
        (0x0, PciRole.ENDPOINT),
        (0x4, PciRole.ROOT_PORT),
        (0x5, PciRole.SWITCH_UPSTREAM),
        (0x6, PciRole.SWITCH_DOWNSTREAM),
        (0x7, PciRole.PCI_BRIDGE),
        (0x9, PciRole.RCIEP),
    ],
)
def test_config_space_declares_the_port_type(port_type: int, role: PciRole) -> None:
    assert config_port_role(config_with_pcie_port(port_type)) == role


def test_a_non_root_reader_sees_64_bytes_of_config_and_no_port_type() -> None:
    assert config_port_role(config_with_pcie_port(0x4)[:64]) is None


def test_a_looping_capability_list_does_not_hang() -> None:
    space = bytearray(256)
    space[0x06] = 0x10
    space[0x34] = 0x40
    space[0x40:0x42] = bytes([0x01, 0x40])  # points at itself
    assert config_port_role(bytes(space)) is None


def test_conventional_pci_config_without_a_pcie_capability_gives_no_port_type() -> None:
    space = bytearray(256)
    space[0x06] = 0x10
    space[0x34] = 0x40
    space[0x40:0x42] = bytes([0x01, 0x00])
    assert config_port_role(bytes(space)) is None
