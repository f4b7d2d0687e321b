"""Every inventory is checked before the scheduler stores or reads it.

The hostile reports that once took the scheduler down or misled it are refused
by name, each naming its field in wire terms; the reports real agents send
(every golden fixture host, and a host discovered with VFs, mdevs and MIG
instances live) pass unchanged. Register and Heartbeat refuse on a real Valkey
without writing anything; ``tessera plan`` refuses a bad inventory file in one
line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml
from google.protobuf import json_format

from tessera.scheduler.core.validation import MAX_REPORTED, FieldViolation, InvalidRequestError
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.inventory_check import (
    MAX_PCI_FUNCTIONS,
    check_inventory,
    inventory_violations,
)
from tessera.scheduler.store import schema
from tessera.scheduler.store.redis_store import RedisStateStore
from tessera.v1 import inventory_pb2, placement_pb2

from ...conftest import Runner

GOLDEN = Path(__file__).resolve().parents[2] / "agent" / "golden"
BIN = Path(sys.executable).parent
#: tmpfs when available: building a fake host is bound by file creation.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def golden(name: str) -> inventory_pb2.HostInventory:
    """A fixture host as its agent registers it (the golden file's placeholders filled in)."""
    data = json.loads((GOLDEN / f"{name}.json").read_text())
    data["bootId"] = f"boot-{name}"
    data["generation"] = "1"
    return json_format.ParseDict(data, inventory_pb2.HostInventory())


def problems(inv: inventory_pb2.HostInventory) -> list[FieldViolation]:
    found, _ = inventory_violations(inv)
    return found


def fields(inv: inventory_pb2.HostInventory) -> list[str]:
    return [v.field for v in problems(inv)]


def function(inv: inventory_pb2.HostInventory, address: str) -> inventory_pb2.PciFunction:
    return next(f for f in inv.pci_functions if f.address == address)


def index(inv: inventory_pb2.HostInventory, address: str) -> int:
    return next(i for i, f in enumerate(inv.pci_functions) if f.address == address)


# -- what agents really send -------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.json")))
def test_every_golden_inventory_passes_unchanged(name: str) -> None:
    inv = golden(name)
    before = inv.SerializeToString(deterministic=True)
    assert problems(inv) == []
    check_inventory(inv)
    assert inv.SerializeToString(deterministic=True) == before


def test_a_host_discovered_with_vfs_mdevs_and_mig_instances_live_passes() -> None:
    # The real agent code on the virt-2s fixture, after an operator enabled
    # every VF, created two vGPUs and two MIG instances.
    with tempfile.TemporaryDirectory(prefix="tessera-live-", dir=SCRATCH) as tmp:
        inv = discovered_live(Path(tmp) / "virt-2s")
    assert sum(pf.num_vfs for pf in inv.sriov_pfs) == 160
    assert len(inv.mdev_parents[0].instances) == 2
    assert len(next(g for g in inv.gpus if g.address == "0000:4b:00.0").gpu_instances) == 2
    assert problems(inv) == []


def discovered_live(root: Path) -> inventory_pb2.HostInventory:
    """virt-2s with every VF on, two vGPUs and two MIG instances, as its agent reports it."""
    import pynvml

    from tessera.agent.actuation.mdev import MdevManager
    from tessera.agent.actuation.mig import MigPartitioner
    from tessera.agent.nvml import MigPlacement, open_nvml
    from tessera.agent.reporter import HostReporter
    from tessera.agent.sysfs import Sysfs
    from tessera.agent.testing.hosts import build
    from tessera.agent.testing.kernel import KernelEmulator
    from tessera.agent.testing.nvml import FakeNvml, nvml_bus_id

    build("virt-2s", root)
    sysfs = Sysfs(root, KernelEmulator(root))
    for address in sysfs.listdir(sysfs.path("bus", "pci", "devices")):
        device = sysfs.path("bus", "pci", "devices", address)
        total = sysfs.read(device / "sriov_totalvfs")
        if total and int(total) > 0:
            sysfs.write(device / "sriov_numvfs", total)
    mdevs = MdevManager(sysfs)
    mdevs.create("0000:b1:00.0", "nvidia-63", "8f1f6a2c-0b9c-4b7e-9d0a-3c6d2f1e4a5b")
    mdevs.create("0000:b1:00.0", "nvidia-63", "1b2c3d4e-0b9c-4b7e-9d0a-3c6d2f1e4a5b")
    fake = FakeNvml.from_tree(root)
    fake.nvmlInit()
    for i in range(fake.nvmlDeviceGetCount()):
        handle = fake.nvmlDeviceGetHandleByIndex(i)
        bus_id = fake.nvmlDeviceGetPciInfo(handle).busId
        bus_id = bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id)
        if bus_id == nvml_bus_id("0000:4b:00.0"):
            fake.nvmlDeviceSetMigMode(handle, pynvml.NVML_DEVICE_MIG_ENABLE)
    fake.nvmlShutdown()
    mig = MigPartitioner(open_nvml(FakeNvml.from_tree(root)))
    gpu = mig.gpu("0000:4b:00.0")
    assert gpu is not None
    for profile_id, placement in ((9, MigPlacement(4, 4)), (19, MigPlacement(0, 1))):
        gi = mig.create_gpu_instance(gpu, "0000:4b:00.0", profile_id, placement)
        mig.create_compute_instance(gpu, "0000:4b:00.0", gi)

    inv, _ = HostReporter(
        Sysfs(root),
        open_nvml(FakeNvml.from_tree(root)),
        host_id="virt-2s",
        boot_id="8b7e2f4c-1d2e-4f5a-9b8c-7d6e5f4a3b2c",
        labels={"zone": "zone-a", "tessera.io/fixture": "virt-2s"},
    ).report()
    return inv


