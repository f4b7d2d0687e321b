"""The synthetic fleet: reproducible from a seed, the mix honoured, the PCIe MIG host found."""

from __future__ import annotations

from bench.fleet import (
    DEFAULT_MIX,
    FIXTURE_LABEL,
    build_fleet,
    describe,
    fixture_inventory,
    snapshot,
)
from tessera.v1 import inventory_pb2


def test_same_seed_same_fleet_other_seed_other_fleet() -> None:
    a = build_fleet(300, seed=11)
    b = build_fleet(300, seed=11)
    c = build_fleet(300, seed=12)
    assert [x.SerializeToString(deterministic=True) for x in a] == [
        x.SerializeToString(deterministic=True) for x in b
    ]
    assert [x.SerializeToString(deterministic=True) for x in a] != [
        x.SerializeToString(deterministic=True) for x in c
    ]
    assert [x.host_id for x in a] == [f"host-{i:05d}" for i in range(1, 301)]


def test_mix_shares_are_exact() -> None:
    fleet = build_fleet(1000, seed=3)
    per_type = describe(fleet)["per_type"]
    assert per_type == {name: round(1000 * share) for name, share in DEFAULT_MIX.items()}
    custom = build_fleet(10, seed=3, mix={"vgpu": 1, "sriov-nic": 1})
    assert sorted(inv.labels[FIXTURE_LABEL] for inv in custom) == ["sriov-nic"] * 5 + ["vgpu"] * 5


def test_pcie_mig_host_is_discovered_by_the_agent() -> None:
    inv = fixture_inventory("pcie-a100-mig")
    gpus = sorted(inv.gpus, key=lambda g: g.address)
    assert [g.address for g in gpus] == [
        "0000:18:00.0",
        "0000:32:00.0",
        "0000:99:00.0",
        "0000:b2:00.0",
    ]
    for gpu in gpus:
        assert gpu.mig_mode_current == inventory_pb2.MIG_MODE_DISABLED
        assert "1g.10gb" in {p.name for p in gpu.mig_profiles}
    assert len(inv.sriov_pfs) == 2
    assert len(inv.numa_nodes) == 2
    # Every GPU is alone in its IOMMU group (each under its own ACS root port).
    groups = {f.address: f.iommu_group for f in inv.pci_functions}
    assert len({groups[g.address] for g in gpus}) == 4


def test_mig_is_enabled_on_a_seeded_share_of_pcie_hosts() -> None:
    fleet = build_fleet(400, seed=5)
    pcie = [inv for inv in fleet if inv.labels[FIXTURE_LABEL] == "pcie-a100-mig"]
    with_mig = [
        inv
        for inv in pcie
        if any(g.mig_mode_current == inventory_pb2.MIG_MODE_ENABLED for g in inv.gpus)
    ]
    assert pcie
    # 60% drawn per host: comfortably between a third and nine tenths of 60 hosts.
    assert len(pcie) // 3 < len(with_mig) < len(pcie) * 9 // 10
    snap = snapshot(fleet[:50])
    assert len(snap.hosts) == 50
