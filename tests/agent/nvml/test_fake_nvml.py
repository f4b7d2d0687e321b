"""The fake NVML behaves as NVIDIA's driver does for MIG (HW_FACTS §9).

Expected tables are spelled out from the shared reference mig_profiles.json
(``nvidia-smi mig -lgip`` / ``-lgipp``), independently of the fake's tables.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pynvml
import pytest

from tessera.agent.testing.nvml import STATE_FILE, FakeNvml, fake_gpu, write_state

# Profile ID -> (name, NVML profile index, slices, memory MB, placements (start, size)).
ONE_SLICE = [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)]
ONE_SLICE_DOUBLE_MEMORY = [(0, 2), (2, 2), (4, 2), (6, 2)]
TWO_SLICE = [(0, 2), (2, 2), (4, 2)]
THREE_SLICE = [(0, 4), (4, 4)]
FOUR_SLICE = [(0, 4)]
SEVEN_SLICE = [(0, 8)]

Table = dict[int, tuple[str, int, int, int | None, list[tuple[int, int]]]]

A100_40GB: Table = {
    19: ("1g.5gb", 0, 1, 4864, ONE_SLICE),
    20: ("1g.5gb+me", 7, 1, 4864, ONE_SLICE),
    15: ("1g.10gb", 9, 1, 9856, ONE_SLICE_DOUBLE_MEMORY),
    14: ("2g.10gb", 1, 2, 9856, TWO_SLICE),
    9: ("3g.20gb", 2, 3, 19968, THREE_SLICE),
    5: ("4g.20gb", 3, 4, 19968, FOUR_SLICE),
    0: ("7g.40gb", 4, 7, 40192, SEVEN_SLICE),
}
A100_80GB: Table = {
    19: ("1g.10gb", 0, 1, 9728, ONE_SLICE),
    20: ("1g.10gb+me", 7, 1, 9728, ONE_SLICE),
    15: ("1g.20gb", 9, 1, None, ONE_SLICE_DOUBLE_MEMORY),  # memory unconfirmed
    14: ("2g.20gb", 1, 2, 19968, TWO_SLICE),
    9: ("3g.40gb", 2, 3, 40192, THREE_SLICE),
    5: ("4g.40gb", 3, 4, 40192, FOUR_SLICE),
    0: ("7g.80gb", 4, 7, 80896, SEVEN_SLICE),
}
H100_80GB: Table = {
    19: ("1g.10gb", 0, 1, 9984, ONE_SLICE),
    20: ("1g.10gb+me", 7, 1, 9984, ONE_SLICE),
    15: ("1g.20gb", 9, 1, 20096, ONE_SLICE_DOUBLE_MEMORY),
    14: ("2g.20gb", 1, 2, 20096, TWO_SLICE),
    9: ("3g.40gb", 2, 3, 40448, THREE_SLICE),
    5: ("4g.40gb", 3, 4, 40448, FOUR_SLICE),
    0: ("7g.80gb", 4, 7, 81152, SEVEN_SLICE),
}
TABLES: dict[str, Table] = {
    "A100-SXM4-40GB": A100_40GB,
    "A100-80GB-PCIe": A100_80GB,
    "H100-80GB-HBM3": H100_80GB,
}


def driver(model: str, *, mig: bool = True) -> tuple[FakeNvml, object]:
    nvml = FakeNvml.in_memory([fake_gpu(model, "0000:4b:00.0", seed="t", mig_enabled=mig)])
    nvml.nvmlInit()
    return nvml, nvml.nvmlDeviceGetHandleByIndex(0)


def placements(nvml: FakeNvml, handle: object, profile_id: int) -> list[tuple[int, int]]:
    buf = (nvml.c_nvmlGpuInstancePlacement_t * 16)()
    count = ctypes.c_uint(16)
    nvml.nvmlDeviceGetGpuInstancePossiblePlacements(handle, profile_id, buf, ctypes.byref(count))
    return [(p.start, p.size) for p in buf[: count.value]]


def create(nvml: FakeNvml, handle: object, profile_id: int, start: int, size: int) -> object:
    placement = nvml.c_nvmlGpuInstancePlacement_t(start, size)
    return nvml.nvmlDeviceCreateGpuInstanceWithPlacement(
        handle, profile_id, ctypes.byref(placement)
    )


@pytest.mark.parametrize("model", sorted(TABLES))
@pytest.mark.parametrize("mig", [True, False])
def test_profiles_and_possible_placements_match_the_tables(model: str, mig: bool) -> None:
    # Placements are returned whatever the MIG mode (HW_FACTS §9.1).
    nvml, handle = driver(model, mig=mig)
    for profile_id, (name, index, slices, memory, expected) in TABLES[model].items():
        info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index)
        assert info.id == profile_id, name
        assert info.sliceCount == slices
        if memory is not None:
            assert info.memorySizeMB == memory
        assert info.name.removeprefix("MIG ") == name
        assert placements(nvml, handle, profile_id) == expected, name


def test_profile_index_walk_ends_with_invalid_argument() -> None:
    nvml, handle = driver("A100-SXM4-40GB")
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, 5)  # 8-slice: not on A100
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT)


def test_too_small_a_buffer_is_insufficient_size_with_the_count() -> None:
    nvml, handle = driver("H100-80GB-HBM3")
    buf = (nvml.c_nvmlGpuInstancePlacement_t * 2)()
    count = ctypes.c_uint(2)
    with pytest.raises(pynvml.NVMLError_InsufficientSize):
        nvml.nvmlDeviceGetGpuInstancePossiblePlacements(handle, 19, buf, ctypes.pointer(count))
    assert count.value == 7


def test_calls_before_init_are_uninitialized() -> None:
    nvml = FakeNvml.in_memory([fake_gpu("Tesla-P4", "0000:b1:00.0", seed="t")])
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()


def test_non_mig_gpus_answer_not_supported() -> None:
    for model in ("Tesla-P4", "RTX-A6000"):
        nvml, handle = driver(model)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            nvml.nvmlDeviceGetMigMode(handle)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            nvml.nvmlDeviceCreateGpuInstance(handle, 19)


def test_create_with_mig_disabled_is_not_supported() -> None:
    nvml, handle = driver("A100-80GB-PCIe", mig=False)
    assert nvml.nvmlDeviceGetMigMode(handle) == [0, 0]
    with pytest.raises(pynvml.NVMLError_NotSupported):
        create(nvml, handle, 9, 0, 4)
    assert nvml.nvmlDeviceSetMigMode(handle, pynvml.NVML_DEVICE_MIG_ENABLE) == 0
    create(nvml, handle, 9, 0, 4)


def test_mode_change_stays_pending_where_a_reset_is_impossible() -> None:
    gpu = fake_gpu("A100-80GB-PCIe", "0000:4b:00.0", seed="t", reset_required=True)
    nvml = FakeNvml.in_memory([gpu])
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    status = nvml.nvmlDeviceSetMigMode(handle, pynvml.NVML_DEVICE_MIG_ENABLE)
    assert status == pynvml.NVML_ERROR_RESET_REQUIRED
    assert nvml.nvmlDeviceGetMigMode(handle) == [0, 1]


def test_bad_profile_or_placement_is_invalid_argument() -> None:
    nvml, handle = driver("A100-SXM4-40GB")
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceCreateGpuInstance(handle, 42)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        create(nvml, handle, 9, 2, 4)  # 3g starts at 0 or 4 only
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        create(nvml, handle, 14, 6, 2)  # 2g never at 6


def test_overlap_is_insufficient_resources() -> None:
    nvml, handle = driver("A100-SXM4-40GB")
    create(nvml, handle, 9, 4, 4)
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        create(nvml, handle, 14, 4, 2)
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        create(nvml, handle, 0, 0, 8)
    create(nvml, handle, 5, 0, 4)  # 4g + 3g fill the 7 compute slices
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        nvml.nvmlDeviceCreateGpuInstance(handle, 19)
    assert nvml.nvmlDeviceGetGpuInstanceRemainingCapacity(handle, 19) == 0


def test_seven_one_slice_instances_then_full() -> None:
    nvml, handle = driver("H100-80GB-HBM3")
    assert nvml.nvmlDeviceGetGpuInstanceRemainingCapacity(handle, 19) == 7
    gis = [nvml.nvmlDeviceCreateGpuInstance(handle, 19) for _ in range(7)]
    starts = sorted(nvml.nvmlGpuInstanceGetInfo(g).placement.start for g in gis)
    assert starts == list(range(7))
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        nvml.nvmlDeviceCreateGpuInstance(handle, 19)


def test_gi_ids_are_driver_assigned_not_a_function_of_placement() -> None:
    nvml, handle = driver("A100-SXM4-40GB")
    first = create(nvml, handle, 9, 4, 4)
    second = create(nvml, handle, 9, 0, 4)
    id_at_4 = nvml.nvmlGpuInstanceGetInfo(first).id
    ids = {id_at_4, nvml.nvmlGpuInstanceGetInfo(second).id}
    assert len(ids) == 2
    nvml.nvmlGpuInstanceDestroy(first)
    nvml.nvmlGpuInstanceDestroy(second)
    # Same placements, other order: the id at slice 4 need not be the same.
    later_0 = create(nvml, handle, 9, 0, 4)
    later_4 = create(nvml, handle, 9, 4, 4)
    later = {nvml.nvmlGpuInstanceGetInfo(g).id for g in (later_0, later_4)}
    assert len(later) == 2
    assert nvml.nvmlGpuInstanceGetInfo(later_4).id != id_at_4


def test_destroy_with_compute_instances_is_in_use() -> None:
    nvml, handle = driver("A100-80GB-PCIe")
    gi = create(nvml, handle, 9, 0, 4)
    ci = nvml.nvmlGpuInstanceCreateComputeInstance(gi, 2)  # the full 3g CI
    with pytest.raises(pynvml.NVMLError_InsufficientResources):
        nvml.nvmlGpuInstanceCreateComputeInstance(gi, 0)
    with pytest.raises(pynvml.NVMLError_InUse):
        nvml.nvmlGpuInstanceDestroy(gi)
    with pytest.raises(pynvml.NVMLError_InUse):
        nvml.nvmlDeviceSetMigMode(handle, pynvml.NVML_DEVICE_MIG_DISABLE)
    assert nvml.nvmlComputeInstanceGetInfo(ci).profileId == 2
    nvml.nvmlComputeInstanceDestroy(ci)
    nvml.nvmlGpuInstanceDestroy(gi)
    with pytest.raises(pynvml.NVMLError_NotFound):
        nvml.nvmlGpuInstanceGetInfo(gi)


def test_no_3c_compute_instance_on_a_4g_instance() -> None:
    nvml, handle = driver("A100-SXM4-40GB")
    gi = create(nvml, handle, 5, 0, 4)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlGpuInstanceCreateComputeInstance(gi, 2)
    cis = [nvml.nvmlGpuInstanceCreateComputeInstance(gi, 0) for _ in range(4)]
    assert len({nvml.nvmlComputeInstanceGetInfo(c).id for c in cis}) == 4


def test_state_file_is_shared_between_instances(tmp_path: Path) -> None:
    write_state(tmp_path, [fake_gpu("A100-80GB-PCIe", "0000:4b:00.0", seed="t", mig_enabled=True)])
    assert (tmp_path / STATE_FILE).exists()
    one, other = FakeNvml.from_tree(tmp_path), FakeNvml.from_tree(tmp_path)
    one.nvmlInit()
    other.nvmlInit()
    gi = create(one, one.nvmlDeviceGetHandleByIndex(0), 14, 2, 2)
    info = other.nvmlGpuInstanceGetInfo(gi)
    assert (info.profileId, info.placement.start, info.placement.size) == (14, 2, 2)


def test_compute_instance_profiles_of_a_4g_instance_skip_the_3_slice_one() -> None:
    # HW_FACTS §9.2: a 4g GI offers CI profiles 0, 1 and 3, default 3 (4 slices).
    nvml, handle = driver("A100-SXM4-40GB")
    gi = create(nvml, handle, 5, 0, 4)
    shared = pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
    offered = {}
    for profile in range(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
        try:
            info = nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, profile, shared)
        except pynvml.NVMLError_NotSupported:
            continue
        offered[info.id] = info.sliceCount
    assert offered == {0: 1, 1: 2, 3: 4}
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(
            gi, pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT, shared
        )


def test_a_compute_instance_is_found_by_id_until_destroyed() -> None:
    nvml, handle = driver("A100-SXM4-40GB")
    gi = create(nvml, handle, 9, 0, 4)
    ci = nvml.nvmlGpuInstanceCreateComputeInstance(gi, 2)
    ci_id = nvml.nvmlComputeInstanceGetInfo(ci).id

    found = nvml.nvmlGpuInstanceGetComputeInstanceById(gi, ci_id)
    nvml.nvmlComputeInstanceDestroy(found)

    with pytest.raises(pynvml.NVMLError_NotFound):
        nvml.nvmlGpuInstanceGetComputeInstanceById(gi, ci_id)
