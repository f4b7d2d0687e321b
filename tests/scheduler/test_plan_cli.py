"""`tessera plan`: offline what-if planning over agent inventories, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

BIN = Path(sys.executable).parent

#: A batch where placing in order loses: request "pair", of a higher priority,
#: takes a GPU of the 8-GPU HGX host first, and then neither 8-GPU gang member
#: fits anywhere but the DGX. Solved jointly, both gang members get whole hosts
#: (sixteen GPUs at a rank below are worth more than one) and "pair" waits.
REQUESTS: list[dict[str, Any]] = [
    {
        "request_id": "pair",
        "tenant": "t1",
        "priority": 2,
        "claims": [
            {"name": "gpu", "kind": "DEVICE_KIND_GPU", "count": 1},
            {"name": "nic", "kind": "DEVICE_KIND_NIC", "count": 1},
        ],
        "affinities": [
            {"claim_a": "gpu", "claim_b": "nic",
             "scope": "AFFINITY_SCOPE_SAME_SWITCH", "required": True}
        ],
    },
    {"request_id": "g1", "tenant": "t2", "gang": "train", "priority": 1,
     "claims": [{"name": "gpu", "kind": "DEVICE_KIND_GPU", "count": 8}]},
    {"request_id": "g2", "tenant": "t2", "gang": "train", "priority": 1,
     "claims": [{"name": "gpu", "kind": "DEVICE_KIND_GPU", "count": 8}]},
    {"request_id": "vfs", "tenant": "t3",
     "claims": [{"name": "vf", "kind": "DEVICE_KIND_NIC", "count": 3,
                 "forms": ["DEVICE_FORM_VF"], "min_isolation": "ISOLATION_SHARED"}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inventories of three fixture hosts, as `tessera-agent inventory --json` prints them."""
    base = tmp_path_factory.mktemp("plan")
    out = base / "hosts"
    out.mkdir()
    for name in ("hgx-8gpu", "dgx-a100", "sriov-nic"):
        tree = base / "trees" / name
        subprocess.run([BIN / "tessera-agent", "fakehost", "build", name, str(tree)], check=True,
                       capture_output=True)  # fmt: skip
        inventory = subprocess.run(
            [BIN / "tessera-agent", "inventory", "--sysfs-root", str(tree), "--host-id", name,
             "--json"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        (out / f"{name}.json").write_text(inventory)
    return out


def plan(hosts: Path, requests: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "tessera", "plan", "--hosts", str(hosts), "--requests", str(requests), *flags],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_a_batch_is_planned_jointly_and_printed_as_json(hosts: Path, tmp_path: Path) -> None:
    requests = tmp_path / "requests.yaml"
    requests.write_text(yaml.safe_dump(REQUESTS))
    done = plan(hosts, requests, "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    placed = {p["requestId"]: p for p in out["placements"]}
    assert set(placed) == {"g1", "g2", "vfs"}
    assert {placed["g1"]["hostId"], placed["g2"]["hostId"]} == {"hgx-8gpu", "dgx-a100"}
    assert len(placed["vfs"]["allocations"]) == 3
    assert all("vf" in a for a in placed["vfs"]["allocations"])
    (unplaced,) = out["unplaced"]
    assert unplaced["requestId"] == "pair"
    assert "batch/outcompeted: 1 (pair)" in unplaced["reasons"]
    assert out["solver"]["objective"] > out["solver"]["greedyObjective"]
    assert out["solver"]["objective"] <= out["solver"]["bound"]
    assert out["solver"]["solved"] is True  # the seed placed less: the model ran


def test_sequential_planning_places_in_order_and_breaks_the_gang(
    hosts: Path, tmp_path: Path
) -> None:
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps(REQUESTS))
    done = plan(hosts, requests, "-o", "json", "--sequential")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert {p["requestId"] for p in out["placements"]} == {"pair", "vfs"}
    unplaced = {u["requestId"]: u["reasons"] for u in out["unplaced"]}
    assert set(unplaced) == {"g1", "g2"}
    assert any("batch/gang-incomplete" in r for r in unplaced["g1"])


def test_a_malformed_request_is_refused_naming_the_field(hosts: Path, tmp_path: Path) -> None:
    requests = tmp_path / "bad.yaml"
    requests.write_text(yaml.safe_dump([{"request_id": "x", "tenant": "t", "claims": [
        {"name": "g", "kind": "DEVICE_KIND_GPU", "count": 0}]}]))  # fmt: skip
    done = plan(hosts, requests)
    assert done.returncode == 2
    assert "requests[0].claims[0].count" in done.stderr


def test_a_missing_hosts_directory_is_refused(tmp_path: Path) -> None:
    requests = tmp_path / "r.yaml"
    requests.write_text(yaml.safe_dump(REQUESTS))
    done = plan(tmp_path / "nowhere", requests)
    assert done.returncode == 2 and "--hosts" in done.stderr
