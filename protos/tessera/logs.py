"""What every Tessera process reads of its logging from the command line."""

from __future__ import annotations

import argparse

#: The levels ``--log-level`` takes, as logging names them.
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(text: str) -> str:
    """``--log-level``, any case, as logging names it; argparse's one-line error otherwise."""
    level = text.strip().upper()
    if level not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: use one of {', '.join(LEVELS)}")
    return level
