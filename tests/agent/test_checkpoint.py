"""The agent's checkpoint survives restarts and never tears."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera.agent.checkpoint import Checkpoint, CheckpointEntry


def entry(pid: str, state: str = "started") -> CheckpointEntry:
    return CheckpointEntry(
        pid,
        state,  # type: ignore[arg-type]
        ({"address": "0000:01:00.0", "original_driver": "nvidia", "original_override": None},),
        b"\x00placement",
    )


def test_entries_survive_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "cp.json"
    cp = Checkpoint(path)
    cp.put(entry("a"))
    cp.put(entry("b", "prepared"))
    cp.remove("a")
    again = Checkpoint(path)
    assert list(again.entries()) == ["b"]
    assert again.get("b") == entry("b", "prepared")


def test_no_temporary_file_is_left_behind(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path / "cp.json")
    cp.put(entry("a"))
    assert [p.name for p in tmp_path.iterdir()] == ["cp.json"]


def test_an_unknown_state_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cp.json"
    path.write_text(
        '{"version": 1, "placements": {"a": {"state": "weird", "bindings": [], "placement": ""}}}'
    )
    with pytest.raises(ValueError, match="unknown state"):
        Checkpoint(path)


def test_a_checkpoint_written_before_step_records_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "cp.json"
    path.write_text(
        '{"version": 1, "placements": {"a": {"state": "prepared", "bindings": '
        '[{"address": "0000:01:00.0", "original_driver": "nvidia", "original_override": null}],'
        ' "placement": "AHBsYWNlbWVudA=="}}}'
    )

    loaded = Checkpoint(path).get("a")

    assert loaded == entry("a", "prepared")
    assert loaded is not None and loaded.steps == ()


def test_the_ledger_of_created_objects_survives_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "cp.json"
    cp = Checkpoint(path)
    cp.put(entry("a"), remember={"mdev:u1": {"uuid": "u1"}, "mdev:u2": {"uuid": "u2"}})
    cp.put(entry("a"), forget="mdev:u1")
    cp.remove("a")
    cp.forget("mdev:absent")

    assert Checkpoint(path).created() == {"mdev:u2": {"uuid": "u2"}}


def test_a_checkpoint_written_before_the_ledger_loads_with_an_empty_one(tmp_path: Path) -> None:
    path = tmp_path / "cp.json"
    path.write_text('{"version": 1, "placements": {}}')

    assert Checkpoint(path).created() == {}
