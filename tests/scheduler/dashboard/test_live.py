"""The dashboard's live feed: which hosts changed, pushed to every page that listens.

Spec (``scheduler.dashboard.live``):

* Each listener is told, per piece of news, the model's revision and the
  hosts changed since its last news (sorted); nothing when nothing changed.
* Past :data:`MAX_NAMED` hosts, or when the model no longer remembers that
  far back (``changed_since`` gives None), the news says ``everything``.
* A listener whose queue is full is told to reload: its queue is emptied to
  one ``everything`` message instead of growing.
* Past :data:`MAX_LISTENERS` listeners a new one is refused
  (:class:`TooManyListenersError`); one that leaves makes room.
* ``run`` reads nothing (``refresh`` is not called) while nobody listens, and
  wakes when a page listens; what changed while nobody listened is news to it.
* A refresh that fails on the store (``RedisError``) publishes nothing and
  the loop goes on; ``run`` ends when ``stop`` is set.

The model is played by plain callables: a counter for the revision and a
dict of the hosts changed at each revision; no store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Set

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from tessera.scheduler.dashboard.live import (
    MAX_LISTENERS,
    MAX_NAMED,
    MAX_PER_IDENTITY,
    QUEUE_DEPTH,
    Change,
    ChangeFeed,
    TooManyListenersError,
)

from ...conftest import Runner

#: How long a test waits for news it expects (the feed polls every few ms here).
WAIT_S = 2.0

#: The poll interval of feeds under ``run``: short, so tests take milliseconds.
INTERVAL_S = 0.01


class Model:
    """The replica's model as the feed sees it: a revision and the hosts changed at each.

    Attributes:
        revision: the model's revision now.
        changed: revision -> hosts changed at that revision.
        forgotten_before: revisions before this are no longer remembered.
        refreshes: how many times the feed asked for a refresh.
        failures: refreshes still to fail with this error, one each.
    """

    def __init__(self) -> None:
        self.revision = 0
        self.changed: dict[int, set[str]] = {}
        self.forgotten_before = 0
        self.refreshes = 0
        self.failures: list[Exception] = []

    def change(self, *hosts: str) -> int:
        """The store changed ``hosts``: one new revision."""
        self.revision += 1
        self.changed[self.revision] = set(hosts)
        return self.revision

    def refresh(self) -> None:
        self.refreshes += 1
        if self.failures:
            raise self.failures.pop(0)

    def current(self) -> int:
        return self.revision

    def changed_since(self, revision: int) -> Set[str] | None:
        if revision < self.forgotten_before:
            return None
        out: set[str] = set()
        for at, hosts in self.changed.items():
            if at > revision:
                out |= hosts
        return out

    def feed(self, interval_s: float = INTERVAL_S) -> ChangeFeed:
        return ChangeFeed(self.refresh, self.current, self.changed_since, interval_s=interval_s)


def drain(queue: asyncio.Queue[Change]) -> list[Change]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def settle(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()`` holds (the feed runs in the background)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(INTERVAL_S / 2)


# -- what a listener is told ---------------------------------------------------------


def test_listeners_are_told_the_hosts_changed_since_their_last_news(arun: Runner) -> None:
    model = Model()

    async def body() -> None:
        feed = model.feed()
        first, second = feed.listen(), feed.listen()
        model.change("h2", "h1")
        seen = await feed.poll(0)
        assert seen == 1
        model.change("h3")
        model.change("h1")
        seen = await feed.poll(seen)
        assert seen == 3
        expected = [Change(1, ("h1", "h2")), Change(3, ("h1", "h3"))]
        assert drain(first) == drain(second) == expected
        # Nothing changed: no news at all.
        assert await feed.poll(seen) == seen
        assert first.empty() and second.empty()

    arun(body())


def test_a_page_that_listens_later_hears_only_later_news(arun: Runner) -> None:
    model = Model()

    async def body() -> None:
        feed = model.feed()
        early = feed.listen()
        model.change("h1")
        seen = await feed.poll(0)
        late = feed.listen()
        model.change("h2")
        await feed.poll(seen)
        assert drain(early) == [Change(1, ("h1",)), Change(2, ("h2",))]
        assert drain(late) == [Change(2, ("h2",))]

    arun(body())


def test_a_page_that_left_hears_nothing_more(arun: Runner) -> None:
    model = Model()

    async def body() -> None:
        feed = model.feed()
        gone, staying = feed.listen(), feed.listen()
        feed.leave(gone)
        feed.leave(gone)  # twice is harmless
        assert feed.listeners == 1
        model.change("h1")
        await feed.poll(0)
        assert gone.empty()
        assert drain(staying) == [Change(1, ("h1",))]

    arun(body())


def test_up_to_max_named_hosts_are_named_past_it_everything(arun: Runner) -> None:
    model = Model()

    async def body() -> None:
        feed = model.feed()
        queue = feed.listen()
        named = [f"h{i:04}" for i in range(MAX_NAMED)]
        model.change(*named)
        seen = await feed.poll(0)
        [news] = drain(queue)
        assert news == Change(1, tuple(named), everything=False)
        model.change(*(f"g{i:04}" for i in range(MAX_NAMED + 1)))
        await feed.poll(seen)
        assert drain(queue) == [Change(2, (), everything=True)]

    arun(body())


def test_a_revision_the_model_forgot_gives_everything(arun: Runner) -> None:
    model = Model()

    async def body() -> None:
        feed = model.feed()
        queue = feed.listen()
        model.change("h1")
        model.change("h2")
        model.forgotten_before = 2  # changed_since(0) is None now
        assert model.changed_since(0) is None
        assert await feed.poll(0) == 2
        assert drain(queue) == [Change(2, everything=True)]

    arun(body())


# -- listeners that fall behind, and too many of them --------------------------------


def test_a_listener_whose_queue_is_full_is_told_to_reload_once(arun: Runner) -> None:
    model = Model()

    async def body() -> None:
        feed = model.feed()
        slow, reader = feed.listen(), feed.listen()
        seen = 0
        heard: list[Change] = []
        for n in range(QUEUE_DEPTH + 1):
            model.change(f"h{n}")
            seen = await feed.poll(seen)
            heard += drain(reader)
        # The one that reads heard every piece of news, named.
        assert [c.hosts for c in heard] == [(f"h{n}",) for n in range(QUEUE_DEPTH + 1)]
        # The one that fell behind holds one message: reload everything, as of now.
        assert slow.qsize() == 1
        assert drain(slow) == [Change(QUEUE_DEPTH + 1, everything=True)]

    arun(body())


def test_a_listener_that_never_reads_never_holds_more_than_a_queue(arun: Runner) -> None:
    model = Model()

    async def body() -> None:
        feed = model.feed()
        slow = feed.listen()
        seen = 0
        for n in range(5 * QUEUE_DEPTH):
            model.change(f"h{n}")
            seen = await feed.poll(seen)
            assert slow.qsize() <= QUEUE_DEPTH
        # Whatever it reads first after falling behind tells it to reload.
        first = slow.get_nowait()
        assert first.everything

    arun(body())


def test_past_max_listeners_a_new_one_is_refused_until_one_leaves(arun: Runner) -> None:
    async def body() -> None:
        feed = Model().feed()
        queues = [feed.listen(f"admin/{i}") for i in range(MAX_LISTENERS)]
        assert feed.listeners == MAX_LISTENERS
        with pytest.raises(TooManyListenersError):
            feed.listen("admin/another")
        assert feed.listeners == MAX_LISTENERS
        feed.leave(queues[0])
        feed.listen("admin/another")
        assert feed.listeners == MAX_LISTENERS

    arun(body())


def test_one_identity_may_open_only_so_many_pages_and_others_still_listen(
    arun: Runner,
) -> None:
    async def body() -> None:
        feed = Model().feed()
        scraper = [feed.listen("viewer/prometheus") for _ in range(MAX_PER_IDENTITY)]
        with pytest.raises(TooManyListenersError):
            feed.listen("viewer/prometheus")
        feed.listen("admin/alice")
        feed.leave(scraper[0])
        feed.listen("viewer/prometheus")
        assert feed.listeners == MAX_PER_IDENTITY + 1

    arun(body())


# -- the loop ------------------------------------------------------------------------


def test_with_nobody_listening_run_reads_nothing_and_wakes_when_a_page_listens(
    arun: Runner,
) -> None:
    model = Model()

    async def body() -> None:
        feed = model.feed()
        stop = asyncio.Event()
        task = asyncio.create_task(feed.run(stop))
        # Many intervals pass: nobody listens, so the store is not read.
        await asyncio.sleep(20 * INTERVAL_S)
        assert model.refreshes == 0
        # What changed while nobody listened is news to a page that comes
        # later: it was drawn before it listened, and may not show it.
        model.change("before")
        queue = feed.listen()
        news = await asyncio.wait_for(queue.get(), WAIT_S)
        assert news == Change(1, ("before",))
        model.change("after")
        news = await asyncio.wait_for(queue.get(), WAIT_S)
        assert news == Change(2, ("after",))
        # The page goes: the loop stops reading again.
        feed.leave(queue)
        await asyncio.sleep(3 * INTERVAL_S)  # a poll under way may finish
        settled = model.refreshes
        await asyncio.sleep(20 * INTERVAL_S)
        assert model.refreshes == settled
        stop.set()
        await asyncio.wait_for(task, WAIT_S)

    arun(body())


def test_run_polls_about_every_interval_while_a_page_listens(arun: Runner) -> None:
    model = Model()

    async def body() -> None:
        feed = model.feed(interval_s=0.05)
        stop = asyncio.Event()
        task = asyncio.create_task(feed.run(stop))
        queue = feed.listen()
        await asyncio.sleep(0.5)
        # About ten polls in half a second: not a busy loop, not asleep.
        assert 3 <= model.refreshes <= 15
        assert queue.empty()  # nothing changed, so no news
        stop.set()
        await asyncio.wait_for(task, WAIT_S)

    arun(body())


@pytest.mark.parametrize(
    "error", [RedisError("READONLY"), RedisConnectionError("connection refused")]
)
def test_a_refresh_that_fails_on_the_store_publishes_nothing(
    arun: Runner, error: Exception
) -> None:
    model = Model()

    async def body() -> None:
        feed = model.feed()
        queue = feed.listen()
        model.change("h1")
        model.failures = [error]
        # The model could not be brought up to date: nothing is published, nothing is seen.
        assert await feed.poll(0) == 0
        assert queue.empty()
        # The next refresh works: the news is all there.
        assert await feed.poll(0) == 1
        assert drain(queue) == [Change(1, ("h1",))]

    arun(body())


def test_the_loop_goes_on_after_refreshes_fail(arun: Runner) -> None:
    model = Model()

    async def body() -> None:
        feed = model.feed()
        stop = asyncio.Event()
        task = asyncio.create_task(feed.run(stop))
        model.failures = [RedisConnectionError("down")] * 3
        queue = feed.listen()
        await settle(lambda: model.refreshes >= 1, "the first (failing) refresh")
        model.change("h1")
        news = await asyncio.wait_for(queue.get(), WAIT_S)
        assert news == Change(1, ("h1",))
        assert model.refreshes >= 4  # three failed, then one worked
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, WAIT_S)

    arun(body())


def test_an_async_refresh_is_awaited_before_the_revision_is_read(arun: Runner) -> None:
    model = Model()

    async def refresh() -> None:
        # The store's changes reach the model only during the refresh.
        await asyncio.sleep(0)
        model.change("h1")

    async def body() -> None:
        feed = ChangeFeed(refresh, model.current, model.changed_since)
        queue = feed.listen()
        assert await feed.poll(0) == 1
        assert drain(queue) == [Change(1, ("h1",))]

    arun(body())


def test_run_ends_when_stop_is_set_while_nobody_listens(arun: Runner) -> None:
    async def body() -> None:
        feed = Model().feed(interval_s=60.0)
        stop = asyncio.Event()
        task = asyncio.create_task(feed.run(stop))
        await asyncio.sleep(0.05)
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, WAIT_S)  # at once, not after an interval

    arun(body())


def test_run_ends_when_stop_is_set_while_a_page_listens(arun: Runner) -> None:
    model = Model()

    async def body() -> None:
        feed = model.feed(interval_s=60.0)
        stop = asyncio.Event()
        task = asyncio.create_task(feed.run(stop))
        feed.listen()
        await settle(lambda: model.refreshes == 1, "the first poll")
        stop.set()
        await asyncio.wait_for(task, WAIT_S)  # not after the 60 s interval
        assert model.refreshes == 1

    arun(body())


def test_run_returns_at_once_when_stop_is_already_set(arun: Runner) -> None:
    model = Model()

    async def body() -> None:
        feed = model.feed()
        feed.listen()
        stop = asyncio.Event()
        stop.set()
        await asyncio.wait_for(feed.run(stop), WAIT_S)
        assert model.refreshes == 0

    arun(body())