def test_a_minimal_hand_written_inventory_passes() -> None:
    # What the service tests register: no NUMA nodes, bridges or root buses.
    inv = inventory_pb2.HostInventory(
        host_id="h1",
        boot_id="b1",
        generation=1,
        iommu_present=True,
        pci_functions=[
            inventory_pb2.PciFunction(
                address="0000:01:00.0", vendor_id=0x10DE, class_code=0x030200,
                iommu_group=3, has_iommu_group=True, role=inventory_pb2.PCI_ROLE_ENDPOINT,
            )
        ],
        iommu_groups=[inventory_pb2.IommuGroup(number=3, members=["0000:01:00.0"])],
    )  # fmt: skip
    assert problems(inv) == []


# -- numbers out of bounds ---------------------------------------------------


def test_a_pf_claiming_more_vfs_than_the_16_bit_total_vfs_field_holds_is_refused() -> None:
    inv = golden("virt-2s")
    inv.sriov_pfs[2].total_vfs = 2**32 - 1
    with pytest.raises(InvalidRequestError) as refused:
        check_inventory(inv)
    assert refused.value.violations == [
        FieldViolation("inventory.sriov_pfs[2].total_vfs", "must be at most 65535, not 4294967295")
    ]
    assert str(refused.value) == (
        "inventory.sriov_pfs[2].total_vfs: must be at most 65535, not 4294967295"
    )


def test_vfs_whose_routing_ids_run_past_bus_255_are_refused() -> None:
    inv = golden("virt-2s")
    inv.sriov_pfs[3].total_vfs = 65_535  # within the field, but PF cb:00.0 + 16 + 65,534
    [found] = problems(inv)
    assert found.field == "inventory.sriov_pfs[3].total_vfs"
    assert "past bus 255" in found.message


def test_num_vfs_beyond_total_vfs_is_refused() -> None:
    inv = golden("sriov-nic")
    inv.sriov_pfs[0].num_vfs = inv.sriov_pfs[0].total_vfs + 1
    assert fields(inv) == ["inventory.sriov_pfs[0].num_vfs"]


