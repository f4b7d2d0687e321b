"""What a host's devices are used for, by whom, and how full: what operators are shown.

On the named hosts of ``checker_topologies`` (``mixed()``: every form, a
boot display in host use; ``gpu_host()``: H100s in MIG mode) and the SR-IOV
vGPU host of ``test_vgpu_vfs`` (a GPU's VFs are mdev parents). Allocations
are slot keys as the store holds them; nothing here is mocked.
"""

from __future__ import annotations

from dataclasses import replace

from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.host_usage import DeviceUse, HostUsage, host_usage
from tessera.scheduler.core.identity import PciAddress, PlacementId, RequestId, SlotKey, TenantName
from tessera.scheduler.core.mig import GpuInstance
from tessera.scheduler.core.occupancy import build_occupancy
from tessera.scheduler.core.request import ExclusivityDomain
from tessera.scheduler.core.slots import (
    exclusive_slot,
    host_share_slot,
    mdev_slot,
    mig_slot,
    vf_slot,
)
from tessera.scheduler.core.snapshot import HostState

from .checker_topologies import (
    A100,
    GPU_A,
    GPU_B,
    GPU_HOST_USE,
    GPU_WITH_USB,
    LIVE_MDEV_UUID,
    MDEV_GPU,
    MDEV_SINGLE,
    MIG_GPU,
    PF_EMPTY,
    PF_ENABLED,
    USB,
    VF_0,
    VF_1,
    cluster,
    gpu_host,
    mixed,
)
from .test_vgpu_vfs import PF as VGPU_PF
from .test_vgpu_vfs import VF0 as VGPU_VF0
from .test_vgpu_vfs import VGPU, vgpu_host

#: The H100 of a one-GPU ``gpu_host``.
H100 = PciAddress("0000:81:00.0")
NO_UNITS = {"whole": 0, "vf": 0, "mdev": 0, "mig": 0}


def usage_of(state: HostState) -> HostUsage:
    return host_usage(state, build_occupancy(state))


def mixed_state(allocations: dict[str, str], tenants: dict[str, str]) -> HostState:
    """``mixed()`` with some slots held (slot -> placement) by tenants (placement -> tenant)."""
    snapshot = cluster(mixed(), allocations={"mixed": allocations}, tenants=tenants)
    return next(iter(snapshot.hosts.values()))


def test_an_untouched_host_shows_only_what_lives_on_it_and_what_the_host_uses() -> None:
    usage = usage_of(mixed_state({}, {}))
    uses = {address: d.use for address, d in usage.devices.items()}
    assert uses == {
        GPU_A: DeviceUse.FREE,
        GPU_B: DeviceUse.FREE,
        GPU_HOST_USE: DeviceUse.HOST,  # the boot display: never offered whole
        GPU_WITH_USB: DeviceUse.FREE,
        PF_EMPTY: DeviceUse.FREE,
        PF_ENABLED: DeviceUse.VF,  # VFs enabled: the PF cannot go whole
        MDEV_GPU: DeviceUse.FREE,
        MDEV_SINGLE: DeviceUse.MDEV,  # someone made a live nvidia-1
        MIG_GPU: DeviceUse.MIG,  # a live 3g.40gb
    }
    # Offered functions only, VFs, bridges and the USB controller aside, in the view's order.
    assert list(usage.devices) == [a for a in mixed().functions if a in uses]
    assert VF_0 not in usage.devices and VF_1 not in usage.devices and USB not in usage.devices
    # Live units nobody placed count by form, under no tenant.
    assert usage.by_form == {"whole": 0, "vf": 0, "mdev": 1, "mig": 1}
    assert usage.tenants == {}
    assert usage.devices[MDEV_SINGLE].tenants == () and usage.devices[MDEV_SINGLE].units_used == 1
    # Groups 50 (host use), 21 (VFs on), 31 (live mdev), 40 (live MIG) of nine.
    assert (usage.groups_assignable, usage.groups_used) == (9, 4)


