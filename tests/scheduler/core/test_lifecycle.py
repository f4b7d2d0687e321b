"""The placement lifecycle: one table, which the code and the store scripts both follow."""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path

import pytest

from tessera.scheduler.core import lifecycle
from tessera.scheduler.core.lifecycle import (
    FAILED,
    PENDING,
    READY,
    RELEASED,
    RELEASING,
    TRANSITIONS,
    IllegalMoveError,
    Move,
    PlacementState,
    move,
)
from tessera.scheduler.store import redis_store

SERVICE = Path(__file__).resolve().parents[3] / "scheduler" / "service"

#: The modules that move placements between states.
MOVERS = (
    "tessera.scheduler.service.plan_applier",
    "tessera.scheduler.service.host_registry",
    "tessera.scheduler.service.housekeeping",
)

#: Every move the scheduler makes today, by who makes it.
EXPECTED_MOVES = {
    (PENDING, READY),  # Place's confirm; the reconciler's prepare-again
    (PENDING, RELEASED),  # a failed Prepare undone; the reaper
    (PENDING, FAILED),  # the undo failed too; the reaper's or the reconciler's quarantine; reboot
    (READY, RELEASING),  # Release
    (FAILED, RELEASING),  # Release of a quarantined placement
    (READY, PENDING),  # the reconciler claims a lost placement
    (READY, FAILED),  # reboot
    (RELEASING, RELEASED),  # Release done; the reaper finishing one
    (RELEASING, FAILED),  # teardown failed; the reaper's quarantine; reboot
}


def _moves_in(value: object) -> Iterator[Move]:
    if isinstance(value, Move):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _moves_in(item)


def _code_moves() -> set[tuple[PlacementState, lifecycle.Target]]:
    """Every (from, to) the movers' module-level moves allow."""
    found: set[tuple[PlacementState, lifecycle.Target]] = set()
    for name in MOVERS:
        module = importlib.import_module(name)
        for value in vars(module).values():
            for m in _moves_in(value):
                found.update((source, m.target) for source in m.sources)
    return found


def test_the_states_are_the_strings_the_store_keeps() -> None:
    assert [s.value for s in PlacementState] == ["pending", "ready", "releasing", "failed"]


def test_every_move_in_the_table_says_why_it_exists() -> None:
    for source, targets in TRANSITIONS.items():
        assert targets, f"{source} leads nowhere"
        for target, why in targets.items():
            assert why.strip(), f"{source} -> {target} has no reason"
            assert target != source, "a move changes the state"


def _reachable(start: PlacementState) -> set[lifecycle.Target]:
    reached: set[lifecycle.Target] = {start}
    todo = [start]
    while todo:
        for target in TRANSITIONS[todo.pop()]:
            if target not in reached:
                reached.add(target)
                if isinstance(target, PlacementState):
                    todo.append(target)
    return reached


def test_every_state_is_reachable_from_pending_and_can_end_released() -> None:
    assert set(PlacementState) <= _reachable(PENDING)
    for state in PlacementState:
        assert RELEASED in _reachable(state), f"{state} can never be released"


def test_a_move_the_table_lacks_is_refused() -> None:
    with pytest.raises(IllegalMoveError):
        move(RELEASING, to=READY)
    with pytest.raises(IllegalMoveError):
        move(FAILED, to=RELEASED)  # a quarantined placement is torn down first
    with pytest.raises(IllegalMoveError):
        _ = move(RELEASING, to=RELEASED).state  # a release writes no state


def test_a_move_without_sources_takes_every_source_the_table_allows() -> None:
    assert move(to=FAILED).from_states == ["pending", "ready", "releasing"]
    assert move(to=RELEASING).from_states == ["ready", "failed"]


def test_every_move_the_code_makes_is_in_the_table() -> None:
    # Building a Move checks it already (the modules would not import); this
    # also pins down which moves the code makes, so a new one is noticed.
    made = _code_moves()
    for source, target in made:
        assert lifecycle.allowed(source, target), f"{source} -> {target}"
    assert made == EXPECTED_MOVES


def test_every_compare_and_set_in_the_service_takes_its_states_from_a_move() -> None:
    """No hand-written list of states: ``from_states=`` is always ``<move>.from_states``."""
    for path in sorted(SERVICE.glob("*.py")):
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                where = f"{path.name}:{node.lineno}"
                if kw.arg == "from_states":
                    assert isinstance(kw.value, ast.Attribute), where
                    assert kw.value.attr == "from_states", where
                if kw.arg == "state" and ast.unparse(node.func).endswith("update_placement"):
                    assert ast.unparse(kw.value).endswith(".state.value"), where


# -- the store scripts -------------------------------------------------------


#: Every Lua source that runs in the store: commit.lua and the scripts in
#: redis_store (module-level strings whose names end in _LUA).
def _lua_sources() -> dict[str, str]:
    sources = {
        "commit.lua": resources.files("tessera.scheduler.store")
        .joinpath("commit.lua")
        .read_text("utf-8")
    }
    for name, value in vars(redis_store).items():
        if name.endswith("_LUA") and isinstance(value, str):
            sources[name] = value
    return sources


#: ``redis.call('HSET', <key>, <field>, <value>)`` with exactly one field.
_HSET = re.compile(
    r"redis\.call\(\s*'HSET'\s*,\s*([^,()]+?)\s*,\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)"
)


def _placement_state_writes(source: str) -> list[str]:
    """The values a script writes into the placement-states hash.

    That hash is ``states_key`` where a script names its keys, and the
    second key of the update-placement script (its header in redis_store:
    "KEYS: placements, placement-states, host").
    """
    values = []
    for key, _field, value in _HSET.findall(source):
        if key.strip() == "states_key" or (
            source is redis_store._UPDATE_PLACEMENT_LUA and key.strip() == "KEYS[2]"
        ):
            values.append(value.strip())
    return values


def test_every_state_a_store_script_writes_is_a_lifecycle_state() -> None:
    literals = set()
    for name, source in _lua_sources().items():
        for value in _placement_state_writes(source):
            if value.startswith("'"):
                literals.add(value.strip("'"))
                assert value.strip("'") in set(PlacementState), f"{name} writes {value}"
            else:
                # Written from an argument: update_placement's ``state``, which
                # the service passes as a Move's state (checked above).
                assert re.fullmatch(r"ARGV\[\d+\]", value), f"{name} writes {value}"
    # The commit writes the first state itself: not a vacuous check.
    assert PENDING.value in literals


def test_every_quoted_state_word_in_the_store_scripts_is_a_lifecycle_state() -> None:
    """A state spelled in Lua (compared or written) is one the enum has."""
    words = {"pending", "ready", "releasing", "failed", "released", "prepared", "reserved"}
    for name, source in _lua_sources().items():
        for literal in re.findall(r"'([a-z_]+)'", source):
            if literal in words:
                assert literal in set(PlacementState), f"{name} spells a state {literal!r}"