def test_a_mig_profile_of_zero_slices_is_refused() -> None:
    inv = golden("virt-2s")
    inv.gpus[0].mig_profiles[1].slice_count = 0
    assert problems(inv) == [
        FieldViolation(
            "inventory.gpus[0].mig_profiles[1].slice_count", "must be 1..7 compute slices, not 0"
        )
    ]


def test_mig_placements_outside_the_eight_memory_slices_are_refused() -> None:
    inv = golden("virt-2s")
    placement = inv.gpus[0].mig_profiles[0].placements[2]
    placement.start = 2**32 - 1
    placement.size = 2**32 - 1
    inv.gpus[0].mig_profiles[1].placements[0].size = 9
    inv.gpus[0].mig_profiles[2].placements[1].start = 6  # a 3g at 6..9
    assert fields(inv) == [
        "inventory.gpus[0].mig_profiles[0].placements[2].start",
        "inventory.gpus[0].mig_profiles[0].placements[2].size",
        "inventory.gpus[0].mig_profiles[1].placements[0].size",
        "inventory.gpus[0].mig_profiles[2].placements[1].size",
    ]


def test_a_gpu_instance_takes_a_listed_profile_at_a_placement_it_allows_without_overlap() -> None:
    inv = golden("virt-2s")
    gpu = inv.gpus[0]
    gpu.mig_mode_current = inventory_pb2.MIG_MODE_ENABLED
    # 3g.40gb at 4..7, fine; 1g.10gb at 3, fine; 2g.20gb at 1 (not a 2g placement);
    # 1g.10gb at 5 (inside the 3g); a profile the GPU does not list; a huge placement.
    gpu.gpu_instances.add(id=1, profile_id=9, placement=inventory_pb2.MigPlacement(start=4, size=4))
    gpu.gpu_instances.add(
        id=2, profile_id=19, placement=inventory_pb2.MigPlacement(start=3, size=1)
    )
    gpu.gpu_instances.add(
        id=3, profile_id=14, placement=inventory_pb2.MigPlacement(start=1, size=2)
    )
    gpu.gpu_instances.add(
        id=4, profile_id=19, placement=inventory_pb2.MigPlacement(start=5, size=1)
    )
    gpu.gpu_instances.add(
        id=5, profile_id=77, placement=inventory_pb2.MigPlacement(start=0, size=1)
    )
    gpu.gpu_instances.add(
        id=6, profile_id=19, placement=inventory_pb2.MigPlacement(start=2**31, size=2**31)
    )
    found = problems(inv)
    assert [v.field for v in found] == [
        "inventory.gpus[0].gpu_instances[2].placement",
        "inventory.gpus[0].gpu_instances[3].placement",
        "inventory.gpus[0].gpu_instances[4].profile_id",
        "inventory.gpus[0].gpu_instances[5].placement.start",
        "inventory.gpus[0].gpu_instances[5].placement.size",
    ]
    assert "is not a placement '2g.20gb' allows" in found[0].message
    assert found[1].message == "overlaps another GPU instance"
    assert found[2].message == "77 is not a profile among the GPU's mig_profiles"


def test_more_gpu_instances_of_a_profile_than_a_gpu_holds_are_refused() -> None:
    inv = golden("virt-2s")
    gpu = inv.gpus[0]
    gpu.mig_mode_current = inventory_pb2.MIG_MODE_ENABLED
    for gi_id, start in ((1, 0), (2, 1)):  # two 1g.10gb+me: the media engine is one
        gpu.gpu_instances.add(
            id=gi_id, profile_id=20, placement=inventory_pb2.MigPlacement(start=start, size=1)
        )
    assert problems(inv) == [
        FieldViolation(
            "inventory.gpus[0].gpu_instances",
            "2 instances of profile id 20; a GPU holds at most 1",
        )
    ]


