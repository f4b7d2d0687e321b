"""A placement's lifecycle moves, made in the store as the lifecycle table allows.

Every state change of a placement by a use case goes through :meth:`PlacementMoves.apply`:
one compare-and-set whose accepted states come from a
:class:`~scheduler.core.lifecycle.Move`, so the store only ever moves a
placement along :data:`scheduler.core.lifecycle.TRANSITIONS`. Being that one
place, it is also where every move to FAILED (a quarantine, whoever asked
for it) is said in the log, once.
"""

from __future__ import annotations

from collections.abc import Callable

from tessera.scheduler.core.lifecycle import FAILED, Move
from tessera.scheduler.service import event_log
from tessera.scheduler.service.convert import with_state
from tessera.scheduler.store.redis_store import Fence, RedisStateStore
from tessera.v1 import placement_pb2


class PlacementMoves:
    """Moves placements between lifecycle states, compare-and-set in the store.

    Args:
        store: the Redis state store.
        clock_ms: current time in ms (each move is stamped).
    """

    def __init__(self, store: RedisStateStore, clock_ms: Callable[[], int]) -> None:
        self._store = store
        self._clock_ms = clock_ms

    async def apply(
        self,
        placement: placement_pb2.Placement,
        move: Move,
        message: str,
        *,
        fence: Fence | None = None,
    ) -> tuple[bool, placement_pb2.Placement]:
        """Make ``move`` on ``placement`` with ``message``.

        Args:
            placement: the placement as last read.
            move: the lifecycle move.
            message: why, as the placement will read.
            fence: a background job's term: the move is refused once a
                newer term began.

        Returns:
            Whether the store took it (the placement was in one of the
            move's sources), and the placement as it would now read.

        Raises:
            IllegalMoveError: ``move`` is a release (it writes no state).
            FencedOutError: ``fence`` is stale.
        """
        moved = with_state(placement, move.state, message, self._clock_ms())
        payload = moved.SerializeToString()
        ok = await self._store.update_placement(
            moved.host_id,
            moved.placement_id,
            payload,
            state=move.state.value,
            from_states=move.from_states,
            fence=fence,
        )
        if not ok:
            # This very move may have landed already: a dropped connection's
            # retry sends it again, and the second run finds the state moved.
            # Only the identical write (same payload, stamped with this call's
            # time, its state the move's) counts as this move's: one script
            # writes the payload and the state together, so the payload read
            # once says both (a second read of the state could see a later
            # move and disown this one).
            found = await self._store.get_placement(moved.placement_id)
            ok = found is not None and found[1] == payload
        if ok and move.state is FAILED:
            event_log.placement_failed(moved, message)
        return ok, moved
