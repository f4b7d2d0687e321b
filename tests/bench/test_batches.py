"""Contended batches: the solver and every policy place safely; the section renders."""

from __future__ import annotations

import random
from pathlib import Path

from bench import batches
from bench.engine import mixed_requests
from bench.fleet import build_fleet, snapshot
from bench.policies import POLICIES


def test_sequential_policies_place_safely() -> None:
    snap = snapshot(build_fleet(8, seed=3))
    requests = mixed_requests(60, random.Random(3), "t")
    for name in POLICIES:
        r = batches.sequential(name, snap, requests)
        assert r["violations"] == 0
        assert 0 < r["placed"] <= len(requests)
        values, gpus = batches.values(snap, requests)
        assert r["value"] <= sum(values.values())
        assert 0 < r["gpu_equivalents"] <= sum(gpus.values())


def test_one_case_and_section(tmp_path: Path) -> None:
    case = batches.one_case(60, 8, 2.0, 1, seed=3)
    t = case["tessera-batch"]
    assert t["violations"] == 0
    assert t["objective"] <= t["bound"]
    assert 0.0 <= t["gap"] <= 1.0
    # No policy's value exceeds the batch's bound, which holds for any placement.
    assert all(p["value"] <= t["value_bound"] for p in case["policies"].values())
    assert t["value"] <= t["value_bound"]
    assert set(case["policies"]) == set(POLICIES)
    text = batches.section({"mode": "quick", "cases": [case]}, tmp_path)
    assert "tessera-batch" in text and list(tmp_path.glob("*.png"))
