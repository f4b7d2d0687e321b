"""Live pages: the hosts that changed, pushed to every open page within a second.

While at least one page listens, :class:`ChangeFeed` brings the replica's
model up to date from the store's change feed every half second (the same
read placing does, shared with it) and tells each listener which hosts
changed since its last news. A page then fetches only the parts it shows of
those hosts. With nobody listening it reads nothing.

Listeners are few (operators' browsers) but untrusted in number: past
:data:`MAX_LISTENERS`, or :data:`MAX_PER_IDENTITY` of one identity, a new one
is refused, and one that falls behind (its queue full) is told to reload
rather than kept growing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Set
from dataclasses import dataclass

from redis.exceptions import RedisError

log = logging.getLogger(__name__)

#: Open pages at most; a new one past this is refused (HTTP 503).
MAX_LISTENERS = 256

#: Open pages of one identity at most: one certificate (a scraper's, a
#: leaked one) cannot take every slot from the others.
MAX_PER_IDENTITY = 16

#: News a listener may have waiting before it is told to reload instead.
QUEUE_DEPTH = 32

#: Hosts named one by one in a piece of news; past this, "many changed".
MAX_NAMED = 256


@dataclass(frozen=True)
class Change:
    """News for a page: the model's revision and the hosts changed since the last news.

    Attributes:
        revision: the model's revision now.
        hosts: the hosts that changed, by id; empty with ``everything``.
        everything: too many changed (or the page fell behind): reload all.
    """

    revision: int
    hosts: tuple[str, ...] = ()
    everything: bool = False


class TooManyListenersError(Exception):
    """:data:`MAX_LISTENERS` pages listen already."""


class ChangeFeed:
    """Follows the model for the pages that listen.

    Args:
        refresh: brings the model up to date with the store.
        revision: the model's revision now.
        changed_since: the hosts changed after a revision (None: too far back).
        interval_s: how often the model is brought up to date while listened to.
    """

    def __init__(
        self,
        refresh: Callable[[], object],
        revision: Callable[[], int],
        changed_since: Callable[[int], Set[str] | None],
        *,
        interval_s: float = 0.5,
    ) -> None:
        self._refresh = refresh
        self._revision = revision
        self._changed_since = changed_since
        self._interval_s = interval_s
        # Each listener's queue, with who listens.
        self._listeners: dict[asyncio.Queue[Change], str] = {}
        self._wake = asyncio.Event()

    @property
    def listeners(self) -> int:
        """Pages listening now."""
        return len(self._listeners)

    def listen(self, who: str = "") -> asyncio.Queue[Change]:
        """A queue of news for one page; :meth:`leave` it when the page goes.

        Args:
            who: the identity the page is open as.

        Raises:
            TooManyListenersError: :data:`MAX_LISTENERS` listen already, or
                :data:`MAX_PER_IDENTITY` as ``who``.
        """
        if len(self._listeners) >= MAX_LISTENERS:
            raise TooManyListenersError(f"{MAX_LISTENERS} pages listen already")
        if sum(1 for w in self._listeners.values() if w == who) >= MAX_PER_IDENTITY:
            raise TooManyListenersError(f"{MAX_PER_IDENTITY} pages of {who} listen already")
        queue: asyncio.Queue[Change] = asyncio.Queue(QUEUE_DEPTH)
        self._listeners[queue] = who
        self._wake.set()
        return queue

    def leave(self, queue: asyncio.Queue[Change]) -> None:
        """Stop sending news to a page."""
        self._listeners.pop(queue, None)

    def _publish(self, change: Change) -> None:
        for queue in list(self._listeners):
            try:
                queue.put_nowait(change)
            except asyncio.QueueFull:
                # Behind by a whole queue: what it missed no longer matters,
                # only that it reloads. Make room for that one message.
                with contextlib.suppress(asyncio.QueueEmpty):
                    while True:
                        queue.get_nowait()
                queue.put_nowait(Change(change.revision, everything=True))

    async def poll(self, seen: int) -> int:
        """Bring the model up to date once and publish what changed after ``seen``.

        Returns:
            The revision published up to.
        """
        try:
            result = self._refresh()
            if asyncio.iscoroutine(result):
                await result
        except (RedisError, OSError) as err:
            # The pages keep what they show; the store's health is /readyz's.
            log.debug("dashboard: the model could not be refreshed: %s", err)
            return seen
        revision = self._revision()
        if revision == seen:
            return seen
        changed = self._changed_since(seen)
        if changed is None or len(changed) > MAX_NAMED:
            self._publish(Change(revision, everything=True))
        else:
            self._publish(Change(revision, tuple(sorted(changed))))
        return revision

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the model while pages listen, until ``stop`` is set."""
        seen = self._revision()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                if not self._listeners:
                    # Nobody listens: sleep until a page comes (or we stop).
                    self._wake.clear()
                    waking = asyncio.ensure_future(self._wake.wait())
                    await asyncio.wait({waking, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    waking.cancel()
                    # What changed while nobody listened is still news: the
                    # new page was drawn before it listened, and may have
                    # missed it (too much, and it is told to reload all).
                    continue
                seen = await self.poll(seen)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stopping), self._interval_s)
        finally:
            stopping.cancel()