def test_a_numa_node_beyond_linux_max_numnodes_is_refused() -> None:
    inv = golden("virt-2s")
    function(inv, "0000:4b:00.0").numa_node = 99_999
    assert problems(inv) == [
        FieldViolation(
            "inventory.pci_functions[7].numa_node",
            "must be -1 (no affinity) or a node id 0..1023, not 99999",
        ),
    ]
    inv = golden("virt-2s")
    inv.numa_nodes[1].id = 99_999
    assert problems(inv)[0] == FieldViolation(
        "inventory.numa_nodes[1].id", "must be a node id 0..1023, not 99999"
    )


def test_a_cpu_listed_under_two_numa_nodes_is_refused() -> None:
    # The kernel puts each CPU in one node; counted twice, a host would
    # offer placements CPUs it does not have.
    inv = golden("virt-2s")
    inv.numa_nodes[1].cpulist = "32-63,96-127,90-91"
    assert problems(inv) == [
        FieldViolation("inventory.numa_nodes[1].cpulist", "CPU 90 is also in node 0")
    ]
    # A node naming its own CPUs twice counts each once: nothing to refuse.
    inv.numa_nodes[1].cpulist = ",".join(["32-63,96-127"] * 300)
    assert problems(inv) == []


def test_a_function_on_a_numa_node_the_host_does_not_list_is_refused() -> None:
    inv = golden("virt-2s")
    function(inv, "0000:4b:00.0").numa_node = 5
    assert problems(inv) == [
        FieldViolation("inventory.pci_functions[7].numa_node", "node 5 is not among numa_nodes")
    ]


def test_ids_wider_than_their_pci_registers_and_unknown_enum_values_are_refused() -> None:
    inv = golden("gpu-workstation")
    inv.pci_functions[0].vendor_id = 0x1_10DE
    inv.pci_functions[0].class_code = 0x1_000000
    inv.pci_functions[0].role = 42  # type: ignore[assignment]
    inv.gpus[0].mig_mode_current = 9  # type: ignore[assignment]
    assert fields(inv) == [
        "inventory.pci_functions[0].vendor_id",
        "inventory.pci_functions[0].class_code",
        "inventory.pci_functions[0].role",
        "inventory.gpus[0].mig_mode_current",
    ]


# -- references that do not hold ---------------------------------------------


def test_a_function_whose_iommu_group_is_missing_is_refused() -> None:
    # Passthrough would bind the device and not its group mates.
    inv = golden("virt-2s")
    del inv.iommu_groups[0]  # the legacy bridge's group: 00:1e.0, 06:0d.0, 06:0d.1
    assert problems(inv) == [
        FieldViolation(f"inventory.pci_functions[{i}].iommu_group", message)
        for i, message in enumerate(["group 0 is not among iommu_groups"] * 3)
    ]


def test_group_members_must_be_reported_functions_in_that_group_and_in_no_other() -> None:
    inv = golden("virt-2s")
    inv.iommu_groups[1].members.append("0000:99:00.0")  # unknown
    inv.iommu_groups[2].members.append("0000:06:0d.0")  # already in group 0
    inv.iommu_groups[3].members.append("0000:31:00.0")  # listed twice in its own group? no: 2's
    assert problems(inv) == [
        FieldViolation(
            "inventory.iommu_groups[1].members[1]",
            "'0000:99:00.0' is not among the reported pci_functions",
        ),
        FieldViolation(
            "inventory.iommu_groups[2].members[1]",
            "0000:06:0d.0 is also in inventory.iommu_groups[0]",
        ),
        FieldViolation(
            "inventory.iommu_groups[3].members[1]",
            "0000:31:00.0 is also in inventory.iommu_groups[2]",
        ),
    ]


