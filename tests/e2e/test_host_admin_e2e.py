"""An operator takes a host out, empties it and forgets it, with real processes.

Two workstations (two GPUs each, every GPU grouped with its HDMI audio) under
one scheduler and the embedded Valkey, each agent on its fake host tree. The
operator works through the ``tessera host`` commands; placements go through
gRPC. The scheduler tells agents to heartbeat every second, so a forgotten
host whose agent still runs is back within a second or two: as a new host,
uncordoned.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tessera.scheduler.local_cluster import LocalCluster
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

HOSTS = ("ws-a", "ws-b")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("host-admin")) as c:
        c.start_valkey()
        c.start_scheduler("scheduler", "--heartbeat-interval", "1")
        for host_id in HOSTS:
            c.start_agent(
                host_id,
                c.build_fake_host("gpu-workstation", host_id),
                {"name": host_id, "pool": "ws"},
            )
        c.wait_for_hosts(set(HOSTS))
        yield c


def tessera(
    cluster: LocalCluster, *args: str, role: str = "admin", name: str = "admin"
) -> subprocess.CompletedProcess[str]:
    """The CLI against the cluster's scheduler, as ``role/name``."""
    at = ["--scheduler", cluster.scheduler_address]
    if cluster.tls:
        at += ["--tls-dir", str(cluster.tls_dir(role, name))]
    return subprocess.run(
        [sys.executable, "-m", "tessera.scheduler.cli", *at, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def place(
    stub: scheduler_pb2_grpc.SchedulerStub, request_id: str, **selector: str
) -> placement_pb2.Placement:
    request = placement_pb2.PlacementRequest(
        request_id=request_id,
        tenant="acme",
        claims=[
            placement_pb2.Claim(
                name="gpu",
                kind=placement_pb2.DEVICE_KIND_GPU,
                count=1,
                forms=[placement_pb2.DEVICE_FORM_WHOLE_DEVICE],
            )
        ],
        host_selector=selector,
    )
    return stub.Place(scheduler_pb2.PlaceRequest(request=request), timeout=60).placement


def drivers(root: Path) -> dict[str, str | None]:
    """Every PCI function of a fake host -> the driver bound to it."""
    out: dict[str, str | None] = {}
    for device in sorted((root / "sys" / "bus" / "pci" / "devices").iterdir()):
        link = device / "driver"
        out[device.name] = os.path.basename(os.readlink(link)) if link.is_symlink() else None
    return out


def host_summary(stub: scheduler_pb2_grpc.SchedulerStub, host_id: str) -> scheduler_pb2.HostSummary:
    hosts = stub.ListHosts(scheduler_pb2.ListHostsRequest(), timeout=10).hosts
    [summary] = [h for h in hosts if h.host_id == host_id]
    return summary


def test_cordon_drain_and_forget_a_host_whose_agent_then_registers_it_again(
    cluster: LocalCluster,
) -> None:
    stub = cluster.stub()
    root = cluster.workdir / "hosts" / "ws-a"
    before = drivers(root)
    held = [place(stub, f"admin-{i}", name="ws-a") for i in range(2)]
    assert all(p.state == placement_pb2.PLACEMENT_STATE_READY for p in held)
    assert sum(d == "vfio-pci" for d in drivers(root).values()) == 4  # 2 GPUs + their audio

    # Cordon: the host says so, and takes nothing new; the pool places elsewhere.
    cordoned = tessera(cluster, "host", "cordon", "ws-a", "--reason", "bad inventory")
    assert cordoned.returncode == 0, cordoned.stderr
    assert cordoned.stdout.strip() == "cordoned ws-a: bad inventory"
    listed = tessera(cluster, "hosts")
    [row] = [line for line in listed.stdout.splitlines() if line.startswith("ws-a ")]
    assert "NO (cordoned)" in row and "bad inventory" in row
    assert " 2/2 " in row and " whole 2 " in row  # both groups, held whole
    with pytest.raises(grpc.RpcError) as refused:
        place(stub, "admin-refused", name="ws-a")
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cordoned" in (refused.value.details() or "")  # not "lease-expired"
    elsewhere = place(stub, "admin-elsewhere", pool="ws")
    assert elsewhere.host_id == "ws-b"
    stub.Release(scheduler_pb2.ReleaseRequest(placement_id=elsewhere.placement_id), timeout=60)

    # Forget refuses while the host holds placements.
    busy = tessera(cluster, "host", "forget", "ws-a")
    assert busy.returncode == 1
    assert "FAILED_PRECONDITION" in busy.stderr and "drain it first" in busy.stderr

    # Drain: every placement torn down on the host, its devices back on their drivers.
    drained = tessera(cluster, "host", "drain", "ws-a")
    assert drained.returncode == 0, drained.stdout + drained.stderr
    for placement in held:
        assert placement.placement_id in drained.stdout
    assert "drained ws-a: 2 released, 0 not released" in drained.stdout
    assert drivers(root) == before
    assert host_summary(stub, "ws-a").cordoned  # still out until forgotten or uncordoned
    listed_placements = stub.ListPlacements(
        scheduler_pb2.ListPlacementsRequest(host_id="ws-a"), timeout=10
    ).placements
    assert list(listed_placements) == []

    # Forget: gone from the store. Its agent still runs: its next heartbeat is
    # refused, it registers again, and the host is back as new (uncordoned).
    forgotten = tessera(cluster, "host", "forget", "ws-a")
    assert forgotten.returncode == 0, forgotten.stderr
    assert forgotten.stdout.strip() == "forgot ws-a"
    cluster.wait_for_hosts({"ws-a"}, timeout_s=30)
    summary = host_summary(stub, "ws-a")
    assert not summary.cordoned and summary.cordon_reason == ""
    assert summary.allocated_groups == 0
    again = place(stub, "admin-again", name="ws-a")
    assert again.host_id == "ws-a" and again.state == placement_pb2.PLACEMENT_STATE_READY
    stub.Release(scheduler_pb2.ReleaseRequest(placement_id=again.placement_id), timeout=60)
    assert drivers(root) == before


def test_uncordon_lets_placements_land_again(cluster: LocalCluster) -> None:
    stub = cluster.stub()
    assert tessera(cluster, "host", "cordon", "ws-b").returncode == 0
    assert not host_summary(stub, "ws-b").schedulable
    uncordoned = tessera(cluster, "host", "uncordon", "ws-b")
    assert uncordoned.returncode == 0, uncordoned.stderr
    assert uncordoned.stdout.strip() == "uncordoned ws-b (schedulable: yes)"
    placed = place(stub, "uncordoned-1", name="ws-b")
    assert placed.host_id == "ws-b"
    stub.Release(scheduler_pb2.ReleaseRequest(placement_id=placed.placement_id), timeout=60)


def test_host_commands_report_errors_in_one_line(cluster: LocalCluster) -> None:
    unknown = tessera(cluster, "host", "drain", "nowhere")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "tessera: NOT_FOUND: host nowhere is not registered"
    malformed = tessera(cluster, "host", "cordon", "bad{id}")
    assert malformed.returncode == 2, malformed.stdout
    assert "INVALID_ARGUMENT: host_id" in malformed.stderr, malformed.stderr


def test_only_an_admin_may_cordon(cluster: LocalCluster) -> None:
    if not cluster.tls:
        pytest.skip("the cluster runs plaintext: every caller is trusted")
    refused = tessera(cluster, "host", "cordon", "ws-b", role="tenant", name="acme")
    assert refused.returncode == 1, refused.stdout
    assert "PERMISSION_DENIED" in refused.stderr, refused.stderr
    assert host_summary(cluster.stub(), "ws-b").schedulable
