"""Shared/exclusive resource locks of the agent (agent.locks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from tessera.agent.locks import LockSet, ResourceLocks

PF = "dev:0000:31:00.0"


def locks_of(shared: tuple[str, ...] = (), exclusive: tuple[str, ...] = ()) -> LockSet:
    out = LockSet()
    out.shared(*shared)
    out.exclusive(*exclusive)
    return out


class Holder:
    """A thread that takes a lock set and holds it until told to let go."""

    def __init__(self, take: Callable[[], AbstractContextManager[None]]) -> None:
        self.acquired = threading.Event()
        self.release = threading.Event()
        self._take = take
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self._take():
            self.acquired.set()
            self.release.wait(10)

    def finish(self) -> None:
        self.release.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def test_shared_holders_of_one_key_run_side_by_side() -> None:
    locks = ResourceLocks()
    a = Holder(lambda: locks.hold(locks_of(shared=(PF,), exclusive=("vf:a",))))
    b = Holder(lambda: locks.hold(locks_of(shared=(PF,), exclusive=("vf:b",))))
    assert a.acquired.wait(5) and b.acquired.wait(5)
    assert locks.held() == {PF: "shared", "vf:a": "exclusive", "vf:b": "exclusive"}
    a.finish()
    b.finish()
    assert locks.held() == {}


def test_an_exclusive_holder_waits_for_shared_ones_and_holds_off_later_ones() -> None:
    locks = ResourceLocks()
    reader = Holder(lambda: locks.hold(locks_of(shared=(PF,))))
    assert reader.acquired.wait(5)
    writer = Holder(lambda: locks.hold(locks_of(exclusive=(PF,))))
    time.sleep(0.05)
    assert not writer.acquired.is_set()
    # A shared request after the waiting exclusive one waits too (no starvation).
    late = Holder(lambda: locks.hold(locks_of(shared=(PF,))))
    time.sleep(0.05)
    assert not late.acquired.is_set()
    reader.finish()
    assert writer.acquired.wait(5)
    assert not late.acquired.is_set()
    writer.finish()
    assert late.acquired.wait(5)
    late.finish()


def test_requests_on_other_keys_are_not_held_up_by_a_waiting_one() -> None:
    locks = ResourceLocks()
    reader = Holder(lambda: locks.hold(locks_of(shared=(PF,))))
    assert reader.acquired.wait(5)
    writer = Holder(lambda: locks.hold(locks_of(exclusive=(PF,))))
    other = Holder(lambda: locks.hold(locks_of(exclusive=("dev:0000:b1:00.0",))))
    assert other.acquired.wait(5)
    assert not writer.acquired.is_set()
    for h in (other, reader, writer):
        h.finish()


def test_crossed_waiting_requests_do_not_deadlock() -> None:
    locks = ResourceLocks()
    k1, k2 = "dev:1", "dev:2"
    first = Holder(lambda: locks.hold(locks_of(shared=(k1, k2))))
    assert first.acquired.wait(5)
    # Each waits exclusive on one key and shared on the other.
    a = Holder(lambda: locks.hold(locks_of(shared=(k2,), exclusive=(k1,))))
    b = Holder(lambda: locks.hold(locks_of(shared=(k1,), exclusive=(k2,))))
    time.sleep(0.05)
    first.finish()
    assert a.acquired.wait(5)
    a.finish()
    assert b.acquired.wait(5)
    b.finish()


def test_the_host_lock_waits_for_every_holder_and_holds_everyone_off() -> None:
    locks = ResourceLocks()
    one = Holder(lambda: locks.hold(locks_of(exclusive=("dev:1",))))
    assert one.acquired.wait(5)
    host = Holder(locks.host)
    time.sleep(0.05)
    assert not host.acquired.is_set()
    one.finish()
    assert host.acquired.wait(5)
    other = Holder(lambda: locks.hold(locks_of(exclusive=("dev:2",))))
    time.sleep(0.05)
    assert not other.acquired.is_set()
    host.finish()
    assert other.acquired.wait(5)
    other.finish()


def test_a_lock_set_asked_for_a_key_both_ways_holds_it_exclusive() -> None:
    both = locks_of(shared=(PF,), exclusive=(PF,))
    assert both.modes == {PF: "exclusive"}
    assert both.covers(locks_of(shared=(PF,)))
    assert not locks_of(shared=(PF,)).covers(both)
    assert LockSet.everything().covers(both)
    assert LockSet.everything().holds_exclusive(PF)
