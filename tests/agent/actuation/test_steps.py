"""Step records survive the checkpoint's JSON, and malformed ones are refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tessera.agent.actuation.steps import MdevCreate, MigCreate, SriovEnable, StepRecord, VfioBind
from tessera.agent.actuation.vfio import BindingRecord


@pytest.mark.parametrize(
    "record",
    [
        StepRecord(VfioBind((BindingRecord("0000:01:00.0", "nvidia", None),))),
        StepRecord(
            VfioBind((BindingRecord("0000:31:00.3", None, None),), "mlx5_vfio_pci", "0000:31:00.0"),
            "done",
        ),
        StepRecord(SriovEnable("0000:31:00.0", 4, original_autoprobe=True), "done"),
        StepRecord(
            MdevCreate("0000:b1:00.0", "nvidia-63", "3f1d7f58-0c55-4c4e-9b0e-1d2a3b4c5d01", True)
        ),
        StepRecord(MigCreate("GPU-1", "0000:4b:00.0", 9, 4, 4)),
        StepRecord(MigCreate("GPU-1", "0000:4b:00.0", 0, 0, 8, gi_id=1, ci_id=0), "done"),
    ],
)
def test_a_step_record_survives_a_json_round_trip(record: StepRecord) -> None:
    assert StepRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


@pytest.mark.parametrize(
    "data",
    [
        {"state": "half", "op": "sriov_enable", "pf": "0000:31:00.0"},
        {"state": "started", "op": "format_disk"},
        {
            "state": "started",
            "op": "sriov_enable",
            "pf": "31:00.0",
            "num_vfs": 4,
            "original_autoprobe": True,
        },
        {
            "state": "started",
            "op": "mig_create",
            "gpu_uuid": "GPU-1",
            "gpu_address": "0000:4b:00.0",
            "profile_id": True,
            "start": 0,
            "size": 8,
            "gi_id": -1,
            "ci_id": -1,
        },
        {"state": "done", "op": "mdev_create", "parent": "0000:b1:00.0", "type_id": "nvidia-63"},
    ],
)
def test_a_malformed_step_record_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="step record"):
        StepRecord.from_dict(data)


def test_partitions_overlap_only_on_one_gpu_and_shared_slices() -> None:
    three_g_low = MigCreate("GPU-1", "0000:4b:00.0", 9, 0, 4)
    assert three_g_low.overlaps(MigCreate("GPU-1", "0000:4b:00.0", 19, 3, 1))
    assert not three_g_low.overlaps(MigCreate("GPU-1", "0000:4b:00.0", 9, 4, 4))
    assert not three_g_low.overlaps(MigCreate("GPU-2", "0000:4c:00.0", 9, 0, 4))
