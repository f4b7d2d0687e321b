"""Offline planning: the what-if tool for batch jobs (``tessera plan``).

Reads host inventories as ``tessera-agent inventory --json`` prints them and
requests as a YAML or JSON list of ``PlacementRequest`` messages in
protobuf's JSON mapping, and places them with the same engine the scheduler
runs, as one batch (or in order), with no store and no agents.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from tessera.scheduler.core.engine.batch import BatchResult, BatchSettings, solve_batch
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.identity import HostId, PlacementId, RequestId
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState
from tessera.scheduler.core.validation import InvalidRequestError
from tessera.scheduler.service.convert import (
    host_view_from_inventory,
    parsed_requests,
    placement_from_plan,
)
from tessera.scheduler.service.inventory_check import inventory_violations
from tessera.v1 import inventory_pb2, placement_pb2


class PlanningInputError(ValueError):
    """An input file is missing or malformed; the message names file and field."""


def load_inventories(directory: Path) -> list[inventory_pb2.HostInventory]:
    """Every ``*.json`` inventory in a directory, in file-name order.

    Each inventory is checked as Register checks it
    (:mod:`scheduler.service.inventory_check`): a plan on a report the
    scheduler would refuse (a function whose IOMMU group is missing hands a
    device out without its group mates) would be a plan nothing can carry out.

    Raises:
        PlanningInputError: the directory has none, a file is not a
            HostInventory or is one the scheduler refuses (the message names
            the file and the fields), or two files report the same host.
    """
    if not directory.is_dir():
        raise PlanningInputError(f"--hosts: {directory} is not a directory")
    inventories: list[inventory_pb2.HostInventory] = []
    seen: dict[str, Path] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            inv = json_format.Parse(path.read_text(), inventory_pb2.HostInventory())
        except (json_format.ParseError, UnicodeDecodeError) as err:
            # One line, cut: the parser's message may quote the offending value whole.
            why = " ".join(str(err).split())
            why = why if len(why) <= 300 else f"{why[:300]}..."
            raise PlanningInputError(f"{path}: not a HostInventory: {why}") from err
        violations, more = inventory_violations(inv)
        if violations:
            raise PlanningInputError(f"{path}: {InvalidRequestError(violations, more)}")
        if inv.host_id in seen:
            raise PlanningInputError(
                f"{path}: host_id {inv.host_id!r} is also reported by {seen[inv.host_id]}"
            )
        seen[inv.host_id] = path
        inventories.append(inv)
    if not inventories:
        raise PlanningInputError(f"--hosts: no *.json inventory in {directory}")
    return inventories


def load_requests(path: Path) -> list[placement_pb2.PlacementRequest]:
    """The requests of a YAML or JSON file: a list of PlacementRequest messages.

    Raises:
        PlanningInputError: unreadable file, not a list, or a message that
            does not parse (the message names its index).
    """
    try:
        text = path.read_text()
    except OSError as err:
        raise PlanningInputError(f"--requests: {err}") from err
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise PlanningInputError(f"{path}: {err}") from err
    if isinstance(data, dict) and "requests" in data:
        data = data["requests"]
    if not isinstance(data, list):
        raise PlanningInputError(f"{path}: expected a list of PlacementRequest messages")
    out: list[placement_pb2.PlacementRequest] = []
    for i, item in enumerate(data):
        try:
            out.append(json_format.ParseDict(item, placement_pb2.PlacementRequest()))
        except json_format.ParseError as err:
            raise PlanningInputError(f"{path}: requests[{i}]: {err}") from err
    return out


def snapshot_of(inventories: Sequence[inventory_pb2.HostInventory]) -> ClusterSnapshot:
    """An empty cluster of these hosts, every one schedulable."""
    return ClusterSnapshot(
        hosts={
            HostId(inv.host_id): HostState(host_view_from_inventory(inv), alloc_generation=0)
            for inv in inventories
        }
    )


@dataclass(frozen=True)
class PlanReport:
    """What an offline plan produced."""

    placements: list[placement_pb2.Placement]
    unplaced: list[tuple[RequestId, list[str]]]
    result: BatchResult

    def to_json(self) -> dict[str, Any]:
        """The report in protobuf's JSON casing (lowerCamelCase), as ``tessera -o json`` prints.

        ``{"placements": [...], "unplaced": [{"requestId", "reasons"}], "solver": {...}}``.
        """
        r = self.result
        return {
            "placements": [
                json_format.MessageToDict(p, always_print_fields_with_no_presence=True)
                for p in self.placements
            ],
            "unplaced": [{"requestId": rid, "reasons": list(why)} for rid, why in self.unplaced],
            "solver": {
                "status": r.status,
                "objective": r.objective,
                "bound": r.bound,
                "greedyObjective": r.greedy_objective,
                "gpuEquivalentsPlaced": float(r.gpu_equivalents),
                "columns": r.columns,
                "solved": r.solved,
                "wallS": round(r.wall_s, 3),
            },
        }


def plan_offline(
    inventories: Sequence[inventory_pb2.HostInventory],
    messages: Sequence[placement_pb2.PlacementRequest],
    *,
    sequential: bool = False,
    settings: BatchSettings | None = None,
) -> PlanReport:
    """Place requests on hosts with no store and no agents.

    Args:
        inventories: the hosts, as their agents report them.
        messages: the requests.
        sequential: place in order (priority first) with the fast path only,
            instead of one CP-SAT batch.
        settings: solver limits; deterministic (one worker, seed 0) by default.

    Raises:
        InvalidRequestError: a request is malformed (field paths named).
    """
    requests = parsed_requests(messages)
    settings = settings or BatchSettings(workers=1, seed=0)
    if sequential:
        settings = replace(settings, use_solver=False)
    gang_of = {RequestId(m.request_id): m.gang for m in messages if m.gang}
    result = solve_batch(Engine(), snapshot_of(inventories), requests, settings, gang_of)
    by_id = {m.request_id: m for m in messages}
    placements = [
        placement_from_plan(
            plan,
            placement_id=PlacementId(f"planned-{i:05d}"),
            request=by_id[rid],
            now_ms=0,
        )
        for i, (rid, plan) in enumerate(result.plans.items())
    ]
    for p in placements:
        # Nothing was reserved: the placement has no lifecycle state yet.
        p.state = placement_pb2.PLACEMENT_STATE_UNSPECIFIED
        p.message = "planned offline; nothing was reserved"
    unplaced: list[tuple[RequestId, list[str]]] = []
    for m in messages:
        refusal = result.unplaced.get(RequestId(m.request_id))
        if refusal is not None:
            unplaced.append((RequestId(m.request_id), [refusal.summary, *refusal.reasons()]))
    return PlanReport(placements, unplaced, result)
