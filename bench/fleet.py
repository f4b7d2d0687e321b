"""A reproducible synthetic fleet: thousands of hosts cloned from the fixture hosts.

The default mix (:data:`DEFAULT_MIX`) has three families of hosts: 8-GPU
HGX-class hosts whose GPUs pair with NICs under PCIe switches (``hgx-8gpu``,
``dgx-a100``); virtualization hosts with SR-IOV NICs and vGPU (mdev) parents
(``virt-2s``, ``sriov-nic``, ``vgpu``); and PCIe A100 servers for MIG
(``pcie-a100-mig``).

Each fixture type of ``agent/testing/hosts.py`` is built ONCE as a fake sysfs
tree in a temporary directory and discovered with the real agent code (the
same ``HostReporter`` that ``tessera-agent inventory --sysfs-root DIR
--host-id ID --json`` runs, with the fixture's fake NVML driver where it has
one). The discovered inventory is cached in memory and cloned per host with a
new ``host_id`` (``host-00001`` ...), a boot id, and labels drawn from the
seed (``zone``, ``rack``, ``tessera.io/fixture``).

The fleet's state, not agent output: on a seeded fraction of GPU hosts
(:data:`MIG_HOST_FRACTION`; a larger one, :data:`MIG_FRACTION_BY_TYPE`, for
the PCIe MIG servers, bought for partitioning), MIG mode is switched on
(``mig_mode_current = MIG_MODE_ENABLED``, pending too) on some of their
MIG-capable GPUs, as if an operator had enabled it. The MIG profiles and
placements each GPU offers are already in the discovered inventory; no GPU
instances exist yet (the layout is empty).

Same ``(n_hosts, seed, mix)``, same fleet::

    from bench.fleet import build_fleet, snapshot
    fleet = build_fleet(10_000, seed=7)
    snap = snapshot(fleet)
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tessera.agent.nvml import NullNvmlClient, NvmlClient, open_nvml
from tessera.agent.reporter import HostReporter
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.hosts import FIXTURES, build
from tessera.agent.testing.nvml import STATE_FILE, FakeNvml
from tessera.scheduler.core.snapshot import ClusterSnapshot
from tessera.scheduler.planning import snapshot_of
from tessera.v1 import inventory_pb2

#: Share of each fixture type in the default fleet.
DEFAULT_MIX: Mapping[str, float] = {
    "hgx-8gpu": 0.30,
    "dgx-a100": 0.15,
    "pcie-a100-mig": 0.15,
    "virt-2s": 0.25,
    "sriov-nic": 0.10,
    "vgpu": 0.05,
}

#: Share of hosts with MIG-capable GPUs that run MIG on some of them.
MIG_HOST_FRACTION = 0.25
#: Per fixture type, where it differs from :data:`MIG_HOST_FRACTION`.
MIG_FRACTION_BY_TYPE: Mapping[str, float] = {"pcie-a100-mig": 0.6}

ZONES = ("zone-a", "zone-b", "zone-c", "zone-d")
RACKS_PER_ZONE = 40
#: Label naming the fixture a host was cloned from.
FIXTURE_LABEL = "tessera.io/fixture"

_CACHE: dict[str, inventory_pb2.HostInventory] = {}


def _nvml(root: Path) -> NvmlClient:
    # As tessera-agent does on a fake tree: its fake driver, or no driver.
    if (root / STATE_FILE).exists():
        return open_nvml(FakeNvml.from_tree(root))
    return NullNvmlClient("this fake host has no fake NVIDIA driver")


def fixture_inventory(name: str) -> inventory_pb2.HostInventory:
    """The inventory the agent discovers on fixture ``name`` (cached; do not mutate).

    Raises:
        KeyError: unknown fixture name.
    """
    found = _CACHE.get(name)
    if found is not None:
        return found
    if name not in FIXTURES:
        raise KeyError(f"unknown fixture host {name!r}; known: {', '.join(sorted(FIXTURES))}")
    with tempfile.TemporaryDirectory(prefix="tessera-fleet-") as tmp:
        root = Path(tmp) / name
        build(name, root)
        reporter = HostReporter(
            Sysfs(root), _nvml(root), host_id=name, boot_id=f"boot-{name}", labels={}
        )
        inventory, _ = reporter.report()
    _CACHE[name] = inventory
    return inventory


def _counts(n_hosts: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Hosts per type: exact shares, remainders to the largest fractions."""
    total = sum(mix.values())
    if total <= 0 or any(share < 0 for share in mix.values()):
        raise ValueError(f"mix: shares must be non-negative and not all zero: {dict(mix)}")
    exact = {name: n_hosts * share / total for name, share in mix.items()}
    counts = {name: int(value) for name, value in exact.items()}
    left = n_hosts - sum(counts.values())
    for name in sorted(exact, key=lambda k: (-(exact[k] - counts[k]), k))[:left]:
        counts[name] += 1
    return counts


