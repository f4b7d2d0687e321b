"""The logs an operator ships, from real processes: JSON lines, one per event, repeats held back.

A scheduler started with ``--log-format json`` and two agents told the same by
``TESSERA_LOG_FORMAT`` (each on a fake GPU workstation) serve a Place and a
Release; then one agent is killed. The scheduler's housekeeping is made fast
(a round, each a full sweep, every half second; a 2 s lease; a dead host
forgotten 3 s past it), so the dead host's "cannot reconcile" warning would
come every half second until the host is forgotten, about five seconds
later. Each process's standard error is a file under the cluster's logs/.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from tessera.scheduler.local_cluster import LocalCluster
from tessera.v1 import placement_pb2, scheduler_pb2

SWEEP_S = 0.5

GPU = placement_pb2.PlacementRequest(
    request_id="logs-1",
    tenant="acme",
    claims=[placement_pb2.Claim(name="gpu", kind=placement_pb2.DEVICE_KIND_GPU, count=1)],
    host_selector={"name": "ws-a"},
)


def records(log: Path) -> list[dict[str, object]]:
    """Every line of a process's standard error, each parsed as JSON (it must be)."""
    out = []
    for number, line in enumerate(log.read_text().splitlines(), 1):
        try:
            out.append(json.loads(line))
        except ValueError:
            pytest.fail(f"{log.name}:{number} is not JSON: {line!r}")
    return out


def wait_for(found: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found():
            return
        time.sleep(0.2)
    raise AssertionError(f"not seen in {timeout_s} s: {what}")


def about(lines: list[dict[str, object]], **wanted: object) -> list[dict[str, object]]:
    """The lines whose fields have all the wanted values."""
    return [r for r in lines if all(r.get(k) == v for k, v in wanted.items())]


def test_json_logs_carry_one_line_per_event_and_a_dead_host_is_warned_about_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TESSERA_LOG_FORMAT", "json")  # the agents; the scheduler by its flag
    with LocalCluster(tmp_path) as c:
        c.start_valkey()
        c.start_scheduler(
            "scheduler", "--log-format", "json",
            "--heartbeat-interval", "1", "--lease", "2",
            "--housekeeping-interval", str(SWEEP_S), "--full-sweep-interval", str(SWEEP_S),
            "--forget-dead-after", "3",
        )  # fmt: skip
        for host_id in ("ws-a", "ws-b"):
            c.start_agent(host_id, c.build_fake_host("gpu-workstation", host_id), {"name": host_id})
        c.wait_for_hosts({"ws-a", "ws-b"})
        stub = c.stub()
        placed = stub.Place(scheduler_pb2.PlaceRequest(request=GPU), timeout=60).placement
        stub.Release(scheduler_pb2.ReleaseRequest(placement_id=placed.placement_id), timeout=60)

        c.kill("agent-ws-b")
        scheduler_log = c.workdir / "logs" / "scheduler.log"
        wait_for(
            lambda: bool(about(records(scheduler_log), host="ws-b", state="forgotten")),
            "the dead host forgotten",
        )
    scheduler = records(scheduler_log)
    agent = records(c.workdir / "logs" / "agent-ws-a.log")

    # Every line has the four fields of the format; times are UTC.
    for line in scheduler + agent:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
        assert datetime.fromisoformat(str(line["time"])).utcoffset() is not None

    # The Place and the Release: one INFO line each, with what they were about.
    subject = {"placement": placed.placement_id, "tenant": "acme", "host": "ws-a"}
    (ready,) = about(scheduler, **subject, state="ready")
    (released,) = about(scheduler, **subject, state="released")
    assert ready["level"] == released["level"] == "INFO"
    assert ready["request"] == "logs-1" and ready["form"] == "whole" and ready["units"] == 1
    # And on the host: one line when its devices were handed over, one when taken back.
    (prepared,) = about(agent, placement=placed.placement_id, state="prepared")
    (torn_down,) = about(agent, placement=placed.placement_id, state="torn-down")
    assert prepared["devices"] == torn_down["devices"] and prepared["devices"]

    # The dead host: registered, then said once not to answer, though every
    # round until it was forgotten tried it again; then its lease, then forgotten.
    ws_b = [r for r in scheduler if r.get("host") == "ws-b"]
    (warning,) = [r for r in ws_b if str(r["message"]).startswith("cannot reconcile")]
    assert warning["level"] == "WARNING" and warning["reason"]
    states = [r["state"] for r in ws_b if "state" in r]
    assert states == ["registered", "lease-expired", "forgotten"], states
    forgotten = about(ws_b, state="forgotten")[0]
    quiet_s = (
        datetime.fromisoformat(str(forgotten["time"]))
        - datetime.fromisoformat(str(warning["time"]))
    ).total_seconds()
    assert quiet_s >= 4 * SWEEP_S, f"only {quiet_s} s of rounds held back"
    assert not [r for r in scheduler if r["level"] in ("ERROR", "CRITICAL")], "no errors"

    # No line at all for the replica's own reading of the feed.
    assert len(about(scheduler, logger="tessera.scheduler.events", host="ws-a")) == 3


def test_the_agent_and_scheduler_log_text_by_default(tmp_path: Path) -> None:
    with LocalCluster(tmp_path) as c:
        c.start_valkey()
        c.start_scheduler()
        c.start_agent("ws", c.build_fake_host("gpu-workstation", "ws"))
        c.wait_for_hosts({"ws"})
        c.kill("agent-ws", signal.SIGTERM)
    line = next(
        x
        for x in (c.workdir / "logs" / "scheduler.log").read_text().splitlines()
        if "state=registered" in x
    )
    assert " INFO tessera.scheduler.events: host ws registered, agent at " in line
    assert " host=ws state=registered " in line
