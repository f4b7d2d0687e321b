"""How every Tessera process logs: its flags, its two line formats, its repeats held back.

``tessera-scheduler`` and ``tessera-agent run`` both call :func:`configure`
once, from their command line (``--log-level``, ``--log-format``). Lines go to
standard error, in one of two formats carrying the same content:

* ``text`` (the default), for people: the time, level, logger and message,
  then each structured field as ``key=value`` (written as JSON when bare it
  would hold a space, a quote or a control character, or read as a number
  or a list), all on one line::

      2026-12-06 07:01:02,345 INFO tessera.scheduler.events: placement
      pl-3f@dgx-07 ready on host dgx-07 placement=pl-3f@dgx-07 request=r1
      tenant=acme host=dgx-07 state=ready form=mig units=1

* ``json``, for log shippers: one object a line with ``time`` (ISO 8601,
  UTC), ``level``, ``logger``, ``message`` and the same fields::

      {"time": "2026-12-06T07:01:02.345Z", "level": "INFO",
       "logger": "tessera.scheduler.events",
       "message": "placement pl-3f@dgx-07 ready on host dgx-07",
       "placement": "pl-3f@dgx-07", "request": "r1", "tenant": "acme",
       "host": "dgx-07", "state": "ready", "form": "mig", "units": 1}

Structured fields are what a call passes as ``extra=``: what the line is
about (:data:`SUBJECT_FIELDS`) and whatever else describes it (``state``,
``reason``, ``form``, ``by``...). String values are cut at
:data:`MAX_FIELD` characters and lists at :data:`MAX_ITEMS` items, so a
caller's long id cannot grow the log.

Warnings and errors that repeat are held back (:class:`RepeatFilter`): a
dead host the housekeeper cannot reconcile is said once per
:data:`REPEAT_WINDOW_S`, not every round.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

#: The levels ``--log-level`` takes, as logging names them.
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: The formats ``--log-format`` takes.
FORMATS = ("text", "json")

#: The structured fields that name what a line is about. A repeated warning
#: is a repeat only about the same ones (see :class:`RepeatFilter`).
SUBJECT_FIELDS = ("placement", "request", "tenant", "host", "finding")

#: Seconds during which repeats of one warning are held back.
REPEAT_WINDOW_S = 300.0

#: Longest string field written, in characters (ids are bounded at 256
#: already; reasons relayed from agents are not).
MAX_FIELD = 512

#: Most items of a list field written.
MAX_ITEMS = 16

#: Longest message written, in characters: a message can carry an agent's
#: error text, which nothing else bounds.
MAX_MESSAGE = 2048

#: Characters a text line must not carry raw: a newline would forge a line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: The attributes every LogRecord has (those of this Python: 3.12 adds
#: ``taskName``) and the two formatters add: everything else on a record
#: came from ``extra=``.
_RECORD_ATTRS = frozenset(
    [*logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__, "message", "asctime"]
)

#: A text field value that needs no quotes: no space, quote, equals sign,
#: backslash or control character.
_BARE = re.compile(r"[^\s\"=\\\x00-\x1f\x7f]+")


def log_level(text: str) -> str:
    """``--log-level``, any case, as logging names it; argparse's one-line error otherwise."""
    level = text.strip().upper()
    if level not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: use one of {', '.join(LEVELS)}")
    return level


def log_format(text: str) -> str:
    """``--log-format``, any case: ``text`` or ``json``; argparse's one-line error otherwise."""
    name = text.strip().lower()
    if name not in FORMATS:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: use one of {', '.join(FORMATS)}")
    return name


