"""MIG geometry of one GPU, as the spec and the reference tables state it.

Expected values come from shared/reference/mig_profiles.json
("placement_semantics", "capacity_interaction_example", instance_count) and
HW_FACTS.md §9, spelled out here rather than read at test time.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.scheduler.core.mig import MIG_TABLES, GpuInstance, MigProfile
from tessera.scheduler.core.mig_geometry import (
    COMPUTE_SLICES,
    DEFAULT_INSTANCE_LIMITS,
    MEMORY_SLICES,
    REASON_COMPUTE_BUDGET,
    REASON_INSTANCE_LIMIT,
    REASON_MEMORY_OVERLAP,
    REASON_OUT_OF_RANGE,
    REASON_PLACEMENT_NOT_ALLOWED,
    MigGeometryError,
    MigLayout,
    best_placement,
    capacity,
    fragmentation_score,
    placements_available,
    with_instance,
)

A100 = MIG_TABLES["A100-80GB"]
EMPTY = MigLayout()


def prof(name: str, table: Sequence[MigProfile] = A100) -> MigProfile:
    return next(p for p in table if p.name == name)


G1, G1ME, G1D = prof("1g.10gb"), prof("1g.10gb+me"), prof("1g.20gb")
G2, G3, G4, G7 = prof("2g.20gb"), prof("3g.40gb"), prof("4g.40gb"), prof("7g.80gb")


def build(*steps: tuple[MigProfile, int], layout: MigLayout = EMPTY) -> MigLayout:
    for profile, start in steps:
        layout = with_instance(layout, profile, start)
    return layout


def reason_of(layout: MigLayout, profile: MigProfile, start: int) -> str:
    with pytest.raises(MigGeometryError) as info:
        with_instance(layout, profile, start)
    return info.value.reason


ALL_ZERO = {p.name: 0 for p in A100}


# --- the reference data the module relies on --------------------------------


@pytest.mark.parametrize("gpu", sorted(MIG_TABLES))
def test_instance_limits_are_the_reference_instance_counts(gpu: str) -> None:
    # instance_count in mig_profiles.json, by profile ID, on every GPU.
    expected = {19: 7, 20: 1, 15: 4, 14: 3, 9: 2, 5: 1, 0: 1}
    assert {p.profile_id: DEFAULT_INSTANCE_LIMITS[p.profile_id] for p in MIG_TABLES[gpu]} == (
        expected
    )


def test_a_gpu_has_eight_memory_slices_and_seven_compute_slices() -> None:
    assert (MEMORY_SLICES, COMPUTE_SLICES) == (8, 7)
    assert EMPTY.free_memory_slices == tuple(range(8))
    assert EMPTY.free_compute == 7


# --- placements_available ----------------------------------------------------


def test_on_an_empty_a100_80gb_a_3g_40gb_can_go_at_0_or_4() -> None:
    assert placements_available(EMPTY, G3) == ((0, 4), (4, 4))


@pytest.mark.parametrize("gpu", sorted(MIG_TABLES))
def test_on_an_empty_gpu_every_placement_of_every_profile_is_available(gpu: str) -> None:
    for p in MIG_TABLES[gpu]:
        assert placements_available(EMPTY, p) == p.placements


def test_a_1g_cannot_start_at_slice_7() -> None:
    assert (7, 1) not in placements_available(EMPTY, G1)
    assert reason_of(EMPTY, G1, 7) == REASON_PLACEMENT_NOT_ALLOWED


def test_after_3g_at_0_a_1g_fits_only_at_4_5_6() -> None:
    assert placements_available(build((G3, 0)), G1) == ((4, 1), (5, 1), (6, 1))


def test_after_3g_at_4_a_2g_fits_at_0_or_2_and_a_4g_at_0() -> None:
    layout = build((G3, 4))
    assert placements_available(layout, G2) == ((0, 2), (2, 2))
    assert placements_available(layout, G4) == ((0, 4),)


def test_a_placement_needs_free_compute_slices_not_just_free_memory() -> None:
    layout = MigLayout(compute_budget=3)
    assert placements_available(layout, G3) == ((0, 4), (4, 4))
    assert placements_available(layout, G4) == ()
    assert reason_of(layout, G4, 0) == REASON_COMPUTE_BUDGET


def test_only_one_1g_plus_me_per_gpu() -> None:
    layout = build((G1ME, 0))
    assert placements_available(layout, G1ME) == ()
    assert reason_of(layout, G1ME, 1) == REASON_INSTANCE_LIMIT
    # The plain 1g is a different profile with its own limit.
    assert placements_available(layout, G1)[0] == (1, 1)


# --- with_instance -------------------------------------------------------------


def test_with_instance_leaves_the_original_layout_unchanged() -> None:
    after = with_instance(EMPTY, G3, 4)
    assert EMPTY.instances == ()
    assert after.instances == (GpuInstance(start=4, size=4, profile_id=9, slices=3),)


def test_overlapping_memory_slices_are_refused() -> None:
    assert reason_of(build((G3, 0)), G2, 2) == REASON_MEMORY_OVERLAP
    assert reason_of(build((G1, 5)), G7, 0) == REASON_MEMORY_OVERLAP


def test_4g_at_0_then_3g_at_4_fits_the_compute_budget_exactly() -> None:
    layout = build((G4, 0), (G3, 4))
    assert layout.used_compute == 4 + 3 == COMPUTE_SLICES
    assert capacity(layout, A100) == ALL_ZERO


def test_seven_1g_fill_the_gpu() -> None:
    layout = build(*((G1, s) for s in range(7)))
    assert layout.free_compute == 0
    # Slice 7 stays free: no 1g starts there, and nothing else fits.
    assert layout.free_memory_slices == (7,)
    assert capacity(layout, A100) == ALL_ZERO
    assert fragmentation_score(layout, A100) == 0.0


def test_the_real_a100_cgi_9_19_14_19_sequence_is_accepted() -> None:
    # HW_FACTS §9.1: -cgi 9,19,14,19 gave 3g@4, 1g@0, 2g@2, 1g@1.
    layout = build((G3, 4), (G1, 0), (G2, 2), (G1, 1))
    assert layout.free_memory_slices == ()
    assert layout.used_compute == 7


def test_the_same_occupancy_built_in_any_order_is_equal() -> None:
    assert build((G3, 4), (G1, 0)) == build((G1, 0), (G3, 4))


def test_a_layout_cannot_be_built_overlapping_or_out_of_range() -> None:
    a = GpuInstance(start=0, size=4, profile_id=9, slices=3)
    b = GpuInstance(start=2, size=2, profile_id=14, slices=2)
    with pytest.raises(MigGeometryError) as overlap:
        MigLayout((a, b))
    assert overlap.value.reason == REASON_MEMORY_OVERLAP
    with pytest.raises(MigGeometryError) as outside:
        MigLayout((GpuInstance(start=6, size=4, profile_id=9, slices=3),))
    assert outside.value.reason == REASON_OUT_OF_RANGE


def test_a_layout_copies_its_limits() -> None:
    limits = {19: 1}
    layout = MigLayout(instance_limits=limits)
    limits[19] = 7
    assert layout.instance_limits[19] == 1


# --- capacity ------------------------------------------------------------------


def test_empty_a100_80gb_capacity_is_the_instance_counts() -> None:
    assert capacity(EMPTY, A100) == {
        "1g.10gb": 7,
        "1g.10gb+me": 1,
        "1g.20gb": 4,
        "2g.20gb": 3,
        "3g.40gb": 2,
        "4g.40gb": 1,
        "7g.80gb": 1,
    }


def test_after_3g_at_0_capacity_matches_the_reference_example() -> None:
    # capacity_interaction_example: 3g 1 (@4), 4g 0, 2g 1 (@4), 1g 3 (@4,5,6).
    assert capacity(build((G3, 0)), A100) == {
        "1g.10gb": 3,
        "1g.10gb+me": 1,
        "1g.20gb": 2,
        "2g.20gb": 1,
        "3g.40gb": 1,
        "4g.40gb": 0,
        "7g.80gb": 0,
    }


def test_after_3g_at_4_capacity_matches_the_reference_example() -> None:
    # 3g 1 (@0), 2g 2 (@0,2), 1g 4 (@0..3), 4g 1 (@0): 4 + 3 = 7 compute slices.
    assert capacity(build((G3, 4)), A100) == {
        "1g.10gb": 4,
        "1g.10gb+me": 1,
        "1g.20gb": 2,
        "2g.20gb": 2,
        "3g.40gb": 1,
        "4g.40gb": 1,
        "7g.80gb": 0,
    }


def test_capacity_is_capped_by_free_compute_slices() -> None:
    # 2g@0 and 2g@2 leave memory 4-7 free but only 3 compute slices.
    layout = build((G2, 0), (G2, 2))
    assert capacity(layout, A100)[G1.name] == 3
    assert capacity(layout, A100)[G2.name] == 1


# --- fragmentation_score -------------------------------------------------------


def test_an_empty_gpu_is_not_fragmented() -> None:
    assert fragmentation_score(EMPTY, A100) == 0.0


def test_a_1g_at_0_costs_the_4g_a_1g_at_6_does_not() -> None:
    # After 1g@0 only a 3g fits, though a 4g would after moving the 1g.
    assert fragmentation_score(build((G1, 0)), A100) == pytest.approx(1 - 3 / 4)
    assert fragmentation_score(build((G1, 6)), A100) == 0.0


def test_a_3g_at_0_costs_the_4g_a_3g_at_4_does_not() -> None:
    assert fragmentation_score(build((G3, 0)), A100) == pytest.approx(0.25)
    assert fragmentation_score(build((G3, 4)), A100) == 0.0


def test_a_compute_slice_stranded_behind_slice_7_scores_1() -> None:
    # Memory 7 and one compute slice are free, but no 1g starts at 7; moved
    # to 3g@4, 2g@0, 1g@2 the same instances would leave room for a 1g@3.
    layout = build((G3, 0), (G2, 4), (G1, 6))
    assert placements_available(layout, G1) == ()
    assert fragmentation_score(layout, A100) == 1.0


# --- best_placement ------------------------------------------------------------


def test_best_placement_of_a_1g_on_an_empty_gpu_keeps_a_4g_possible() -> None:
    # 7g is lost whatever we do; starts 4, 5 and 6 all keep 4g@0, and ties go
    # to the highest start.
    assert best_placement(EMPTY, G1, A100) == (6, 1)


def test_best_placement_of_a_3g_on_an_empty_gpu_is_4() -> None:
    # Also the driver's first pick in the official -cgi 9,9 example.
    assert best_placement(EMPTY, G3, A100) == (4, 4)


def test_best_placement_of_a_2g_on_an_empty_gpu_keeps_a_4g_possible() -> None:
    assert best_placement(EMPTY, G2, A100) == (4, 2)


def test_best_placement_is_none_when_the_profile_fits_nowhere() -> None:
    assert best_placement(build((G7, 0)), G1, A100) is None
    assert best_placement(build((G3, 0)), G4, A100) is None


# --- properties ----------------------------------------------------------------

_steps = st.lists(
    st.tuples(st.integers(min_value=0, max_value=6), st.integers(min_value=0, max_value=7)),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(gpu=st.sampled_from(sorted(MIG_TABLES)), steps=_steps)
def test_any_sequence_of_with_instance_keeps_the_gpu_consistent(
    gpu: str, steps: list[tuple[int, int]]
) -> None:
    table = MIG_TABLES[gpu]
    layout = EMPTY
    for index, start in steps:
        profile = table[index]
        available = placements_available(layout, profile)
        try:
            layout = with_instance(layout, profile, start)
        except MigGeometryError:
            assert start not in {s for s, _ in available}
        else:
            assert start in {s for s, _ in available}
        # No two instances share a memory slice.
        slices = [i for gi in layout.instances for i in range(gi.start, gi.start + gi.size)]
        assert len(slices) == len(set(slices))
        assert all(0 <= i < MEMORY_SLICES for i in slices)
        # Compute budget and instance limits hold.
        assert layout.used_compute <= COMPUTE_SLICES
        for profile_id, count in layout.counts.items():
            assert count <= DEFAULT_INSTANCE_LIMITS[profile_id]
    cap = capacity(layout, table)
    score = fragmentation_score(layout, table)
    assert 0.0 <= score <= 1.0
    for p in table:
        available = placements_available(layout, p)
        assert (cap[p.name] > 0) == bool(available)
        best = best_placement(layout, p, table)
        assert (best is None) == (not available)
        assert best is None or best in available