def test_bridge_chains_that_loop_are_refused() -> None:
    inv = golden("hgx-8gpu")
    # The first switch's upstream port now claims to sit below its own
    # downstream port, which sits below it.
    upstream = function(inv, "0000:05:00.0")
    upstream.bridge_chain[:] = ["0000:04:01.0", "0000:06:00.0"]
    found = problems(inv)
    assert found
    assert all(v.field.startswith("inventory.pci_functions[") for v in found)
    assert any(
        v.message.startswith("bridge chains loop: 0000:06:00.0 -> 0000:05:00.0 -> 0000:06:00.0")
        for v in found
    )


def test_a_two_function_bridge_loop_is_named_as_a_loop() -> None:
    inv = golden("hgx-8gpu")
    function(inv, "0000:04:01.0").bridge_chain[:] = ["0000:05:00.0"]
    messages = [v.message for v in problems(inv)]
    assert "bridge chains loop: 0000:04:01.0 -> 0000:05:00.0 -> 0000:04:01.0" in messages


def test_a_bridge_chain_must_name_reported_bridges_and_never_the_function_itself() -> None:
    inv = golden("hgx-8gpu")
    gpu = function(inv, "0000:07:00.0")
    gpu.bridge_chain.append("0000:0a:00.0")  # an endpoint
    gpu.bridge_chain.append("0000:ff:1f.7")  # nothing
    gpu.bridge_chain.append("0000:07:00.0")  # itself
    i = index(inv, "0000:07:00.0")
    assert problems(inv) == [
        FieldViolation(
            f"inventory.pci_functions[{i}].bridge_chain[3]",
            "0000:0a:00.0 is not a bridge but PCI_ROLE_ENDPOINT",
        ),
        FieldViolation(
            f"inventory.pci_functions[{i}].bridge_chain[4]",
            "'0000:ff:1f.7' is not among the reported pci_functions",
        ),
        FieldViolation(
            f"inventory.pci_functions[{i}].bridge_chain[5]", "0000:07:00.0 cannot sit below itself"
        ),
    ]


def test_vfs_belong_to_their_pf_at_the_addresses_sr_iov_gives_them() -> None:
    inv = golden("virt-2s")
    pf = inv.sriov_pfs[0]  # 0000:31:00.0, offset 2, stride 1
    pf.num_vfs = 2
    for i, address in enumerate(("0000:31:00.2", "0000:31:00.3")):
        inv.pci_functions.add(
            address=address, physfn=pf.address, iommu_group=50 + i, has_iommu_group=True,
            role=inventory_pb2.PCI_ROLE_ENDPOINT, numa_node=0,
        )  # fmt: skip
        inv.iommu_groups.add(number=50 + i, members=[address])
        pf.vfs.add(index=i, address=address, iommu_group=50 + i, has_iommu_group=True)
    assert problems(inv) == []

    pf.vfs[1].address = "0000:31:00.4"  # not where VF 1 sits, and no such function
    function(inv, "0000:31:00.2").physfn = "0000:31:00.1"  # another PF's VF now
    assert problems(inv) == [
        FieldViolation(
            "inventory.sriov_pfs[0].vfs[0].address", "0000:31:00.2 reports physfn '0000:31:00.1'"
        ),
        FieldViolation(
            "inventory.sriov_pfs[0].vfs[1].address", "VF 1 of 0000:31:00.0 is 0000:31:00.3"
        ),
        FieldViolation(
            "inventory.sriov_pfs[0].vfs[1].address",
            "'0000:31:00.4' is not among the reported pci_functions",
        ),
        FieldViolation(
            "inventory.pci_functions[14].physfn",
            "PF 0000:31:00.1 does not list 0000:31:00.2 among its vfs",
        ),
        FieldViolation(
            "inventory.pci_functions[15].physfn",
            "PF 0000:31:00.0 does not list 0000:31:00.3 among its vfs",
        ),
    ]


