"""How Tessera's processes log: both formats carry the same fields, repeats are held back.

The formatters and the repeat filter of :mod:`tessera.logs` are driven with
records of a private logger (outside logging's registry, as the audit log's
is), so nothing here touches the process's own logging; :func:`configure`
is checked on the root logger and put back after.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.logs import (
    MAX_FIELD,
    MAX_ITEMS,
    JsonLineFormatter,
    RepeatFilter,
    TextFormatter,
    configure,
    log_format,
)

WINDOW_S = 300.0


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def logger_to(
    stream: io.StringIO, formatter: logging.Formatter, *filters: RepeatFilter
) -> logging.Logger:
    """A private logger writing to ``stream`` through ``formatter`` and ``filters``."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    for f in filters:
        handler.addFilter(f)
    log = logging.Logger("tessera.test")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    return log


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


PLACED = {
    "placement": "pl-3f@dgx-07",
    "request": "r1",
    "tenant": "acme",
    "host": "dgx-07",
    "state": "ready",
    "form": "mig",
    "units": 2,
}


# -- the JSON format -----------------------------------------------------------


def test_a_json_line_is_one_object_with_time_level_logger_message_and_its_fields() -> None:
    out = io.StringIO()
    log = logger_to(out, JsonLineFormatter())

    log.info("placement %s ready on host %s", "pl-3f@dgx-07", "dgx-07", extra=PLACED)

    (line,) = lines(out)
    record = json.loads(line)
    assert record["level"] == "INFO"
    assert record["logger"] == "tessera.test"
    assert record["message"] == "placement pl-3f@dgx-07 ready on host dgx-07"
    assert {k: record[k] for k in PLACED} == PLACED
    assert list(record)[:4] == ["time", "level", "logger", "message"]


def test_a_json_line_tells_its_time_in_iso_8601_utc_to_the_millisecond() -> None:
    out = io.StringIO()
    log = logger_to(out, JsonLineFormatter())
    before = datetime.now(UTC)

    log.warning("something")

    stamp = json.loads(lines(out)[0])["time"]
    assert stamp.endswith("Z") and len(stamp) == len("2026-12-06T07:01:02.345Z")
    when = datetime.fromisoformat(stamp)
    assert when.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= when <= datetime.now(UTC) + timedelta(seconds=1)


def test_a_traceback_in_json_is_one_field_of_the_one_line() -> None:
    out = io.StringIO()
    log = logger_to(out, JsonLineFormatter())
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        log.exception("internal error", extra={"host": "h1"})

    (line,) = lines(out)
    record = json.loads(line)
    assert "ValueError: bad" in record["exc_info"]
    assert record["host"] == "h1"


# -- the text format -----------------------------------------------------------


def test_a_text_line_has_the_same_fields_as_key_value_after_the_message() -> None:
    out = io.StringIO()
    log = logger_to(out, TextFormatter())

    log.info("placement %s ready on host %s", "pl-3f@dgx-07", "dgx-07", extra=PLACED)

    (line,) = lines(out)
    assert " INFO tessera.test: placement pl-3f@dgx-07 ready on host dgx-07 " in line
    assert line.endswith(
        " placement=pl-3f@dgx-07 request=r1 tenant=acme host=dgx-07 state=ready form=mig units=2"
    )


def test_a_text_line_without_fields_reads_as_before() -> None:
    out = io.StringIO()
    log = logger_to(out, TextFormatter())

    log.warning("the store answers again")

    assert lines(out)[0].endswith(" WARNING tessera.test: the store answers again")


def _field(line: str, key: str) -> object:
    """The value of ``key=`` in a text line: JSON, or else a bare word (a string)."""
    rest = line[line.index(f" {key}=") + len(key) + 2 :]
    if rest.startswith(('"', "[", "{")):
        return json.JSONDecoder().raw_decode(rest)[0]
    word = rest.split(" ", 1)[0]
    try:
        return json.loads(word)
    except ValueError:
        return word


