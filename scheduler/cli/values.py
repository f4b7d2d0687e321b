"""The values the command line takes, as argparse types: each refuses a bad value in one line.

argparse turns an :class:`argparse.ArgumentTypeError` into ``tessera <command>:
error: argument --flag: <why>`` and exit 2, so every check here names the value
it refused (cut to 32 characters: an argument is hostile input too).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from tessera.scheduler.core.validation import MAX_COUNT, MAX_CPU_MILLI, MAX_MEMORY_MIB


def count(text: str) -> int:
    """A device count flag: 0 to the most one claim may ask."""
    if not text.isdigit() or int(text) > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: a count from 0 to {MAX_COUNT}")
    return int(text)


def choice_count(text: str) -> tuple[str, int]:
    """``NAME[:N]``: a MIG profile or mdev type and how many (1 when left out)."""
    name, sep, number = text.partition(":")
    if not name or len(name) > 64:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: NAME or NAME:COUNT")
    if not sep:
        return name, 1
    if not number.isdigit() or not 1 <= int(number) <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: a count from 1 to {MAX_COUNT}")
    return name, int(number)


def vendor(text: str) -> int:
    """A PCI vendor id, ``0x10de`` or decimal."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: a PCI vendor id, e.g. 0x10de") from None
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: a PCI vendor id is 0x0000 to 0xffff")
    return value


def priority(text: str) -> int:
    """A request's priority: a 32-bit signed number."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: a whole number") from None
    if not -(2**31) <= value < 2**31:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: out of range")
    return value


def label(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of a host label; a bare key is refused, not read as an empty value."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: KEY=VALUE")
    return key, value


def port(text: str) -> int:
    """A TCP port flag: 0 to 65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a port (0-65535): {text[:32]!r}")
    return int(text)


def cpus(text: str) -> int:
    """``--cpus`` as thousandths of a CPU."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:32]!r} is not a number of CPUs") from None
    if not 0 <= value <= MAX_CPU_MILLI / 1000:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_CPU_MILLI // 1000:,} CPUs")
    return round(value * 1000)


def memory_mib(text: str) -> int:
    """``--memory-mib``: host memory beside the devices."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:32]!r} is not a whole number of MiB") from None
    if not 0 <= value <= MAX_MEMORY_MIB:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_MEMORY_MIB:,} MiB")
    return value


def read_password(source: Path) -> bytes:
    """The first line of a password file (``-``: standard input), without its newline."""
    try:
        text = sys.stdin.readline() if str(source) == "-" else source.read_text().splitlines()[0]
    except IndexError:
        text = ""
    return text.rstrip("\r\n").encode()


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for a whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:32]!r}: a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text[:32]!r}: from {low} to {high}")
        return value

    return parse
