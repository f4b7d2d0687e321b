"""The placement lifecycle: its states and the one table of moves between them.

A placement is committed PENDING (the Lua commit writes ``'pending'``), becomes
READY once its host carried it out, RELEASING while a release tears it down,
and ends released: its record deleted and its slots freed. FAILED keeps a
placement's slots out of the pool (quarantined) until someone releases it.

:data:`TRANSITIONS` is the only place that says which moves exist and why.
Every compare-and-set on a placement's state names a :class:`Move`, built by
:func:`move`, which refuses a move the table lacks; the ``from_states`` the
store checks come from it, never from a hand-written list. Pure: the store
scripts compare against the strings these states carry
(``tests/scheduler/core/test_lifecycle.py`` reads them to check).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeAlias


class PlacementState(enum.StrEnum):
    """A placement's state as the store keeps it (the values are the stored strings)."""

    PENDING = "pending"
    READY = "ready"
    RELEASING = "releasing"
    FAILED = "failed"


class Removal(enum.Enum):
    """The end of every lifecycle: not a stored state, the record's deletion."""

    #: The placement's record is deleted and the slots it owned are freed.
    RELEASED = "released"


PENDING = PlacementState.PENDING
READY = PlacementState.READY
RELEASING = PlacementState.RELEASING
FAILED = PlacementState.FAILED
RELEASED = Removal.RELEASED

#: Where a move may lead: another state, or the end.
Target: TypeAlias = PlacementState | Removal

#: Every move a placement may make: from-state -> to -> why the move exists.
#: ForgetHost with ``force`` drops a forgotten host's records in any state;
#: that is the host's removal, not a move of its placements, and so not here.
TRANSITIONS: Mapping[PlacementState, Mapping[Target, str]] = {
    PENDING: {
        READY: "the host carried it out: Place's confirm, or the reconciler's prepare-again",
        FAILED: (
            "its Prepare failed and so did the undo, the reaper could not tear it down, "
            "or its host rebooted: the slots stay quarantined"
        ),
        RELEASED: (
            "its Prepare failed or was cancelled and the host undid it, or the reaper "
            "tore down a placement whose scheduler never finished"
        ),
    },
    READY: {
        RELEASING: "a Release (a client's, a drain's, a broken gang's) began tearing it down",
        PENDING: (
            "the reconciler claims a placement its host lost, to prepare it again; "
            "a Release meanwhile is refused as busy"
        ),
        FAILED: "its host rebooted: the devices were reset under the tenant",
    },
    RELEASING: {
        RELEASED: "the host tore it down (a Release, or the reaper finishing one)",
        FAILED: "the teardown failed, or its host rebooted: the slots stay quarantined",
    },
    FAILED: {
        RELEASING: "someone releases a quarantined placement, to tear down what is left",
    },
}


class IllegalMoveError(ValueError):
    """A move the lifecycle table does not allow (a bug in the caller)."""


def allowed(source: PlacementState, target: Target) -> bool:
    """Whether the table has the move ``source`` -> ``target``."""
    return target in TRANSITIONS.get(source, {})


def reason(source: PlacementState, target: Target) -> str:
    """Why the move ``source`` -> ``target`` exists.

    Raises:
        IllegalMoveError: the table lacks it.
    """
    if not allowed(source, target):
        raise IllegalMoveError(f"a placement never moves from {source} to {target.value}")
    return TRANSITIONS[source][target]


@dataclass(frozen=True)
class Move:
    """One compare-and-set of a placement's state: from any of ``sources`` to ``target``.

    Built only by :func:`move`, which checks it against :data:`TRANSITIONS`.
    """

    sources: tuple[PlacementState, ...]
    target: Target

    @property
    def from_states(self) -> list[str]:
        """The stored states the compare-and-set accepts, as the store scripts compare them."""
        return [s.value for s in self.sources]

    @property
    def state(self) -> PlacementState:
        """The state the move writes.

        Raises:
            IllegalMoveError: the move ends the placement (it writes no state).
        """
        if not isinstance(self.target, PlacementState):
            raise IllegalMoveError("a release deletes the placement; it writes no state")
        return self.target


def move(*sources: PlacementState, to: Target) -> Move:
    """The move to ``to`` from ``sources``, checked against the table.

    Args:
        sources: the states the caller moves from; none: every state the
            table allows a move to ``to`` from (in the enum's order).
        to: the state moved to, or :data:`RELEASED`.

    Raises:
        IllegalMoveError: a source the table does not allow to move to ``to``.
    """
    if not sources:
        sources = tuple(s for s in PlacementState if allowed(s, to))
    for source in sources:
        reason(source, to)
    return Move(sources=tuple(sources), target=to)
