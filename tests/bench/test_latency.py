"""bench/latency.py: every policy's rows, wire requests the service accepts, e2e Place works."""

from __future__ import annotations

from pathlib import Path

from bench import latency
from bench.engine import SHAPES
from bench.policies import POLICIES
from tessera.scheduler.service.convert import parsed_request


def test_every_shape_goes_over_the_wire_unchanged() -> None:
    for name, shape in SHAPES.items():
        request = shape(f"r-{name}", "tenant")
        parsed = parsed_request(latency.to_wire(request))
        assert parsed.claims[0].kind == request.claims[0].kind
        assert parsed.claims[0].forms == request.claims[0].forms
        assert parsed.numa_policy == request.numa_policy
        assert parsed.affinities == request.affinities


def test_in_process_has_every_policy_and_shape(tmp_path: Path) -> None:
    result = latency.in_process([30], per_shape=2, seed=1)
    entry = result["30"]
    assert set(entry["policies"]) == set(POLICIES)
    for figures in entry["policies"].values():
        assert figures["all"]["n"] == 2 * len(SHAPES)
        assert set(figures["shapes"]) == set(SHAPES)
        # A 30-host default fleet has room for two of every shape.
        assert all(s["placed"] == 2 for s in figures["shapes"].values())
    e2e = latency.end_to_end([12], per_shape=1, seed=1)
    # Every policy runs in the scheduler service itself (--policy).
    assert set(e2e["12"]) == set(POLICIES)
    for figures in e2e["12"].values():
        assert figures["errors"] == {}
        assert figures["all"]["n"] == len(SHAPES)
    md = latency.section(
        {
            "in_process": result,
            "end_to_end": e2e,
            "shapes": list(SHAPES),
            "per_shape": 2,
            "best_fit_budget_s": 1.0,
        },
        tmp_path,
    )
    for name in POLICIES:
        assert f"| {name} |" in md
    assert (tmp_path / "latency_p50.png").exists()