def test_each_form_held_is_counted_on_its_device_and_for_its_tenant() -> None:
    state = mixed_state(
        {
            "iommu-group:10": "pl-whole",
            vf_slot(PF_EMPTY, 3): "pl-vf",
            vf_slot(PF_ENABLED, 1): "pl-vf",
            mdev_slot(MDEV_GPU, "nvidia-2", "u-1"): "pl-mdev",
            mig_slot(MIG_GPU, 19, 0, 1): "pl-mig",
        },
        {"pl-whole": "acme", "pl-vf": "blue", "pl-mdev": "acme", "pl-mig": "cyan"},
    )
    usage = usage_of(state)
    whole, vf_empty, vf_on = (
        usage.devices[GPU_A],
        usage.devices[PF_EMPTY],
        usage.devices[PF_ENABLED],
    )
    mdev, mig = usage.devices[MDEV_GPU], usage.devices[MIG_GPU]
    assert (whole.use, whole.units_used, whole.units_total) == (DeviceUse.WHOLE, 1, 1)
    assert (whole.tenants, whole.placements) == (("acme",), ("pl-whole",))
    # VFs: of the PF's sriov_totalvfs.
    assert (vf_empty.use, vf_empty.units_used, vf_empty.units_total) == (DeviceUse.VF, 1, 8)
    assert (vf_on.use, vf_on.units_used, vf_on.units_total) == (DeviceUse.VF, 1, 8)
    assert vf_on.tenants == ("blue",)
    # mdevs: in instances of the most used type (nvidia-2, two to a parent).
    assert (mdev.use, mdev.units_used, mdev.units_total) == (DeviceUse.MDEV, 1, 2)
    # MIG: compute slices, of 7: the live 3g.40gb (3) and the allocated 1g.10gb (1).
    assert (mig.use, mig.units_used, mig.units_total) == (DeviceUse.MIG, 4, 7)
    assert (mig.tenants, mig.placements) == (("cyan",), ("pl-mig",))

    assert usage.by_form == {"whole": 1, "vf": 2, "mdev": 2, "mig": 2}
    assert usage.tenants == {
        "acme": {"whole": 1, "vf": 0, "mdev": 1, "mig": 0},
        "blue": {"whole": 0, "vf": 2, "mdev": 0, "mig": 0},
        "cyan": {"whole": 0, "vf": 0, "mdev": 0, "mig": 1},
    }
    assert list(usage.tenants) == ["acme", "blue", "cyan"]
    # Groups 10, 20 and 30 join 50, 21, 31 and 40.
    assert (usage.groups_assignable, usage.groups_used) == (9, 7)


def test_the_units_per_tenant_sum_to_those_by_form_less_the_ones_nobody_placed() -> None:
    state = mixed_state(
        {
            mdev_slot(MDEV_SINGLE, "nvidia-1", "u-2"): "pl-1",
            mdev_slot(MDEV_SINGLE, "nvidia-1", "u-3"): "pl-2",
            mig_slot(MIG_GPU, 9, 0, 4): "pl-3",
        },
        {"pl-1": "acme", "pl-2": "blue", "pl-3": "acme"},
    )
    usage = usage_of(state)
    placed = {f: sum(counts[f] for counts in usage.tenants.values()) for f in usage.by_form}
    live_only = {"whole": 0, "vf": 0, "mdev": 1, "mig": 1}  # the live nvidia-1 and 3g.40gb
    assert {f: usage.by_form[f] - placed[f] for f in usage.by_form} == live_only
    single = usage.devices[MDEV_SINGLE]
    assert (single.units_used, single.units_total) == (3, 4)
    assert single.tenants == ("acme", "blue") and single.placements == ("pl-1", "pl-2")
    # Both 3g.40gb halves taken: the MIG GPU is full.
    assert (usage.devices[MIG_GPU].units_used, usage.devices[MIG_GPU].units_total) == (6, 7)


def test_an_mdev_the_agent_made_already_is_counted_once() -> None:
    state = mixed_state(
        {mdev_slot(MDEV_SINGLE, "nvidia-1", LIVE_MDEV_UUID): "pl-1"}, {"pl-1": "acme"}
    )
    usage = usage_of(state)
    assert usage.by_form["mdev"] == 1 and usage.tenants[TenantName("acme")]["mdev"] == 1
    assert usage.devices[MDEV_SINGLE].units_used == 1


def test_holds_on_no_device_count_in_no_form() -> None:
    state = mixed_state(
        {
            exclusive_slot(ExclusivityDomain.HOST, "mixed", RequestId("r1")): "pl-1",
            host_share_slot(4000, 8192, TenantName("acme"), RequestId("r1")): "pl-1",
            "not-a-slot-key": "pl-2",
        },
        {"pl-1": "acme", "pl-2": "blue"},
    )
    usage = usage_of(state)
    assert usage.tenants == {}
    assert usage.by_form == {"whole": 0, "vf": 0, "mdev": 1, "mig": 1}  # the live ones alone
    assert all(d.placements == () for d in usage.devices.values())


def test_a_placement_the_store_names_no_tenant_for_counts_as_a_stranger() -> None:
    state = mixed_state({"iommu-group:11": "pl-orphan"}, {})
    usage = usage_of(state)
    assert usage.devices[GPU_B].tenants == ("placement:pl-orphan",)
    assert usage.tenants == {"placement:pl-orphan": {**NO_UNITS, "whole": 1}}


