"""MIG partitions through the production NVML client over the fake driver."""

from __future__ import annotations

from typing import Any

import pytest

from tessera.agent.actuation.mig import MigActuationError, MigPartitioner
from tessera.agent.nvml import MigPlacement, NullNvmlClient, NvmlGpu, PynvmlClient
from tessera.agent.testing.nvml import FakeNvml, fake_gpu

A100 = "0000:07:00.0"
THREE_G = 9  # 3g.20gb on A100-SXM4-40GB: placements 0+4, 4+4
ONE_G = 19  # 1g.5gb: placements 0+1 .. 6+1
#: NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE: the CI covering a whole 3g GI.
CI_3_SLICE = 2


@pytest.fixture
def fake() -> FakeNvml:
    nvml = FakeNvml.in_memory([fake_gpu("A100-SXM4-40GB", A100, seed="t", mig_enabled=True)])
    nvml.nvmlInit()
    return nvml


def gpu_state(fake: FakeNvml) -> dict[str, Any]:
    """The fake driver's record of the GPU (its GPU and compute instances)."""
    state: dict[str, Any] = fake._state["gpus"][0]
    return state


def the_gpu(mig: MigPartitioner) -> NvmlGpu:
    gpu = mig.gpu(A100)
    assert gpu is not None
    return gpu


def test_a_partition_is_one_gpu_instance_at_the_placement_with_one_whole_compute_instance(
    fake: FakeNvml,
) -> None:
    mig = MigPartitioner(PynvmlClient(fake))
    gpu = the_gpu(mig)

    gi_id = mig.create_gpu_instance(gpu, A100, THREE_G, MigPlacement(4, 4))
    ci = mig.create_compute_instance(gpu, A100, gi_id)

    [gi] = gpu_state(fake)["instances"]
    assert (gi["id"], gi["profile_id"], gi["start"], gi["size"]) == (gi_id, THREE_G, 4, 4)
    assert [(c["id"], c["profile_id"]) for c in gi["cis"]] == [(ci.ci_id, CI_3_SLICE)]
    assert ci.uuid == gi["cis"][0]["uuid"] and ci.uuid.startswith("MIG-")


def test_an_occupied_placement_is_insufficient_resources(fake: FakeNvml) -> None:
    mig = MigPartitioner(PynvmlClient(fake))
    gpu = the_gpu(mig)
    mig.create_gpu_instance(gpu, A100, ONE_G, MigPlacement(5, 1))

    with pytest.raises(MigActuationError, match="INSUFFICIENT_RESOURCES"):
        mig.create_gpu_instance(gpu, A100, THREE_G, MigPlacement(4, 4))


def test_destroy_takes_the_compute_instance_then_the_gpu_instance_and_is_idempotent(
    fake: FakeNvml,
) -> None:
    mig = MigPartitioner(PynvmlClient(fake))
    gpu = the_gpu(mig)
    gi_id = mig.create_gpu_instance(gpu, A100, THREE_G, MigPlacement(0, 4))
    mig.create_compute_instance(gpu, A100, gi_id)

    mig.destroy(gpu.uuid, A100, THREE_G, MigPlacement(0, 4), gi_id)
    mig.destroy(gpu.uuid, A100, THREE_G, MigPlacement(0, 4), gi_id)

    assert gpu_state(fake)["instances"] == []


def test_destroy_never_takes_an_instance_whose_id_was_reused_elsewhere(fake: FakeNvml) -> None:
    # After a reboot the recorded GI id may name another partition.
    mig = MigPartitioner(PynvmlClient(fake))
    gpu = the_gpu(mig)
    other = mig.create_gpu_instance(gpu, A100, THREE_G, MigPlacement(4, 4))

    mig.destroy(gpu.uuid, A100, THREE_G, MigPlacement(0, 4), other)

    assert [gi["id"] for gi in gpu_state(fake)["instances"]] == [other]


def test_without_nvml_there_is_no_gpu_and_nothing_to_destroy() -> None:
    mig = MigPartitioner(NullNvmlClient("no driver"))

    assert mig.gpu(A100) is None
    mig.destroy("GPU-x", A100, THREE_G, MigPlacement(0, 4), -1)
