"""Shared refreshes of the live model: one read of the feed per round of callers.

Every plan is made on the live model brought up to date after its caller
asked (:mod:`scheduler.service.cluster_model` follows the feed); callers who
arrive together share one refresh instead of each reading the feed.
"""

from __future__ import annotations

import asyncio

from tessera.scheduler.core.snapshot import ClusterSnapshot
from tessera.scheduler.service.cluster_model import LiveCluster
from tessera.scheduler.store.redis_store import HostRecord


class ModelRefresh:
    """Brings the live model up to date for whoever waits, in shared rounds.

    Args:
        model: the replica's live model of the cluster.
    """

    def __init__(self, model: LiveCluster) -> None:
        self._model = model
        # The round callers join, and the task running rounds while any
        # caller waits.
        self._next_read: asyncio.Future[None] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def snapshot(self) -> tuple[ClusterSnapshot, dict[str, HostRecord]]:
        """The model, brought up to date after this call began, as an immutable snapshot.

        Returns:
            The snapshot, and every host's record as last read (inventories
            left out).
        """
        await self.refreshed()
        return self._model.frozen(), self._model.records()

    async def refreshed(self) -> None:
        """Bring the model up to what the store held at some point after this call began.

        Concurrent calls share refreshes: a caller arriving while one is in
        flight waits for the next, which starts as soon as that one ends and
        serves everyone who came meanwhile. Each caller thus plans on the
        store as it was after it asked (a replan after a lost commit sees the
        winner), and a replica under load reads the feed once per round of
        callers instead of once per caller.
        """
        loop = asyncio.get_running_loop()
        if self._next_read is None or self._next_read.get_loop() is not loop:
            self._next_read = loop.create_future()
        if self._reader is None or self._reader.done() or self._reader.get_loop() is not loop:
            self._reader = loop.create_task(self._read_rounds())
        # Shielded: a caller that gives up must not cancel its round for the others.
        await asyncio.shield(self._next_read)

    async def _read_rounds(self) -> None:
        """Serve the waiting callers one refresh at a time until none wait."""
        try:
            while self._next_read is not None:
                round_, self._next_read = self._next_read, None
                try:
                    await self._model.refresh()
                except asyncio.CancelledError:
                    # Shutting down: nobody waits for ever on a round that
                    # will not be read.
                    round_.cancel()
                    if self._next_read is not None:
                        self._next_read.cancel()
                        self._next_read = None
                    raise
                except Exception as err:  # every waiter of the round gets it
                    round_.set_exception(err)
                    # Nobody may be waiting any more (all cancelled): mark it
                    # seen, so asyncio does not log it as never retrieved.
                    round_.exception()
                else:
                    round_.set_result(None)
        finally:
            self._reader = None
