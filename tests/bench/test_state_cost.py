"""bench/state_cost.py: every stage measured, every policy's first request, one host's update."""

from __future__ import annotations

from pathlib import Path

from bench import state_cost
from bench.fleet import DEFAULT_MIX
from bench.policies import POLICIES


def test_state_cost_small_fleet(tmp_path: Path) -> None:
    result = state_cost.state_cost(40, samples=10)
    assert result["hosts"] == 40
    assert result["parse"]["traced_mib"] > 0
    assert set(result["first_request"]) == set(POLICIES)
    assert set(result["topology_per_class"]) == set(DEFAULT_MIX)
    assert result["update"]["commit_with_reservation"]["n"] == 10
    md = state_cost.section(result, tmp_path)
    assert "One host's update" in md
    assert (tmp_path / "state_cost_memory.png").exists()
