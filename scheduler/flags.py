"""Durations on Tessera's command lines, as argparse types: one reading for every flag."""

from __future__ import annotations

import argparse


def seconds(text: str) -> float:
    """A flag's duration: a finite, positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text[:32]!r}") from None
    # Up to a day: a longer wait is a typo, and inf or nan would never fire.
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(
            f"must be above 0 and at most 86400 seconds: {text[:32]!r}"
        )
    return value


def seconds_or_off(text: str) -> float:
    """A flag's duration as :func:`seconds`, or 0 for off."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass
    try:
        return seconds(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{err}, or 0 for off") from None
