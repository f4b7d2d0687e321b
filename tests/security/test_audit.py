"""The audit log: one JSON object a line, apart from the debug log.

Spec (``tessera.security.audit``): each line holds ``time`` (UTC, ISO 8601,
``Z``), ``audit``, ``service``, ``who``, ``peer``, ``action``, ``outcome`` and
``resources`` (``detail`` when the outcome is not OK); a value is cut to
``MAX_VALUE`` characters so a hostile caller cannot grow the log with long ids;
a path appends, ``-`` is standard output, None keeps no log; records never
reach the root logger.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from tessera.security.audit import MAX_VALUE, AuditLog

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_each_record_is_one_json_object_on_its_own_line(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.log"), "scheduler")
    log.record(
        who="spiffe://tessera/tenant/acme",
        action="Place",
        outcome="OK",
        resources={"tenant": "acme", "request_id": "r1", "host_id": "dgx-07"},
        peer="ipv4:10.0.0.7:51234",
    )
    log.record(
        who="spiffe://tessera/agent/dgx-08",
        action="Register",
        outcome="PERMISSION_DENIED",
        resources={"host_id": "dgx-07"},
        detail="agent/dgx-08 speaks for host 'dgx-08' only",
    )
    log.close()
    first, second = lines(tmp_path / "audit.log")
    assert first == {
        "time": first["time"],
        "audit": "tessera",
        "service": "scheduler",
        "who": "spiffe://tessera/tenant/acme",
        "peer": "ipv4:10.0.0.7:51234",
        "action": "Place",
        "outcome": "OK",
        "resources": {"tenant": "acme", "request_id": "r1", "host_id": "dgx-07"},
    }
    assert second["outcome"] == "PERMISSION_DENIED"
    assert second["detail"] == "agent/dgx-08 speaks for host 'dgx-08' only"


def test_the_time_is_utc_iso_8601_with_a_z(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.log"), "agent")
    before = dt.datetime.now(dt.UTC)
    log.record(who="w", action="Prepare", outcome="OK")
    after = dt.datetime.now(dt.UTC)
    log.close()
    [line] = lines(tmp_path / "audit.log")
    assert ISO_UTC.match(line["time"]), line["time"]
    stamp = dt.datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    slack = dt.timedelta(milliseconds=2)
    assert before - slack <= stamp <= after + slack


def test_empty_resources_are_left_out_and_detail_only_when_given(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.log"), "scheduler")
    log.record(
        who="w",
        action="Release",
        outcome="OK",
        resources={"placement_id": "pl-1@h", "request_id": "", "tenant": None},
    )
    log.record(who="w", action="ListHosts", outcome="OK")
    log.close()
    first, second = lines(tmp_path / "audit.log")
    assert first["resources"] == {"placement_id": "pl-1@h"}
    assert "detail" not in first
    assert second["resources"] == {}


HUGE = "x" * 20_000


def test_long_values_are_cut(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.log"), "scheduler")
    log.record(
        who=HUGE,
        action="Place",
        outcome="INVALID_ARGUMENT",
        resources={"tenant": HUGE, "requests": 3},
        peer=HUGE,
        detail=HUGE,
    )
    log.close()
    [line] = lines(tmp_path / "audit.log")
    for value in (line["who"], line["peer"], line["detail"], line["resources"]["tenant"]):
        assert len(value) <= MAX_VALUE
        assert value.startswith("xxx")
    assert line["resources"]["requests"] == 3
    assert len((tmp_path / "audit.log").read_text()) < 6 * MAX_VALUE


def test_long_values_inside_a_list_are_cut_too(tmp_path: Path) -> None:
    # The scheduler describes a PlaceBatch by the list of its tenants: a caller
    # naming 16 tenants of 20 KB must not write a 320 KB line.
    log = AuditLog(str(tmp_path / "audit.log"), "scheduler")
    log.record(
        who="spiffe://tessera/admin/ops",
        action="PlaceBatch",
        outcome="INVALID_ARGUMENT",
        resources={"tenants": [HUGE + str(i) for i in range(16)], "requests": 16},
    )
    log.close()
    assert len((tmp_path / "audit.log").read_text()) < 20 * MAX_VALUE


def test_a_file_is_appended_to_never_truncated(tmp_path: Path) -> None:
    for action in ("Place", "Release"):
        log = AuditLog(str(tmp_path / "logs" / "audit.log"), "scheduler")
        log.record(who="w", action=action, outcome="OK")
        log.close()
    assert [line["action"] for line in lines(tmp_path / "logs" / "audit.log")] == [
        "Place",
        "Release",
    ]


def test_dash_writes_to_standard_output(capsys: pytest.CaptureFixture[str]) -> None:
    log = AuditLog("-", "agent")
    assert log.enabled
    log.record(who="spiffe://tessera/scheduler/s1", action="Prepare", outcome="OK")
    log.close()
    out = capsys.readouterr()
    [line] = [json.loads(text) for text in out.out.splitlines()]
    assert (line["service"], line["action"], line["outcome"]) == ("agent", "Prepare", "OK")
    assert out.err == ""


def test_none_keeps_no_audit_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(None, "scheduler")
    assert not log.enabled
    with caplog.at_level(logging.DEBUG):
        log.record(who="w", action="Place", outcome="OK")
    log.close()
    assert capsys.readouterr() == ("", "")
    assert caplog.records == []
    assert list(tmp_path.iterdir()) == []


def test_records_do_not_reach_the_root_logger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(str(tmp_path / "audit.log"), "scheduler")
    with caplog.at_level(logging.DEBUG):
        log.record(who="spiffe://tessera/tenant/acme", action="Place", outcome="OK")
    log.close()
    assert caplog.records == []
    assert len(lines(tmp_path / "audit.log")) == 1


def test_two_logs_of_one_process_write_each_to_its_own_sink(tmp_path: Path) -> None:
    first = AuditLog(str(tmp_path / "a.log"), "scheduler")
    second = AuditLog(str(tmp_path / "b.log"), "scheduler")
    first.record(who="w", action="Place", outcome="OK")
    second.record(who="w", action="Release", outcome="OK")
    first.close()
    second.close()
    assert [line["action"] for line in lines(tmp_path / "a.log")] == ["Place"]
    assert [line["action"] for line in lines(tmp_path / "b.log")] == ["Release"]


def test_nothing_is_written_after_close(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.log"), "scheduler")
    log.record(who="w", action="Place", outcome="OK")
    log.close()
    log.record(who="w", action="Release", outcome="OK")
    assert not log.enabled
    assert [line["action"] for line in lines(tmp_path / "audit.log")] == ["Place"]
