"""Scenario files: named fixture hosts, requests, and the placements they must get.

A scenario is a YAML file beside this module::

    name: GPU and NIC under one switch on an 8-GPU HGX host
    why: one line saying which rule the scenario pins down
    hosts:
      - fixture: hgx-8gpu            # a name of agent.testing.hosts.FIXTURES
        id: hgx                      # host id (default: the fixture name)
        labels: {zone: a}            # reported labels (optional)
        setup:                       # host state made through the fakes (optional)
          vfs: {"0000:07:00.0": 4}   # sriov_numvfs writes (KernelEmulator)
          writes:                    # any other sysfs writes, in order (KernelEmulator)
            - ["bus/pci/devices/0000:07:00.2/driver_override", mlx5_vfio_pci]
          mig: ["0000:0a:00.0"]      # GPUs put in MIG mode (FakeNvml)
          mig_instances:             # GPU instances someone else made (FakeNvml)
            "0000:0a:00.0": [1g.10gb@0]
          inventory_patch:           # state no fake can make; see below
            mdev_types: {"0000:3b:00.0": {nvidia-63: {migratable: true}}}
            functions: {"0000:3b:00.0": {host_use: boot display}}
    mode: batch                      # or sequential (default batch)
    xfail: engine bug, reason        # optional: the scenario shows a known bug
    requests:                        # tessera.v1.PlacementRequest, protobuf JSON mapping
      - {request_id: r1, tenant: a, claims: [{name: gpu, kind: DEVICE_KIND_GPU}]}
    expect:
      r1: {host: hgx, allocations: [{claim: gpu, whole_device: "0000:0a:00.0"}]}
      r2: {unplaced: [numa/...]}     # plugin/reason names among the rejections

Setup steps run in the order listed above, on a freshly built tree, before the
real agent discovery (``HostReporter`` over ``Sysfs`` and the fake NVML, as
``tessera-agent inventory`` wires them). ``inventory_patch`` is applied to the
discovered ``HostInventory`` and stands for host state the fakes cannot
produce (a vendor-migratable mdev type: no sysfs file says so); a scenario
using it says so in its ``why``. Its ``functions`` entries are merged into the
PCI function of that address, ``mdev_types`` entries into the mdev type of
that parent, both in protobuf JSON mapping.

Requests get two conveniences: a claim's ``count`` defaults to 1, and
``DEVICE_FORM_`` / ``ISOLATION_`` / other enum values are written in full, as
the proto names them.

Expected allocations are compared one to one with the plan's assignments
(claim units in claim order, matched in any order), but only on the fields
given: ``whole_device`` (and ``group_endpoints``), ``vf: {pf, index,
driver}``, ``mdev: {parent, type}``, ``mig: {gpu, profile, start, size}``,
``numa_node``. An expectation without ``allocations`` checks the host only.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml
import yaml
from google.protobuf import json_format

from tessera.agent.nvml import NullNvmlClient, open_nvml
from tessera.agent.reporter import HostReporter
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing import hosts
from tessera.agent.testing.kernel import KernelEmulator
from tessera.agent.testing.nvml import STATE_FILE, FakeNvml, nvml_bus_id
from tessera.scheduler.core.checker import Violation, check_placements
from tessera.scheduler.core.engine.batch import BatchSettings
from tessera.scheduler.core.identity import RequestId
from tessera.scheduler.core.plan import (
    Assignment,
    MdevAssignment,
    MigAssignment,
    Plan,
    Unschedulable,
    VfAssignment,
    WholeDeviceAssignment,
)
from tessera.scheduler.planning import PlanReport, plan_offline, snapshot_of
from tessera.scheduler.service.convert import parsed_requests
from tessera.v1 import inventory_pb2, placement_pb2

SCENARIO_DIR = Path(__file__).parent

_SETUP_KEYS = frozenset({"vfs", "writes", "mig", "mig_instances", "inventory_patch"})
_ALLOCATION_KEYS = frozenset({"claim", "whole_device", "group_endpoints", "vf", "mdev", "mig",
                              "numa_node"})  # fmt: skip


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class HostSpec:
    """One host of a scenario: a fixture, its id and labels, and its setup."""

    fixture: str
    host_id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    setup: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    """A parsed scenario file."""

    path: Path
    name: str
    why: str
    hosts: tuple[HostSpec, ...]
    sequential: bool
    requests: tuple[placement_pb2.PlacementRequest, ...]
    expect: Mapping[str, Mapping[str, Any]]
    xfail: str | None = None


def scenario_files() -> list[Path]:
    """Every scenario file, in name order."""
    return sorted(SCENARIO_DIR.glob("*.yaml"))


def _fail(path: Path, where: str, why: str) -> ScenarioError:
    return ScenarioError(f"{path.name}: {where}: {why}")


def _request(path: Path, i: int, item: Any) -> placement_pb2.PlacementRequest:
    if not isinstance(item, dict):
        raise _fail(path, f"requests[{i}]", "expected a mapping")
    body = dict(item)
    claims = []
    for claim in body.get("claims", []):
        claims.append({"count": 1, **claim})
    body["claims"] = claims
    try:
        return json_format.ParseDict(body, placement_pb2.PlacementRequest())
    except json_format.ParseError as err:
        raise _fail(path, f"requests[{i}]", str(err)) from err


def load(path: Path) -> Scenario:
    """Parse and check a scenario file.

    Raises:
        ScenarioError: a missing or unknown field, an unknown fixture, a
            request that does not parse, or an expectation for no request.
    """
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise _fail(path, "top level", "expected a mapping")
    for key in ("name", "why", "hosts", "requests", "expect"):
        if key not in data:
            raise _fail(path, key, "required")
    unknown = set(data) - {"name", "why", "hosts", "mode", "requests", "expect", "xfail"}
    if unknown:
        raise _fail(path, "top level", f"unknown keys {sorted(unknown)}")
    specs: list[HostSpec] = []
    for i, h in enumerate(data["hosts"]):
        if h.get("fixture") not in hosts.FIXTURES:
            raise _fail(path, f"hosts[{i}].fixture", f"unknown fixture {h.get('fixture')!r}")
        setup = h.get("setup") or {}
        if set(setup) - _SETUP_KEYS:
            raise _fail(
                path, f"hosts[{i}].setup", f"unknown keys {sorted(set(setup) - _SETUP_KEYS)}"
            )
        specs.append(
            HostSpec(
                fixture=h["fixture"],
                host_id=str(h.get("id", h["fixture"])),
                labels={str(k): str(v) for k, v in (h.get("labels") or {}).items()},
                setup=setup,
            )
        )
    mode = data.get("mode", "batch")
    if mode not in ("batch", "sequential"):
        raise _fail(path, "mode", f"batch or sequential, not {mode!r}")
    requests = tuple(_request(path, i, r) for i, r in enumerate(data["requests"]))
    ids = [r.request_id for r in requests]
    expect: dict[str, Mapping[str, Any]] = dict(data["expect"])
    if set(expect) != set(ids):
        raise _fail(
            path,
            "expect",
            f"must name every request exactly: missing {sorted(set(ids) - set(expect))}, "
            f"unknown {sorted(set(expect) - set(ids))}",
        )
    for rid, e in expect.items():
        for a in e.get("allocations", []):
            if "claim" not in a or set(a) - _ALLOCATION_KEYS:
                raise _fail(path, f"expect.{rid}.allocations", f"bad allocation {a!r}")
    return Scenario(
        path=path,
        name=str(data["name"]),
        why=str(data["why"]),
        hosts=tuple(specs),
        sequential=mode == "sequential",
        requests=requests,
        expect=expect,
        xfail=data.get("xfail"),
    )


# ----------------------------------------------------------------- host setup


def _bus_id(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _mig_profile(nvml: FakeNvml, handle: Any, name: str) -> int:
    """The ID of a GPU-instance profile, by the name the GPU's driver gives it."""
    for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index)
        except pynvml.NVMLError:
            continue
        if _bus_id(info.name) == f"MIG {name}":
            return int(info.id)
    raise ValueError(f"the GPU has no MIG profile {name!r}")