def test_mdev_instances_name_a_type_their_parent_offers_by_uuid() -> None:
    inv = golden("vgpu")
    parent = inv.mdev_parents[0]
    parent.instances.add(uuid="8f1f6a2c-0b9c-4b7e-9d0a-3c6d2f1e4a5b", type_id=parent.types[0].id)
    parent.instances.add(uuid="8f1f6a2c-0b9c-4b7e-9d0a-3c6d2f1e4a5b", type_id="nvidia-9999")
    parent.instances.add(uuid="../../sys", type_id=parent.types[0].id)
    assert problems(inv) == [
        FieldViolation(
            "inventory.mdev_parents[0].instances[1].uuid",
            "mdev 8f1f6a2c-0b9c-4b7e-9d0a-3c6d2f1e4a5b is listed twice",
        ),
        FieldViolation(
            "inventory.mdev_parents[0].instances[1].type_id", "'nvidia-9999' is not a parent's type"
        ),
        FieldViolation("inventory.mdev_parents[0].instances[2].uuid", "'../../sys' is not a UUID"),
    ]


def test_live_mdevs_beyond_what_their_parent_holds_are_refused() -> None:
    inv = golden("vgpu")
    parent = inv.mdev_parents[0]
    one_only = next(t for t in parent.types if t.description.endswith("max_instance=1"))
    other = next(t for t in parent.types if t.id != one_only.id)
    for n in range(2):
        parent.instances.add(uuid=f"8f1f6a2c-0b9c-4b7e-9d0a-3c6d2f1e4a5{n}", type_id=one_only.id)
    parent.instances.add(uuid="8f1f6a2c-0b9c-4b7e-9d0a-3c6d2f1e4a59", type_id=other.id)
    messages = [
        v.message for v in problems(inv) if v.field == "inventory.mdev_parents[0].instances"
    ]
    assert messages[0] == "single_type, but the live mdevs are of 2 types"
    assert f"2 mdevs of {one_only.id}, whose description allows 1" in messages
    assert any(m.startswith("the live mdevs fill ") for m in messages)


def test_host_use_on_a_bridge_is_refused() -> None:
    inv = golden("hgx-8gpu")
    function(inv, "0000:06:00.0").host_use = "network interface eno1 is up"
    assert fields(inv) == [f"inventory.pci_functions[{index(inv, '0000:06:00.0')}].host_use"]


def test_an_mdev_type_stating_an_absurd_instance_limit_is_refused() -> None:
    inv = golden("vgpu")
    inv.mdev_parents[0].types[0].description = "num_heads=4, max_instance=99999"
    assert fields(inv) == ["inventory.mdev_parents[0].types[0].description"]


# -- duplicates ----------------------------------------------------------------


def test_duplicate_addresses_and_numbers_are_refused() -> None:
    inv = golden("virt-2s")
    inv.pci_functions.add().CopyFrom(inv.pci_functions[7])
    inv.sriov_pfs.add().CopyFrom(inv.sriov_pfs[0])
    inv.gpus.add().CopyFrom(inv.gpus[1])
    inv.iommu_groups.add(number=inv.iommu_groups[4].number, members=["0000:4b:00.0"])
    inv.numa_nodes.add().CopyFrom(inv.numa_nodes[0])
    messages = {v.field: v.message for v in problems(inv)}
    assert messages["inventory.pci_functions[14].address"] == (
        "0000:4b:00.0 is also inventory.pci_functions[7]"
    )
    assert messages["inventory.sriov_pfs[5].address"] == "0000:31:00.0 is listed twice"
    assert messages["inventory.gpus[2].address"] == "0000:b1:00.0 is listed twice"
    assert messages["inventory.iommu_groups[12].number"] == (
        "group 4 is also inventory.iommu_groups[4]"
    )
    assert messages["inventory.numa_nodes[2].id"] == "node 0 is listed twice"


# -- strings -------------------------------------------------------------------


