"""Mutations of real inventories: refused by field, or safe for every part of the scheduler.

Each example takes a golden fixture inventory and applies one to four of the
fuzz's mutations (``bench/inventory_fuzz.py``: numbers to 0, maxima or wrapped
negatives; strings huge, emptied or odd; entries dropped or duplicated;
references broken; bytes flipped; VFs, MIG instances and mdevs added). Then
either the validator refuses it, every problem under ``inventory.`` and none
echoing more than a short cut of a value, or it validates, and conversion,
the fast path (Explain over every form), MIG capacity (ListHosts), the CP-SAT
batch and the independent checker all run on it without raising, and the
checker finds nothing wrong with what the engine planned.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

_ROOT = str(Path(__file__).resolve().parents[3])
if _ROOT not in sys.path:  # ``bench`` lives at the repository root, uninstalled
    sys.path.insert(0, _ROOT)

from bench.inventory_fuzz import QUERIES, golden_inventories, mutate  # noqa: E402
from tessera.scheduler.core.checker import check_placements  # noqa: E402
from tessera.scheduler.core.engine.batch import BatchSettings, solve_batch  # noqa: E402
from tessera.scheduler.core.engine.fastpath import Engine  # noqa: E402
from tessera.scheduler.core.plan import Plan  # noqa: E402
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState  # noqa: E402
from tessera.scheduler.service.convert import host_view_from_inventory, parsed_request  # noqa: E402
from tessera.scheduler.service.inventory_check import inventory_violations  # noqa: E402

BASES = golden_inventories()
REQUESTS = [parsed_request(q) for q in QUERIES]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    name=st.sampled_from(sorted(BASES)),
    rng=st.randoms(use_true_random=False),
    most=st.integers(1, 4),
)
def test_a_mutated_real_inventory_is_refused_by_field_or_safe_to_schedule_on(
    name: str, rng: random.Random, most: int
) -> None:
    inv, applied = mutate(BASES[name], rng, most=most)
    found, more = inventory_violations(inv)
    if found:
        event("refused")
        assert all(v.field.startswith("inventory.") for v in found), found
        # Echoes are cut: no message carries a value whole, whatever its size.
        assert all(len(str(v)) < 400 for v in found), found
        assert more >= 0
        return
    event(f"accepted after {'+'.join(sorted(set(applied))) or 'nothing'}")
    state = HostState(host_view_from_inventory(inv), alloc_generation=0)
    snapshot = ClusterSnapshot(hosts={state.view.host_id: state})
    engine = Engine()
    made = []
    for request in REQUESTS:
        answer = engine.schedule(snapshot, request, explain=True)
        if isinstance(answer, Plan):
            made.append((request, answer))
    engine.mig_capacity(state)
    batch = solve_batch(
        engine, snapshot, REQUESTS, BatchSettings(workers=1, seed=0, time_limit_s=2.0)
    )
    for request, plan in made:
        assert check_placements(snapshot, [(request, plan)]) == [], (applied, request)
    by_id = {r.request_id: r for r in REQUESTS}
    batch_made = [(by_id[rid], plan) for rid, plan in batch.plans.items()]
    assert check_placements(snapshot, batch_made) == [], applied