def _placement_size(nvml: FakeNvml, handle: Any, profile_id: int, start: int) -> int:
    """Memory slices of the profile's placement at ``start``."""
    buf = (pynvml.c_nvmlGpuInstancePlacement_t * 16)()
    count = ctypes.c_uint(16)
    nvml.nvmlDeviceGetGpuInstancePossiblePlacements(handle, profile_id, buf, ctypes.byref(count))
    for i in range(count.value):
        if buf[i].start == start:
            return int(buf[i].size)
    raise ValueError(f"profile {profile_id} has no placement at slice {start}")


def _setup_nvml(root: Path, setup: Mapping[str, Any]) -> None:
    enable: Sequence[str] = setup.get("mig", [])
    instances: Mapping[str, Sequence[str]] = setup.get("mig_instances", {})
    if not enable and not instances:
        return
    nvml = FakeNvml.from_tree(root)
    nvml.nvmlInit()
    try:
        handles = {}
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            handles[_bus_id(nvml.nvmlDeviceGetPciInfo(handle).busId)] = handle
        for address in enable:
            status = nvml.nvmlDeviceSetMigMode(
                handles[nvml_bus_id(address)], pynvml.NVML_DEVICE_MIG_ENABLE
            )
            assert status == pynvml.NVML_SUCCESS, f"MIG mode of {address}: status {status}"
        for address, made in instances.items():
            for item in made:
                name, _, start = item.partition("@")
                handle = handles[nvml_bus_id(address)]
                profile_id = _mig_profile(nvml, handle, name)
                size = _placement_size(nvml, handle, profile_id, int(start))
                placement = pynvml.c_nvmlGpuInstancePlacement_t()
                placement.start, placement.size = int(start), size
                nvml.nvmlDeviceCreateGpuInstanceWithPlacement(handle, profile_id, placement)
    finally:
        nvml.nvmlShutdown()