@given(
    st.one_of(st.text(max_size=80), st.from_regex(r"-?[0-9][0-9a-z.:e+-]{0,12}", fullmatch=True)),
    st.lists(st.text(max_size=10), max_size=5),
)
def test_any_text_value_reads_back_whole_and_cannot_forge_a_line_or_a_field(
    reason: str, devices: list[str]
) -> None:
    out = io.StringIO()
    log = logger_to(out, TextFormatter())

    log.info("torn down", extra={"reason": reason, "devices": devices, "host": "h1"})

    (line,) = lines(out)
    assert _field(line, "reason") == reason
    assert _field(line, "devices") == devices
    assert line.endswith(" host=h1")


# -- sizes -----------------------------------------------------------------------


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonLineFormatter()], ids=["text", "json"])
def test_long_values_and_long_lists_are_cut_in_both_formats(formatter: logging.Formatter) -> None:
    out = io.StringIO()
    log = logger_to(out, formatter)

    log.warning("x", extra={"reason": "r" * 10_000, "devices": [f"d{i}" for i in range(100)]})

    (line,) = lines(out)
    assert len(line) < 2 * MAX_FIELD + 40 * MAX_ITEMS
    assert "r" * (MAX_FIELD - 3) + "..." in line
    assert "... 84 more" in line


# -- repeats -----------------------------------------------------------------------


def repeat_logger() -> tuple[logging.Logger, io.StringIO, FakeClock]:
    out = io.StringIO()
    clock = FakeClock()
    log = logger_to(out, JsonLineFormatter(), RepeatFilter(WINDOW_S, clock=clock))
    return log, out, clock


def cannot_reconcile(log: logging.Logger, host: str, reason: str = "connection refused") -> None:
    log.warning(
        "cannot reconcile host %s now: %s", host, reason, extra={"host": host, "reason": reason}
    )


def test_a_repeated_warning_is_said_once_then_again_after_the_window_with_its_count() -> None:
    log, out, clock = repeat_logger()

    for _ in range(55):  # a round every 5 s for 275 s
        cannot_reconcile(log, "dead-1")
        clock.now += 5
    assert len(lines(out)) == 1
    clock.now += WINDOW_S - 275
    cannot_reconcile(log, "dead-1")

    first, second = (json.loads(line) for line in lines(out))
    assert "repeated" not in first
    assert second["message"].endswith("(repeated 54 times in 5 min)")
    assert second["repeated"] == 54


def test_a_warning_about_another_host_is_not_a_repeat_but_another_reason_is() -> None:
    log, out, _ = repeat_logger()

    cannot_reconcile(log, "dead-1", "connection refused")
    cannot_reconcile(log, "dead-2", "connection refused")
    cannot_reconcile(log, "dead-1", "deadline exceeded")

    assert [json.loads(line)["host"] for line in lines(out)] == ["dead-1", "dead-2"]


def test_without_subject_fields_text_arguments_make_the_kind_and_numbers_do_not() -> None:
    log, out, _ = repeat_logger()

    for delay in (0.2, 0.5, 1.0, 2.0, 5.0):
        log.warning("scheduler unreachable (%s); retrying in %.1fs", "UNAVAILABLE", delay)
    log.warning("scheduler unreachable (%s); retrying in %.1fs", "DEADLINE_EXCEEDED", 5.0)
    log.warning("%s", "first start-up warning")
    log.warning("%s", "second start-up warning")

    assert len(lines(out)) == 4


def test_info_lines_are_never_held_back() -> None:
    log, out, _ = repeat_logger()

    for _ in range(10):
        log.info("lease of host %s expired", "h1", extra={"host": "h1"})

    assert len(lines(out)) == 10


def test_different_exceptions_under_one_message_are_different_kinds() -> None:
    log, out, _ = repeat_logger()

    for err in (KeyError("a"), KeyError("a"), ValueError("b"), KeyError("c")):
        try:
            raise err
        except Exception:
            log.exception("internal error")

    assert len(lines(out)) == 3


def test_a_change_of_state_always_shows_however_often_it_flips() -> None:
    log, out, clock = repeat_logger()

    for _ in range(3):
        log.error("store unusable (%s)", "refused", extra={"state": "NOT_SERVING"})
        clock.now += 1
        log.warning("store answers again", extra={"state": "SERVING"})
        clock.now += 1
    log.warning("store answers again", extra={"state": "SERVING"})

    states = [json.loads(line)["state"] for line in lines(out)]
    assert states == ["NOT_SERVING", "SERVING"] * 3


