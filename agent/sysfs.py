"""The one place the agent touches the kernel's sysfs and /dev.

Every path is derived from one root: ``/`` on a real host, a temporary directory
holding ``sys/`` and ``dev/`` for a fake host. Reads go straight to the files;
writes go through a :class:`SysfsWriter`, which on a real host is a plain
``write(2)`` and on a fake host is the kernel emulator of ``agent.testing``, so
that a write has the effects and the errno Linux would give it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Protocol

#: A file in the root of every tree built by agent.testing. The OS writer
#: refuses to write into such a tree: writing plain files there would change
#: nothing the way a kernel would, and silently "succeed".
FAKE_HOST_MARKER = ".tessera-fake-host"


#: Directories every sysfs tree has, relative to the root: the PCI bus's
#: device list (where discovery starts) and the device hierarchy its entries
#: link into. A root without them is a wrong ``--sysfs-root``, not a host
#: without devices.
REQUIRED_DIRS = ("sys/bus/pci/devices", "sys/devices")


class NotASysfsTreeError(Exception):
    """The root holds no sysfs tree (a typo in ``--sysfs-root``, an empty dir).

    Args:
        root: the root given.
        missing: the first required directory it lacks, relative to the root.
    """

    def __init__(self, root: Path, missing: str) -> None:
        self.root = root
        self.missing = missing
        super().__init__(f"{root}: not a sysfs tree (no {missing})")


class SysfsWriter(Protocol):
    """Performs one sysfs attribute write, as a single ``write(2)``.

    Implementations raise ``OSError`` with the kernel's errno on failure and
    must not retry: sysfs ``store()`` sees the whole buffer of one write.
    """

    def write(self, path: Path, data: str) -> None:
        """Write ``data`` to the attribute file at the absolute ``path``."""
        ...


class OsSysfsWriter:
    """Writes through the real kernel: open, one write, close."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def write(self, path: Path, data: str) -> None:
        """Write ``data`` to ``path`` in one ``write(2)``.

        Raises:
            OSError: with the errno the kernel returned, or EROFS when the
                root is a fake host tree (see :data:`FAKE_HOST_MARKER`).
        """
        if (self._root / FAKE_HOST_MARKER).exists():
            raise OSError(
                errno.EROFS,
                f"{self._root} is a fake host tree; run the agent with --fake-kernel",
                str(path),
            )
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)


class Sysfs:
    """Reads and writes sysfs under one root.

    Args:
        root: directory holding ``sys/`` (and ``dev/``); ``/`` on a real host.
        writer: performs attribute writes; defaults to the real kernel.
    """

    def __init__(self, root: Path, writer: SysfsWriter | None = None) -> None:
        self.root = root
        self.sys = root / "sys"
        self.dev = root / "dev"
        self._writer: SysfsWriter = writer if writer is not None else OsSysfsWriter(root)

    def check_tree(self) -> None:
        """Refuse a root that holds no sysfs tree.

        Discovery reads an absent directory as "nothing there", which is
        right for an optional subsystem but would make an agent started on a
        mistyped root register a host without devices. Callers that report a
        host check the root once, up front.

        Raises:
            NotASysfsTreeError: a directory of :data:`REQUIRED_DIRS` is
                missing (or the root is not a directory at all).
        """
        for relative in REQUIRED_DIRS:
            if not (self.root / relative).is_dir():
                raise NotASysfsTreeError(self.root, relative)

    def path(self, *parts: str) -> Path:
        """Path of ``/sys/<parts...>`` under the root."""
        return self.sys.joinpath(*parts)

    def read(self, path: Path) -> str | None:
        """Content of an attribute without its trailing newline, or None if absent."""
        try:
            return path.read_text().rstrip("\n")
        except (FileNotFoundError, NotADirectoryError):
            return None

    def link_name(self, path: Path) -> str | None:
        """Last component of a symlink's target (a driver or group name), or None."""
        try:
            return os.path.basename(os.readlink(path))
        except (FileNotFoundError, NotADirectoryError, OSError):
            return None

    def read_bytes(self, path: Path) -> bytes | None:
        """Raw content of a binary attribute (PCI ``config``), or None if unreadable.

        A non-root reader of ``config`` gets only its first 64 bytes; callers
        must check the length they need.
        """
        try:
            return path.read_bytes()
        except OSError:
            return None

    def exists(self, path: Path) -> bool:
        """Whether anything (file, directory, device node) is at ``path``."""
        return os.path.lexists(path)

    def resolve(self, path: Path) -> Path:
        """Follow symlinks (``realpath``) within the tree."""
        return path.resolve()

    def listdir(self, path: Path) -> list[str]:
        """Sorted entries of a directory; empty if it does not exist."""
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def write(self, path: Path, data: str) -> None:
        """Write an attribute through the configured writer (one ``write(2)``)."""
        self._writer.write(path, data)