def test_a_20_kb_host_id_is_refused_without_being_echoed() -> None:
    inv = golden("virt-2s")
    inv.host_id = "h" * 20_000
    with pytest.raises(InvalidRequestError) as refused:
        check_inventory(inv)
    assert refused.value.violations == [
        FieldViolation("inventory.host_id", "must be at most 128 characters, not 20,000")
    ]
    assert len(str(refused.value)) < 100


@pytest.mark.parametrize(
    ("where", "setter"),
    [
        ("inventory.gpus[0].model", lambda inv: setattr(inv.gpus[0], "model", "x" * 20_000)),
        (
            "inventory.pci_functions[0].driver",
            lambda inv: setattr(inv.pci_functions[0], "driver", "\x00" + "d" * 20_000),
        ),
        (
            "inventory.pci_functions[3].local_cpulist",
            lambda inv: setattr(inv.pci_functions[3], "local_cpulist", "0-1," * 5_000),
        ),
        ("inventory.notes[0]", lambda inv: inv.notes.append("n" * 20_000)),
        (
            "inventory.labels['zone']",
            lambda inv: inv.labels.__setitem__("zone", "z" * 20_000),
        ),
        ("inventory.labels", lambda inv: inv.labels.__setitem__("k" * 20_000, "v")),
        (
            "inventory.pci_functions[7].address",
            lambda inv: setattr(inv.pci_functions[7], "address", "0000:4b:00.0" * 2_000),
        ),
    ],
)
def test_a_20_kb_string_anywhere_is_refused_and_never_echoed_whole(
    where: str, setter: object
) -> None:
    inv = golden("virt-2s")
    setter(inv)  # type: ignore[operator]
    found = problems(inv)
    assert found and found[0].field == where
    assert all(len(str(v)) < 200 for v in found)


def test_odd_characters_in_names_and_free_text_are_refused() -> None:
    inv = golden("vgpu")
    inv.mdev_parents[0].types[0].name = "GRID\nP4-1Q"
    inv.mdev_parents[0].types[1].id = "nvidia 63"
    inv.pci_functions[0].driver = "nvidia;rm -rf"
    assert fields(inv) == [
        "inventory.pci_functions[0].driver",
        "inventory.mdev_parents[0].types[0].name",
        "inventory.mdev_parents[0].types[1].id",
    ]


@pytest.mark.parametrize(
    "driver",
    [
        "vfio-pci",  # plain passthrough: cannot migrate
        "vfio_pci",
        "mlx5_core",  # a host driver: the agent binds only VFIO drivers
        "mlx5_vfio_pci;reboot",
        "../mlx5_vfio_pci",
        "mlx5_vfio_pci\n",
        "x" * 60 + "_vfio_pci",  # past MODULE_NAME_LEN
    ],
)
def test_a_migration_driver_that_is_not_a_vfio_variant_driver_name_is_refused(
    driver: str,
) -> None:
    # The scheduler hands these names to the agent as the driver to bind.
    inv = golden("sriov-nic")
    assert inv.sriov_pfs[0].vf_migration_driver == "mlx5_vfio_pci"
    inv.sriov_pfs[0].vf_migration_driver = driver
    inv.pci_functions[0].migratability.migration_driver = driver
    assert fields(inv) == [
        "inventory.pci_functions[0].migratability.migration_driver",
        "inventory.sriov_pfs[0].vf_migration_driver",
    ]
    assert all(len(str(v)) < 200 for v in problems(inv))


def test_every_migration_driver_the_agent_knows_passes() -> None:
    inv = golden("sriov-nic")
    for driver in ("mlx5_vfio_pci", "qat_vfio_pci", "hisi_acc_vfio_pci", "hisi-acc-vfio-pci"):
        inv.sriov_pfs[0].vf_migration_driver = driver
        assert problems(inv) == []


# -- many problems, long lists -------------------------------------------------