def test_the_host_use_device_is_never_free_and_its_group_is_used() -> None:
    usage = usage_of(mixed_state({}, {}))
    display = usage.devices[GPU_HOST_USE]
    assert (display.use, display.units_used, display.units_total) == (DeviceUse.HOST, 1, 1)
    assert display.tenants == () and display.iommu_group == 50
    assert (display.kind, display.model, display.numa_node) == ("gpu", A100, 0)


def test_a_host_use_pf_whose_vfs_tenants_hold_shows_them() -> None:
    view = mixed()
    nic = replace(view.functions[PF_EMPTY], host_use="link up (host networking)")
    view = replace(view, functions={**view.functions, PF_EMPTY: nic})
    state = HostState(
        view,
        1,
        allocations={SlotKey(vf_slot(PF_EMPTY, 0)): PlacementId("pl-1")},
        tenants={PlacementId("pl-1"): TenantName("acme")},
    )
    usage = usage_of(state)
    assert usage.devices[PF_EMPTY].use is DeviceUse.VF
    assert usage.devices[PF_EMPTY].tenants == ("acme",)


def test_a_mig_gpu_handed_over_whole_is_in_whole_use_and_offers_no_mig_instance() -> None:
    view = gpu_host("h", mig=[()])
    state = HostState(
        view,
        1,
        allocations={SlotKey("iommu-group:100"): PlacementId("pl-1")},
        tenants={PlacementId("pl-1"): TenantName("acme")},
    )
    usage = usage_of(state)
    gpu = usage.devices[H100]
    assert (gpu.use, gpu.units_used, gpu.units_total) == (DeviceUse.WHOLE, 1, 1)
    assert usage.by_form == {**NO_UNITS, "whole": 1}
    assert (usage.gpus, usage.gpu_free_share) == (1, 0.0)
    # ListHosts' MIG capacity agrees: nothing free on a GPU passed through.
    assert Engine().mig_capacity(state) == [(H100, {}, 0.0)]


def test_a_free_mig_gpu_is_free_whole_and_offers_every_profile() -> None:
    state = HostState(gpu_host("h", mig=[()]), 1)
    usage = usage_of(state)
    assert usage.devices[H100].use is DeviceUse.FREE
    assert (usage.gpus, usage.gpu_free_share, usage.groups_used) == (1, 1.0, 0)
    [(address, free, _)] = Engine().mig_capacity(state)
    assert address == H100 and free["1g.10gb"] == 7 and free["7g.80gb"] == 1


def test_overlapping_mig_instances_make_the_gpu_unusable_and_its_group_used() -> None:
    overlapping = (GpuInstance(0, 4, 9, 3), GpuInstance(2, 2, 14, 2))
    state = HostState(gpu_host("h", mig=[overlapping]), 1)
    usage = usage_of(state)
    gpu = usage.devices[H100]
    assert (gpu.use, gpu.units_used, gpu.units_total) == (DeviceUse.UNUSABLE, 1, 1)
    assert (usage.groups_assignable, usage.groups_used) == (1, 1)
    assert usage.by_form["mig"] == 2  # they exist, however wrongly
    assert Engine().mig_capacity(state) == [(H100, {}, 0.0)]


def test_gpu_free_share_sums_the_free_share_of_every_gpu() -> None:
    half = (GpuInstance(0, 4, 9, 3),)  # 3 of 7 compute slices
    state = HostState(gpu_host("h", mig=[half, ()], plain=1), 1)
    usage = usage_of(state)
    assert usage.gpus == 3
    assert abs(usage.gpu_free_share - (4 / 7 + 1 + 1)) < 1e-9


def test_an_mdev_on_a_vf_of_an_sr_iov_vgpu_counts_on_its_pf() -> None:
    state = replace(
        vgpu_host(),
        allocations={SlotKey(mdev_slot(VGPU_VF0, VGPU, "u-1")): PlacementId("pl-1")},
        tenants={PlacementId("pl-1"): TenantName("acme")},
    )
    usage = usage_of(state)
    assert list(usage.devices) == [VGPU_PF]  # its VFs are not listed
    pf = usage.devices[VGPU_PF]
    # VFs are enabled, and VF0 carries the mdev: one of two VFs held.
    assert (pf.use, pf.units_used, pf.units_total) == (DeviceUse.VF, 1, 2)
    assert pf.tenants == ("acme",) and pf.placements == ("pl-1",)
    assert usage.by_form == {**NO_UNITS, "mdev": 1}
    assert usage.tenants == {"acme": {**NO_UNITS, "mdev": 1}}
