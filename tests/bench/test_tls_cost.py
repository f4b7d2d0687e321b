"""bench/tls_cost.py: plaintext and TLS clusters both place everything; the report renders."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench import tls_cost
from bench.engine import SHAPES


def test_both_modes_place_everything_and_the_section_renders(tmp_path: Path) -> None:
    result = tls_cost.measure(
        12, rounds=2, per_shape=1, duration_s=0.5, clients=(2, 4), connections=2, seed=1
    )
    assert result["hosts"] == 12
    for mode in tls_cost.MODES:
        latency = result["latency"][mode]
        # Every placement asked for was placed and released, in both modes.
        assert latency["errors"] == {}
        assert latency["place"]["n"] == latency["asked"] == 2 * len(SHAPES)
        assert latency["release"]["n"] == latency["asked"]
        assert len(latency["round_p50_ms"]) == 2
        for clients in ("2", "4"):
            load = result["throughput"][clients][mode]
            assert load["placements"] > 0
            assert len(load["round_placements_per_s"]) == 2
            bad = {k for k in load["errors"] if k.startswith("release-") or k == "INVALID_ARGUMENT"}
            assert not bad, load["errors"]
        connect = result["connect"][mode]
        assert connect["first_call"]["n"] == connect["warm_call"]["n"] == 2
        assert result["setup"][mode]["register_s"] > 0
    # Certificates are issued for TLS only, and timed apart from registration.
    assert result["setup"]["plain"]["certs_s"] == 0
    assert result["setup"]["tls"]["certs_s"] > 0
    assert not math.isnan(result["latency"]["ratio"]["p50_ms"])
    assert not math.isnan(result["throughput"]["2"]["ratio"])
    # The result survives JSON, and the report reads it back.
    again = json.loads(json.dumps(result))
    md = tls_cost.section(again, tmp_path)
    assert "| placements/s, 4 clients |" in md
    assert "TLS / plain" in md


def test_modes_alternate_every_round() -> None:
    assert [tls_cost._order(r) for r in range(3)] == [
        ("plain", "tls"),
        ("tls", "plain"),
        ("plain", "tls"),
    ]
