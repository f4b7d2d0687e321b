"""Crash injection for fake hosts: the agent killed right after a host write.

With ``TESSERA_FAKE_CRASH_AFTER_WRITES=N`` in its environment, a process
driving a fake host counts every mutating call that took effect, the kernel
emulator's sysfs writes and the fake NVML's state changes alike, in one
counter file in the tree (:data:`COUNTER_FILE`), and SIGKILLs itself right
after the N-th: the write is applied, nothing after it runs, as when the
agent is ``kill -9``-ed between two host writes. Writes that fail (an errno)
change nothing and are not counted.

The counter lives in the tree, so it goes on counting across processes; a
test that restarts the agent without the variable stops the counting. Set N
larger than any operation makes to count writes without crashing.

Only the fakes of ``agent.testing`` call this; production code never does.
"""

from __future__ import annotations

import fcntl
import os
import signal
from pathlib import Path

#: The environment variable holding N.
CRASH_ENV = "TESSERA_FAKE_CRASH_AFTER_WRITES"

#: The counter file in the fake host tree's root.
COUNTER_FILE = ".tessera-fake-crash-count"


def writes_counted(root: Path) -> int:
    """How many mutating calls were counted in the tree so far."""
    try:
        return int((root / COUNTER_FILE).read_text() or "0")
    except FileNotFoundError:
        return 0


def after_write(root: Path) -> None:
    """Count one applied mutating call; SIGKILL this process if it is the N-th."""
    limit = os.environ.get(CRASH_ENV)
    if not limit:
        return
    fd = os.open(root / COUNTER_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        count = int(os.read(fd, 32) or b"0") + 1
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, str(count).encode())
    finally:
        os.close(fd)
    if count == int(limit):
        os.kill(os.getpid(), signal.SIGKILL)