def _patch(inventory: inventory_pb2.HostInventory, patch: Mapping[str, Any]) -> None:
    functions = {f.address: f for f in inventory.pci_functions}
    for address, fields in (patch.get("functions") or {}).items():
        json_format.ParseDict(fields, functions[address])
    parents = {p.address: p for p in inventory.mdev_parents}
    for address, types in (patch.get("mdev_types") or {}).items():
        by_id = {t.id: t for t in parents[address].types}
        for type_id, fields in types.items():
            json_format.ParseDict(fields, by_id[type_id])


def build_inventory(spec: HostSpec, root: Path) -> inventory_pb2.HostInventory:
    """Build the fixture under ``root``, set it up, and discover it as the agent does."""
    hosts.build(spec.fixture, root)
    setup = spec.setup
    kernel = KernelEmulator(root)
    for pf, count in (setup.get("vfs") or {}).items():
        kernel.write(root / "sys" / "bus" / "pci" / "devices" / pf / "sriov_numvfs", str(count))
    for attribute, value in setup.get("writes") or []:
        kernel.write(root / "sys" / attribute, str(value))
    _setup_nvml(root, setup)
    nvml = (
        open_nvml(FakeNvml.from_tree(root))
        if (root / STATE_FILE).exists()
        else NullNvmlClient("this fake host has no fake NVIDIA driver")
    )
    reporter = HostReporter(
        Sysfs(root), nvml, host_id=spec.host_id, boot_id=f"boot-{spec.host_id}", labels=spec.labels
    )
    inventory, _ = reporter.report()
    _patch(inventory, setup.get("inventory_patch") or {})
    return inventory


# ------------------------------------------------------------------ running


@dataclass(frozen=True)
class Outcome:
    """What planning a scenario produced, and what the checker says of it."""

    report: PlanReport
    violations: list[Violation]

    @property
    def plans(self) -> Mapping[RequestId, Plan]:
        """Plans by request id."""
        return self.report.result.plans

    @property
    def unplaced(self) -> Mapping[RequestId, Unschedulable]:
        """Refusals by request id."""
        return self.report.result.unplaced