def add_log_flags(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """``--log-level`` and ``--log-format``, defaulting to ``TESSERA_LOG_LEVEL``/``_FORMAT``.

    A bad value, from the flag or the environment, is argparse's one-line
    error naming the flag (argparse checks a string default with its type).
    """
    parser.add_argument(
        "--log-level",
        type=log_level,
        default=env.get("TESSERA_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL [TESSERA_LOG_LEVEL; INFO]",
    )
    parser.add_argument(
        "--log-format",
        type=log_format,
        default=env.get("TESSERA_LOG_FORMAT", "text"),
        help="text (key=value fields after the message) or json (one object a line) "
        "[TESSERA_LOG_FORMAT; text]",
    )


def fields(record: logging.LogRecord) -> dict[str, object]:
    """The structured fields of a record (its ``extra=``), cut to size, in the order given.

    Names that start with an underscore are private to a handler and not
    written (as python-json-logger does).
    """
    return {
        key: _capped(value)
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRS and not key.startswith("_")
    }


def _capped(value: object) -> object:
    """A field's value cut to :data:`MAX_FIELD` characters and :data:`MAX_ITEMS` items."""
    if isinstance(value, str):
        return value if len(value) <= MAX_FIELD else value[: MAX_FIELD - 3] + "..."
    if isinstance(value, list | tuple | set | frozenset):
        items = [_capped(v) for v in list(value)[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            items.append(f"... {len(value) - MAX_ITEMS} more")
        return items
    return value


def _logfmt(value: object) -> str:
    """One field's value as text: bare when it can be, else a JSON literal (quoted, escaped).

    Escaping keeps a value with a newline or a space from forging a second
    line or field; a string that would read as another JSON value (``0``,
    ``true``, ``[``) is quoted, so every value reads back as it was.
    """
    if isinstance(value, str) and _BARE.fullmatch(value) and not _reads_as_json(value):
        return value
    return json.dumps(value, default=str, separators=(",", ":"))


def one_line(text: str) -> str:
    """``text`` cut to :data:`MAX_MESSAGE`, its control characters escaped as JSON escapes them."""
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + "..."
    return _CONTROL.sub(lambda m: json.dumps(m.group())[1:-1], text)


def _reads_as_json(text: str) -> bool:
    """Whether bare ``text`` would be taken for a JSON value (a number, ``null``, a list)."""
    if text[0] in "[{":
        return True
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def utc_timestamp(record: logging.LogRecord) -> str:
    """When a record was made, ISO 8601 in UTC to the millisecond (``...T07:01:02.345Z``)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``; a traceback follows on its own lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        """The line before any traceback: the message, then the structured fields.

        The message may quote text from elsewhere (an agent's error): it is
        written on one line, so it cannot forge a line of its own.
        """
        record.message = one_line(record.message)
        line = super().formatMessage(record)
        extra = fields(record)
        if not extra:
            return line
        return line + "".join(f" {key}={_logfmt(value)}" for key, value in extra.items())


class JsonLineFormatter(JsonFormatter):
    """One JSON object a line: time, level, logger, message, then the structured fields.

    A traceback, if any, is the ``exc_info`` field (one string).
    """

    def __init__(self) -> None:
        super().__init__(
            ["asctime", "levelname", "name", "message"],
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )

    def formatTime(  # noqa: N802 - logging's name
        self, record: logging.LogRecord, datefmt: str | None = None
    ) -> str:
        """ISO 8601 in UTC, whatever the host's time zone."""
        return utc_timestamp(record)

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        """Cut the structured fields and the message to size (a traceback stays whole)."""
        return {
            key: (
                value
                if key in ("exc_info", "stack_info")
                else str(value)[:MAX_MESSAGE]
                if key == "message"
                else _capped(value)
            )
            for key, value in log_data.items()
        }


@dataclass
class _Seen:
    """One kind of line: when it was last let through, and the repeats held back since."""

    shown_at: float
    held: int = 0


class RepeatFilter(logging.Filter):
    """Holds back repeats of a warning for a while, then says how many there were.

    Records below ``level`` always pass. Of the others, the first of a kind
    passes; repeats of it within ``window_s`` of that line are held back, and
    the first one after the window passes with ``(repeated N times in 5 min)``
    added to its message and the count as its ``repeated`` field. Held-back
    repeats are counted, never queued: if they stop, the count is not told.

    A kind is the logger, level and message template, and what the line is
    about: its :data:`SUBJECT_FIELDS` if it has any, else its arguments that
    are not numbers (so a delay or a count does not make a new kind, a host
    id or an error text does), and the exception it carries (type and text).

    A line with a ``state`` field reports a change of state: it passes
    whenever the state differs from the one last shown by its logger for the
    same subject fields, so a health status that flips back and forth is
    never held back on one side.

    Memory is bounded: past ``max_kinds`` kinds, those whose window has
    passed are forgotten first, then the oldest (whose next line then
    passes early: logs fail open).

    Args:
        window_s: how long repeats are held back after a line that passed.
        level: the lowest level held back.
        clock: seconds, monotonic (injectable for tests).
        max_kinds: kinds remembered at most.
    """

    def __init__(
        self,
        window_s: float = REPEAT_WINDOW_S,
        *,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 4096,
    ) -> None:
        super().__init__()
        self._window_s = window_s
        self._level = level
        self._clock = clock
        self._max_kinds = max_kinds
        # Handlers call filters outside their lock, and the agent logs from
        # worker threads.
        self._lock = threading.Lock()
        self._seen: dict[tuple[object, ...], _Seen] = {}
        self._states: dict[tuple[object, ...], str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether the record is written (it may gain a note of the repeats held back)."""
        now = self._clock()
        with self._lock:
            # Every line's state counts, INFO included: a recovery said at
            # INFO lets the next failure's WARNING through.
            changed = self._state_changed(record)
            if record.levelno < self._level:
                return True
            kind = _kind(record)
            seen = self._seen.get(kind)
            if seen is not None and not changed and now - seen.shown_at < self._window_s:
                seen.held += 1
                return False
            if seen is not None and seen.held:
                span = _span(now - seen.shown_at)
                record.msg = f"{record.msg} (repeated {seen.held} times in {span})"
                record.repeated = seen.held
            # Re-inserted: the dict's order is the order of last showing,
            # oldest first, which eviction relies on.
            self._seen.pop(kind, None)
            self._seen[kind] = _Seen(now)
            self._evict(self._seen, now)
        return True

    def _state_changed(self, record: logging.LogRecord) -> bool:
        """Whether the record reports a state other than the last shown for its subject."""
        state = record.__dict__.get("state")
        if state is None:
            return False
        key = (record.name, _subject(record))
        before = self._states.pop(key, None)
        self._states[key] = str(state)
        if len(self._states) > self._max_kinds:
            del self._states[next(iter(self._states))]
        return before is not None and before != str(state)

    def _evict(self, seen: dict[tuple[object, ...], _Seen], now: float) -> None:
        """Keep at most ``max_kinds``: those past their window go first, then the oldest."""
        if len(seen) <= self._max_kinds:
            return
        for kind in [k for k, s in seen.items() if now - s.shown_at >= self._window_s]:
            del seen[kind]
        while len(seen) > self._max_kinds:
            del seen[next(iter(seen))]


#: Longest part of a kind's key kept (an error text can be long).
_KEY_PART = 256


def _subject(record: logging.LogRecord) -> tuple[tuple[str, str], ...]:
    """The record's subject fields and their values, as text."""
    return tuple(
        (name, str(record.__dict__[name])[:_KEY_PART])
        for name in SUBJECT_FIELDS
        if record.__dict__.get(name) is not None
    )


def _about(record: logging.LogRecord) -> tuple[object, ...]:
    """What a line is about: its subject fields, else its arguments that are not numbers."""
    about: tuple[object, ...] = _subject(record)
    if not about:
        args: tuple[object, ...]
        if isinstance(record.args, Mapping):
            args = tuple(record.args.values())
        else:
            args = record.args or ()
        about = tuple(
            str(a)[:_KEY_PART] for a in args if not isinstance(a, int | float) and a is not None
        )
    return about


def _kind(record: logging.LogRecord) -> tuple[object, ...]:
    """Which lines count as repeats of one another (see :class:`RepeatFilter`)."""
    about = _about(record)
    failure: tuple[str, str] | None = None
    if record.exc_info and record.exc_info[1] is not None:
        err = record.exc_info[1]
        failure = (type(err).__qualname__, str(err)[:_KEY_PART])
    return (record.name, record.levelno, str(record.msg)[:_KEY_PART], about, failure)


def _span(seconds: float) -> str:
    """A duration as a person reads it: ``40 s``, ``5 min``, ``2 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


class _ProcessHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure` installs (told apart so a second call replaces it)."""


def configure(
    level: str,
    fmt: str = "text",
    *,
    stream: TextIO | None = None,
    repeats: RepeatFilter | None = None,
) -> logging.Handler:
    """Set the process's logging up: the root logger's level and its one handler.

    Called once by each program's ``main``; a later call replaces the
    handler an earlier one installed (handlers others added stay).

    Args:
        level: a name of :data:`LEVELS`.
        fmt: ``text`` or ``json``.
        stream: where lines go (default: standard error, as it is now).
        repeats: the filter holding back repeated warnings (default: one
            with :data:`REPEAT_WINDOW_S`).

    Returns:
        The handler installed.
    """
    handler = _ProcessHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonLineFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(repeats if repeats is not None else RepeatFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ProcessHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    # Python's warnings (a deprecation in a dependency) become log lines in
    # the chosen format instead of raw text on stderr among JSON lines.
    logging.captureWarnings(True)
    return handler