def test_a_recovery_said_at_info_lets_the_next_outage_through() -> None:
    log, out, clock = repeat_logger()

    for state in ("unreachable", "reachable", "unreachable"):
        level = logging.INFO if state == "reachable" else logging.WARNING
        log.log(level, "scheduler %s", state, extra={"host": "h1", "state": state})
        clock.now += 1

    assert [json.loads(line)["state"] for line in lines(out)] == [
        "unreachable", "reachable", "unreachable",
    ]  # fmt: skip


def test_each_finding_keeps_its_own_state() -> None:
    log, out, clock = repeat_logger()

    for finding in ("A", "B"):
        log.error("replica would lose placements: %s", finding,
                  extra={"state": "found", "finding": finding})  # fmt: skip
    for finding in ("A", "B"):
        log.warning("no longer found: %s", finding, extra={"state": "gone", "finding": finding})
    clock.now += 1
    for finding in ("A", "B"):
        log.error("replica would lose placements: %s", finding,
                  extra={"state": "found", "finding": finding})  # fmt: skip

    assert len(lines(out)) == 6


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonLineFormatter()], ids=["text", "json"])
def test_a_message_quoting_an_agent_error_stays_one_line_and_is_cut(
    formatter: logging.Formatter,
) -> None:
    out = io.StringIO()
    log = logger_to(out, formatter)
    forged = "boom\n2026-12-08 00:00:00,000 INFO tessera.scheduler.events: placement p ready"
    log.warning("placement %s failed: %s", "p1", forged + "x" * 5000)

    (line,) = lines(out)
    assert "failed: boom\\n2026" in line
    assert len(line) < 2 * 2048


def test_memory_is_bounded_and_a_forgotten_kind_shows_again() -> None:
    out = io.StringIO()
    clock = FakeClock()
    log = logger_to(out, JsonLineFormatter(), RepeatFilter(WINDOW_S, clock=clock, max_kinds=8))

    for i in range(100):
        cannot_reconcile(log, f"h{i}")
    cannot_reconcile(log, "h99")  # still remembered: held
    cannot_reconcile(log, "h0")  # forgotten long ago: shows again (logs fail open)

    assert len(lines(out)) == 101


@given(st.lists(st.tuples(st.integers(0, 400), st.sampled_from(["a", "b", "c"])), max_size=60))
def test_every_repeat_is_either_shown_or_counted_on_the_next_line_shown(
    steps: list[tuple[int, str]],
) -> None:
    log, out, clock = repeat_logger()
    # Per host: each line sent, as (when, the record shown for it or None).
    sent: dict[str, list[tuple[float, dict[str, object] | None]]] = {"a": [], "b": [], "c": []}
    for dt, host in steps:
        clock.now += dt
        before = len(lines(out))
        cannot_reconcile(log, host)
        shown = json.loads(lines(out)[-1]) if len(lines(out)) > before else None
        sent[host].append((clock.now, shown))

    for history in sent.values():
        if not history:
            continue
        assert history[0][1] is not None, "the first line of a kind always shows"
        held, last_shown = 0, history[0][0]
        for when, shown in history[1:]:
            if shown is None:
                assert when - last_shown < WINDOW_S, "held back only within the window"
                held += 1
                continue
            assert when - last_shown >= WINDOW_S, "shown again only after the window"
            assert shown.get("repeated", 0) == held, "the count is what was held back"
            held, last_shown = 0, when


# -- the command line and the process's setup ---------------------------------------


def test_log_format_takes_text_or_json_in_any_case_and_refuses_anything_else() -> None:
    assert log_format("JSON") == "json"
    assert log_format(" text ") == "text"
    with pytest.raises(argparse.ArgumentTypeError, match="use one of text, json"):
        log_format("xml")


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The root logger's handlers and level, put back after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_configure_installs_one_handler_and_a_second_call_replaces_it(root_logging: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure("INFO", "text", stream=first)
    configure("WARNING", "json", stream=second)

    logging.getLogger("tessera.scheduler.events").info("not at WARNING")
    logging.getLogger("tessera.scheduler.events").warning("once", extra={"host": "h1"})

    assert first.getvalue() == ""
    (line,) = lines(second)
    assert json.loads(line)["host"] == "h1"
