"""A thousand malformed Register calls against a real scheduler process, and what must hold.

The driver is ``bench/inventory_fuzz.py`` (which sends 20,000 in a full run):
mutations of the real fixture inventories over real gRPC to a scheduler on an
embedded Valkey. No answer may be INTERNAL or UNKNOWN; every refusal is
INVALID_ARGUMENT naming a field under ``inventory.``; some inventories get
through (VFs, MIG instances, mdevs added consistently) and the queries after
them run the engine on them; the scheduler stays up with bounded memory; the
store holds exactly what was accepted. Nothing is asserted about time.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # ``bench`` lives at the repository root, uninstalled
    sys.path.insert(0, _ROOT)

from bench.inventory_fuzz import QUICK_CASES, RSS_BOUND_MIB, run_fuzz, violations  # noqa: E402


def test_a_thousand_malformed_registrations_are_refused_by_field_and_leave_no_trace(
    tmp_path: Path,
) -> None:
    result = run_fuzz(tmp_path, cases=QUICK_CASES, seed=11)

    assert violations(result) == []
    assert result.cases == QUICK_CASES
    assert set(result.register_codes) == {"OK", "INVALID_ARGUMENT"}
    # Both outcomes are exercised: the mutator is neither toothless nor always fatal.
    assert result.accepted >= QUICK_CASES // 10
    assert result.register_codes["INVALID_ARGUMENT"] >= QUICK_CASES // 2
    assert set(result.query_codes) == {"OK"}
    assert set(result.raw_codes) == {"INVALID_ARGUMENT"}  # bodies that do not decode
    assert result.alive
    assert result.rss_growth_mib < RSS_BOUND_MIB
    store = result.store
    assert store["index_matches"] and store["hosts_expected"] > 0
    assert store["inventories_mismatched"] == []
    assert store["unexpected_keys"] == []
    assert store["refused_hosts_in_store"] == []
