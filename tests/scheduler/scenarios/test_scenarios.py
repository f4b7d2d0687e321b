"""Every scenario file: fixture hosts discovered for real, planned offline, checked.

One test per ``*.yaml`` beside this module (see ``scenario.py`` for the
format). Each asserts the expected placements and refusals, and that the
independent checker finds no violation in anything the engine planned.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .scenario import Scenario, load, mismatch, run, scenario_files


def _params() -> list[object]:
    out: list[object] = []
    for path in scenario_files():
        scenario = load(path)
        marks = [pytest.mark.xfail(strict=True, reason=scenario.xfail)] if scenario.xfail else []
        out.append(pytest.param(scenario, id=path.stem, marks=marks))
    return out


@pytest.mark.parametrize("scenario", _params())
def test_scenario(scenario: Scenario, tmp_path: Path) -> None:
    outcome = run(scenario, tmp_path)
    assert outcome.violations == [], f"{scenario.name}: checker found {outcome.violations}"
    problems = [
        problem
        for rid, expected in scenario.expect.items()
        if (problem := mismatch(outcome, rid, expected)) is not None
    ]
    assert not problems, f"{scenario.name} ({scenario.why}):\n" + "\n".join(problems)


def test_there_are_scenarios_for_every_constraint_family() -> None:
    stems = {p.stem.split("-")[0] for p in scenario_files()}
    assert {
        "numa",
        "affinity",
        "iommu",
        "mig",
        "mdev",
        "migratable",
        "exclusivity",
        "gang",
        "interference",
        "capacity",
        "selector",
        "priority",
    } <= stems