def _enable_mig(inventory: inventory_pb2.HostInventory, rng: random.Random) -> int:
    """Switch MIG on for 1..all of the host's MIG-capable GPUs; returns how many."""
    capable = [
        gpu
        for gpu in inventory.gpus
        if gpu.mig_profiles and gpu.mig_mode_current == inventory_pb2.MIG_MODE_DISABLED
    ]
    if not capable:
        return 0
    chosen = rng.sample(capable, rng.randint(1, len(capable)))
    for gpu in chosen:
        gpu.mig_mode_current = inventory_pb2.MIG_MODE_ENABLED
        gpu.mig_mode_pending = inventory_pb2.MIG_MODE_ENABLED
    return len(chosen)


def build_fleet(
    n_hosts: int, seed: int, mix: Mapping[str, float] | None = None
) -> list[inventory_pb2.HostInventory]:
    """``n_hosts`` inventories cloned from the fixture hosts, varied by ``seed``.

    Args:
        n_hosts: fleet size; hosts are ``host-00001`` ... in order.
        seed: drives the order of types, labels and MIG state.
        mix: fixture name -> share (normalized); :data:`DEFAULT_MIX` if None.

    Returns:
        Fresh messages, one per host, safe to mutate.
    """
    counts = _counts(n_hosts, DEFAULT_MIX if mix is None else mix)
    rng = random.Random(seed)
    types = [name for name in sorted(counts) for _ in range(counts[name])]
    rng.shuffle(types)
    fleet: list[inventory_pb2.HostInventory] = []
    for i, name in enumerate(types, start=1):
        inventory = inventory_pb2.HostInventory()
        inventory.CopyFrom(fixture_inventory(name))
        host_id = f"host-{i:05d}"
        inventory.host_id = host_id
        inventory.boot_id = f"boot-{seed}-{host_id}"
        zone = rng.randrange(len(ZONES))
        inventory.labels["zone"] = ZONES[zone]
        inventory.labels["rack"] = (
            f"rack-{zone * RACKS_PER_ZONE + rng.randrange(RACKS_PER_ZONE):03d}"
        )
        inventory.labels[FIXTURE_LABEL] = name
        # One draw per host whatever its type, so the rest of the stream (and
        # so every other host) does not depend on the per-type fractions.
        if rng.random() < MIG_FRACTION_BY_TYPE.get(name, MIG_HOST_FRACTION):
            _enable_mig(inventory, rng)
        fleet.append(inventory)
    return fleet


def snapshot(inventories: Sequence[inventory_pb2.HostInventory]) -> ClusterSnapshot:
    """An empty cluster of these hosts, every one schedulable."""
    return snapshot_of(inventories)


def describe(inventories: Sequence[inventory_pb2.HostInventory]) -> dict[str, object]:
    """Counts of a fleet: hosts per type, GPUs, MIG GPUs, SR-IOV PFs, mdev parents."""
    per_type: dict[str, int] = {}
    for inv in inventories:
        name = inv.labels[FIXTURE_LABEL]
        per_type[name] = per_type.get(name, 0) + 1
    return {
        "hosts": len(inventories),
        "per_type": dict(sorted(per_type.items())),
        "gpus": sum(len(inv.gpus) for inv in inventories),
        "mig_enabled_gpus": sum(
            1
            for inv in inventories
            for gpu in inv.gpus
            if gpu.mig_mode_current == inventory_pb2.MIG_MODE_ENABLED
        ),
        "sriov_pfs": sum(len(inv.sriov_pfs) for inv in inventories),
        "mdev_parents": sum(len(inv.mdev_parents) for inv in inventories),
        "pci_functions": sum(len(inv.pci_functions) for inv in inventories),
    }


def main(argv: list[str] | None = None) -> int:
    """Build a fleet and print its size and how long it took."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=12_500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snapshot", action="store_true", help="also convert to a snapshot")
    opts = p.parse_args(argv)
    t0 = time.perf_counter()
    for name in DEFAULT_MIX:
        fixture_inventory(name)
    t1 = time.perf_counter()
    fleet = build_fleet(opts.hosts, opts.seed)
    t2 = time.perf_counter()
    print(f"discover fixtures: {t1 - t0:.2f} s   clone {opts.hosts} hosts: {t2 - t1:.2f} s")
    print(describe(fleet))
    if opts.snapshot:
        snapshot(fleet)
        print(f"snapshot: {time.perf_counter() - t2:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