def test_problems_past_the_reported_ones_are_counted_not_listed() -> None:
    inv = golden("dgx-a100")
    for f in inv.pci_functions:
        f.vendor_id = 2**32 - 1
    found, more = inventory_violations(inv)
    assert len(found) == MAX_REPORTED
    assert more == len(inv.pci_functions) - MAX_REPORTED
    with pytest.raises(InvalidRequestError) as refused:
        check_inventory(inv)
    assert str(refused.value).endswith(f"; and {more} more problems")


def test_a_list_over_its_bound_is_reported_once_and_its_entries_not_examined() -> None:
    inv = inventory_pb2.HostInventory(host_id="h", boot_id="b", iommu_present=True)
    for _ in range(MAX_PCI_FUNCTIONS + 1):
        inv.pci_functions.add(address="bogus", vendor_id=2**32 - 1)
    found, _ = inventory_violations(inv)
    assert found[0] == FieldViolation(
        "inventory.pci_functions", f"at most {MAX_PCI_FUNCTIONS} entries, not 16,385"
    )


# -- the entry points ----------------------------------------------------------


def hostile() -> inventory_pb2.HostInventory:
    inv = golden("virt-2s")
    inv.host_id = "h1"
    inv.boot_id = "b1"
    inv.sriov_pfs[2].total_vfs = 2**32 - 1
    inv.gpus[0].mig_profiles[0].slice_count = 0
    return inv


def test_register_refuses_a_hostile_inventory_and_writes_nothing(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    coordinator = PlacementCoordinator(RedisStateStore(redis_client), agents=None)  # type: ignore[arg-type]

    async def body() -> None:
        with pytest.raises(InvalidRequestError) as refused:
            await coordinator.register(hostile(), "agent:1")
        assert [v.field for v in refused.value.violations] == [
            "inventory.sriov_pfs[2].total_vfs",
            "inventory.gpus[0].mig_profiles[0].slice_count",
        ]
        assert await redis_client.keys("*") == []

    arun(body())


def test_heartbeat_refuses_a_hostile_inventory_and_keeps_the_one_stored(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    coordinator = PlacementCoordinator(RedisStateStore(redis_client), agents=None)  # type: ignore[arg-type]
    good = golden("virt-2s")
    good.host_id, good.boot_id = "h1", "b1"

    async def body() -> None:
        assert await coordinator.register(good, "agent:1")
        stored = await redis_client.hget(schema.host("h1"), "inventory")
        bad = hostile()
        bad.generation = 2
        with pytest.raises(InvalidRequestError, match=r"inventory\.sriov_pfs\[2\]\.total_vfs"):
            await coordinator.heartbeat("h1", "b1", bad)
        assert await redis_client.hget(schema.host("h1"), "inventory") == stored
        hosts = await coordinator.hosts()
        assert [h.host_id for h in hosts] == ["h1"]

    arun(body())


def test_tessera_plan_refuses_a_bad_inventory_file_in_one_line(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.mkdir()
    (hosts / "good.json").write_text(json_format.MessageToJson(golden("sriov-nic")))
    bad = golden("virt-2s")
    bad.sriov_pfs[2].total_vfs = 2**32 - 1
    (hosts / "virt-2s.json").write_text(json_format.MessageToJson(bad))
    requests = tmp_path / "requests.yaml"
    requests.write_text(
        yaml.safe_dump(
            [
                json_format.MessageToDict(
                    placement_pb2.PlacementRequest(
                        request_id="r1",
                        tenant="t",
                        claims=[
                            placement_pb2.Claim(
                                name="g", kind=placement_pb2.DEVICE_KIND_GPU, count=1
                            )
                        ],
                    )
                )
            ]
        )
    )
    done = subprocess.run(
        [BIN / "tessera", "plan", "--hosts", str(hosts), "--requests", str(requests)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"tessera plan: {hosts / 'virt-2s.json'}: ")
    assert "inventory.sriov_pfs[2].total_vfs: must be at most 65535" in done.stderr
