"""bench/throughput.py: every policy commits through the store; e2e clients place and release."""

from __future__ import annotations

from pathlib import Path

from bench import throughput
from bench.policies import POLICIES


def test_every_policy_commits_and_e2e_places(tmp_path: Path) -> None:
    inproc = throughput.in_process(hosts=12, per_client_total=8, clients=(2, 4), seed=1)
    assert set(inproc["policies"]) == set(POLICIES)
    for runs in inproc["policies"].values():
        for r in runs.values():
            # Every request is placed (the fleet has room) or accounted for.
            assert r["placements"] + r["gave_up"] + r["unschedulable"] == r["requests"]
            assert r["placements"] > 0
            assert r["commit_outcomes"].get("COMMITTED", 0) == r["placements"]
    e2e = throughput.end_to_end(hosts=8, duration_s=1.0, clients=(2,), seed=1)
    assert set(e2e["policies"]) == set(POLICIES)
    for entry in e2e["policies"].values():
        run = entry["runs"]["2"]
        assert run["placements"] > 0
        bad = {k for k in run["errors"] if k.startswith("release-") or k == "INVALID_ARGUMENT"}
        assert not bad, run["errors"]
    md = throughput.section({"in_process": inproc, "end_to_end": e2e, "clients": [2]}, tmp_path)
    for name in POLICIES:
        assert f"| {name} |" in md
    assert (tmp_path / "throughput_inprocess.png").exists()
