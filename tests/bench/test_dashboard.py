"""bench/dashboard.py: every page answers on a small fleet, a live row is timed, it reports."""

from __future__ import annotations

import json

from bench import dashboard


def test_every_page_answers_a_live_row_is_timed_and_the_section_renders() -> None:
    result = dashboard.one_size(60, quick=True)
    assert result["hosts"] == 60
    # About one host in four got a placement of the mixed shapes.
    assert result["placements"] >= 10
    pages = dashboard._pages(60, "host-00030")
    assert set(result["server"]) == set(pages)
    for name, figures in result["server"].items():
        assert figures["bytes"] > 0, name
        assert figures["p50_ms"] > 0, name
    # The browser opened every page but /metrics, and painted it.
    assert set(result["browser"]) == set(pages) - {"metrics"}
    assert all(b["first_paint_ms"] > 0 for b in result["browser"].values())
    # Every placement made with the page open showed up in it, without a reload.
    assert result["live"]["rounds"] == 3
    assert 0 <= result["live"]["p50_s"] <= result["live"]["max_s"] < 30
    assert result["cold_fleet_ms"] > 0
    text = dashboard.section(json.loads(json.dumps({"sizes": {"60": result}})))
    assert "**60 hosts**" in text and "Live:" in text
