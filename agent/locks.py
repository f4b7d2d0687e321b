"""Locks on the host resources one agent operation touches, shared or exclusive.

An agent operation (a Prepare, an Unprepare) names, before it reads the host,
every resource it may change, each as a key: a PCI function (``dev:<bdf>``),
an IOMMU group (``group:<n>``), a VF slot (``vf:<pf>#<index>``), an mdev
(``mdev:<uuid>``), the placement's own checkpoint entry (``placement:<id>``).
It takes them all at once, each shared or exclusive, so that operations on
different devices of one host run side by side and only those touching the
same thing wait for each other:

* a VF's Prepare holds its PF shared and its VF slot exclusive: VFs of one PF
  are bound and released in parallel, while enabling or disabling the PF's VFs
  (``sriov_numvfs``), or handing the PF over whole, holds the PF exclusive and
  so waits for every VF operation on it to finish, and holds them off;
* an mdev's Prepare holds its parent shared and its UUID exclusive;
* a whole device holds every endpoint of its group and the group exclusive;
* a MIG partition holds its GPU exclusive.

All keys of an operation are taken in one step (nothing is held while
waiting), so no two operations can each hold what the other waits for.
Conflicting requests are granted in arrival order, so a stream of VF
operations holding a PF shared cannot starve the one that must disable it.
:meth:`ResourceLocks.host` takes the whole host (start-up recovery).

Threads, not asyncio: the lock is taken in the worker thread that carries the
operation out, and is released only when that thread is done, even if the
caller's deadline cancelled the RPC meanwhile.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

Mode = Literal["shared", "exclusive"]


def device_key(address: str) -> str:
    """The key of a PCI function."""
    return f"dev:{address}"


def group_key(group: int | str) -> str:
    """The key of an IOMMU group."""
    return f"group:{group}"


def vf_slot_key(pf: str, index: int) -> str:
    """The key of VF ``index`` of ``pf``."""
    return f"vf:{pf}#{index}"


def mdev_key(uuid: str) -> str:
    """The key of an mdev."""
    return f"mdev:{uuid.lower()}"


def placement_key(placement_id: str) -> str:
    """The key of a placement's checkpoint entry."""
    return f"placement:{placement_id}"


class LockSet:
    """Keys with their modes; exclusive wins where one key is asked for both ways."""

    def __init__(self) -> None:
        self._modes: dict[str, Mode] = {}
        self._everything = False

    @classmethod
    def everything(cls) -> LockSet:
        """Every key exclusive: what holding the whole host amounts to."""
        locks = cls()
        locks._everything = True
        return locks

    @property
    def is_everything(self) -> bool:
        """Whether this is :meth:`everything`."""
        return self._everything

    def add(self, key: str, mode: Mode) -> None:
        """Ask for ``key`` in ``mode`` (upgrading a shared request to exclusive)."""
        if self._modes.get(key) != "exclusive":
            self._modes[key] = mode

    def shared(self, *keys: str) -> None:
        """Ask for ``keys`` shared."""
        for key in keys:
            self.add(key, "shared")

    def exclusive(self, *keys: str) -> None:
        """Ask for ``keys`` exclusive."""
        for key in keys:
            self.add(key, "exclusive")

    def update(self, other: LockSet) -> None:
        """Ask for everything ``other`` asks for too."""
        for key, mode in other.modes.items():
            self.add(key, mode)

    @property
    def modes(self) -> Mapping[str, Mode]:
        """Key -> mode (empty for :meth:`everything`, which only the host lock gives)."""
        return dict(self._modes)

    def covers(self, other: LockSet) -> bool:
        """Whether holding this set holds everything ``other`` asks for."""
        if self._everything:
            return True
        if other._everything:
            return False
        return all(
            key in self._modes and (mode == "shared" or self._modes[key] == "exclusive")
            for key, mode in other._modes.items()
        )

    def holds_exclusive(self, key: str) -> bool:
        """Whether ``key`` is asked for exclusive."""
        return self._everything or self._modes.get(key) == "exclusive"

    def __repr__(self) -> str:
        return "LockSet(everything)" if self._everything else f"LockSet({self._modes!r})"


class ResourceLocks:
    """Shared/exclusive locks on keys, taken a whole :class:`LockSet` at a time.

    Requests that conflict (one key, at least one of them exclusive) are
    granted in the order they came: a request waits for the holders it
    conflicts with and for every earlier waiting request it conflicts with.
    The earliest waiter waits only for holders, who hold everything they need,
    so every request is granted in the end (no deadlock, no starvation).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared: Counter[str] = Counter()
        self._exclusive: set[str] = set()
        self._holders = 0
        self._host = False
        # Waiting requests by ticket; None is a request for the whole host.
        self._waiting: dict[int, Mapping[str, Mode] | None] = {}
        self._tickets = 0

    @staticmethod
    def _conflict(a: Mapping[str, Mode] | None, b: Mapping[str, Mode] | None) -> bool:
        if a is None or b is None:
            return True
        small, large = (a, b) if len(a) <= len(b) else (b, a)
        return any(
            key in large and "exclusive" in (mode, large[key]) for key, mode in small.items()
        )

    def _blocked_by_holders(self, want: Mapping[str, Mode] | None) -> bool:
        if self._host:
            return True
        if want is None:
            return self._holders > 0
        for key, mode in want.items():
            if key in self._exclusive:
                return True
            if mode == "exclusive" and self._shared[key]:
                return True
        return False

    def _may_go(self, ticket: int, want: Mapping[str, Mode] | None) -> bool:
        if self._blocked_by_holders(want):
            return False
        return not any(
            t < ticket and self._conflict(want, other) for t, other in self._waiting.items()
        )

    def _acquire(self, want: Mapping[str, Mode] | None) -> None:
        with self._cond:
            self._tickets += 1
            ticket = self._tickets
            self._waiting[ticket] = want
            try:
                self._cond.wait_for(lambda: self._may_go(ticket, want))
            finally:
                del self._waiting[ticket]
                # Those behind this request may go now, or on its release.
                self._cond.notify_all()
            if want is None:
                self._host = True
                return
            for key, mode in want.items():
                if mode == "exclusive":
                    self._exclusive.add(key)
                else:
                    self._shared[key] += 1
            self._holders += 1

    def _release(self, want: Mapping[str, Mode] | None) -> None:
        with self._cond:
            if want is None:
                self._host = False
            else:
                for key, mode in want.items():
                    if mode == "exclusive":
                        self._exclusive.discard(key)
                    else:
                        self._shared[key] -= 1
                        if not self._shared[key]:
                            del self._shared[key]
                self._holders -= 1
            self._cond.notify_all()

    @contextmanager
    def hold(self, locks: LockSet) -> Iterator[None]:
        """Hold every key of ``locks`` in its mode, waiting until all are free.

        :meth:`LockSet.everything` holds the whole host, as :meth:`host` does.
        """
        want = None if locks.is_everything else locks.modes
        self._acquire(want)
        try:
            yield
        finally:
            self._release(want)

    @contextmanager
    def host(self) -> Iterator[None]:
        """Hold the whole host: wait until no key is held, hold off every other caller."""
        self._acquire(None)
        try:
            yield
        finally:
            self._release(None)

    def held(self) -> dict[str, Mode]:
        """What is held now, by key (for tests and debugging)."""
        with self._cond:
            out: dict[str, Mode] = {k: "shared" for k in self._shared}
            out.update({k: "exclusive" for k in self._exclusive})
            return out


def keys_of(addresses: Iterable[str]) -> list[str]:
    """The device keys of ``addresses``."""
    return [device_key(a) for a in addresses]
