"""bench/place_server.py: one tree measured in its own process, every figure reported."""

from __future__ import annotations

from pathlib import Path

from bench import place_server


def test_place_server_small_fleet_reports_every_figure(tmp_path: Path) -> None:
    result = place_server.run(quick=True, baseline=None, sizes=[30])
    assert result["baseline"] is None
    run = result["runs"]["30"]["this"]
    assert run["hosts"] == 30
    assert run["sequential"]["n"] > 0 and run["host_update"]["n"] == place_server.UPDATE_SAMPLES
    assert run["concurrent"]["placed"] > 0
    md = place_server.section(result, tmp_path)
    assert "this tree" in md and "one host's update" in md