def run(scenario: Scenario, workdir: Path) -> Outcome:
    """Build every host under ``workdir``, plan offline, and check every plan."""
    inventories = [
        build_inventory(spec, workdir / f"{i}-{spec.host_id}")
        for i, spec in enumerate(scenario.hosts)
    ]
    report = plan_offline(
        inventories,
        scenario.requests,
        sequential=scenario.sequential,
        settings=BatchSettings(workers=1, seed=0, time_limit_s=10.0),
    )
    requests = {r.request_id: r for r in parsed_requests(scenario.requests)}
    made = [(requests[rid], plan) for rid, plan in report.result.plans.items()]
    return Outcome(report, check_placements(snapshot_of(inventories), made))


# ------------------------------------------------------------- expectations


def _assignment_fields(a: Assignment) -> dict[str, Any]:
    if isinstance(a, WholeDeviceAssignment):
        return {
            "claim": a.claim,
            "whole_device": a.address,
            "group_endpoints": list(a.group_endpoints),
            "numa_node": a.numa_node,
        }
    if isinstance(a, VfAssignment):
        vf = {"pf": a.pf_address, "index": a.vf_index, "driver": a.vfio_driver}
        return {"claim": a.claim, "vf": vf, "numa_node": a.numa_node}
    if isinstance(a, MdevAssignment):
        mdev = {"parent": a.parent_address, "type": a.type_id}
        return {"claim": a.claim, "mdev": mdev, "numa_node": a.numa_node}
    assert isinstance(a, MigAssignment)
    mig = {"gpu": a.gpu_address, "profile": a.profile_name, "start": a.start, "size": a.size}
    return {"claim": a.claim, "mig": mig, "numa_node": a.numa_node}


def _matches(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    for key, want in expected.items():
        if key not in actual:
            return False
        got = actual[key]
        if isinstance(want, dict):
            if not isinstance(got, dict) or not _matches(want, got):
                return False
        elif want != got:
            return False
    return True


def _one_to_one(expected: Sequence[Mapping[str, Any]], actual: Sequence[dict[str, Any]]) -> bool:
    """Whether each expected allocation matches a distinct actual one (and counts agree)."""
    if len(expected) != len(actual):
        return False
    used = [False] * len(actual)

    def assign(i: int) -> bool:
        if i == len(expected):
            return True
        for j, a in enumerate(actual):
            if not used[j] and _matches(expected[i], a):
                used[j] = True
                if assign(i + 1):
                    return True
                used[j] = False
        return False

    return assign(0)


def describe(outcome: Outcome, request_id: str) -> str:
    """What a request got, for failure messages."""
    plan = outcome.plans.get(RequestId(request_id))
    if plan is not None:
        got = [_assignment_fields(a) for a in plan.assignments]
        return f"placed on {plan.host_id}: {got}"
    refusal = outcome.unplaced.get(RequestId(request_id))
    if refusal is not None:
        return f"unplaced: {refusal.summary}; {refusal.reasons()}"
    return "neither placed nor unplaced"


def mismatch(outcome: Outcome, request_id: str, expected: Mapping[str, Any]) -> str | None:
    """Why a request's outcome differs from its expectation, or None."""
    plan = outcome.plans.get(RequestId(request_id))
    if "unplaced" in expected:
        refusal = outcome.unplaced.get(RequestId(request_id))
        if refusal is None:
            return f"{request_id}: expected unplaced, got {describe(outcome, request_id)}"
        names = {f"{r.plugin}/{r.reason}" for r in refusal.rejections}
        missing = [n for n in expected["unplaced"] if n not in names]
        if missing:
            return f"{request_id}: reasons {missing} missing from {sorted(names)}"
        return None
    if plan is None:
        return f"{request_id}: expected a placement, got {describe(outcome, request_id)}"
    if "host" in expected and plan.host_id != expected["host"]:
        return (
            f"{request_id}: expected host {expected['host']}, got {describe(outcome, request_id)}"
        )
    if "allocations" in expected:
        actual = [_assignment_fields(a) for a in plan.assignments]
        if not _one_to_one(expected["allocations"], actual):
            return (
                f"{request_id}: expected allocations {expected['allocations']}, "
                f"got {describe(outcome, request_id)}"
            )
    return None
