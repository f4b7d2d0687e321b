"""The operator's commands, as processes: the demo, the CLI, the unsafe-Redis refusal."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from tessera.scheduler.local_cluster import LocalCluster
from tessera.scheduler.store.embedded import EmbeddedValkey
from tessera.v1 import placement_pb2, scheduler_pb2


def tessera(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tessera.scheduler.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_demo_exits_zero_and_prints_placements() -> None:
    result = tessera("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PLACEMENT" in result.stdout and "MIG 3g.40gb@" in result.stdout
    assert "VFs and mdevs left on the hosts: none" in result.stdout
    assert "units the agents still report in use (MIG instances too): none" in result.stdout
    assert "demo OK" in result.stdout
    widest = max(result.stdout.splitlines(), key=len)
    assert len(widest) <= 120, widest


def as_identity(cluster: LocalCluster, role: str = "admin", name: str = "admin") -> tuple[str, ...]:
    """The CLI flags that call the cluster's scheduler as ``role/name``."""
    return ("--scheduler", cluster.scheduler_address, "--tls-dir", str(cluster.tls_dir(role, name)))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cli")) as c:
        c.start_valkey()
        c.start_scheduler()
        c.start_agent("dgx", c.build_fake_host("dgx-a100", "dgx"), {"role": "training"})
        c.wait_for_hosts({"dgx"})
        yield c


def test_place_list_release_through_the_cli(cluster: LocalCluster) -> None:
    at = as_identity(cluster)
    placed = tessera(*at, "place", "--tenant", "acme", "--gpu", "2", "--numa", "single-numa-node",
                     "--request-id", "cli-1")  # fmt: skip
    assert placed.returncode == 0, placed.stderr
    placement_id = placed.stdout.splitlines()[1].split()[0]
    listed = tessera(*at, "list", "--tenant", "acme")
    assert listed.stdout.count(placement_id) == 2  # one row per GPU
    hosts = tessera(*at, "hosts")
    assert "dgx" in hosts.stdout and "2/" in hosts.stdout
    released = tessera(*at, "release", placement_id)
    assert released.returncode == 0 and "released" in released.stdout
    assert "(no placements)" in tessera(*at, "list").stdout


def speaks_protobuf_json(stdout: str, message: type[Message]) -> dict[str, Any]:
    """``stdout`` is exactly protobuf's JSON mapping of ``message`` (lowerCamelCase, all fields)."""
    doc: dict[str, Any] = json.loads(stdout)
    parsed = json_format.ParseDict(doc, message())
    assert json_format.MessageToDict(parsed, always_print_fields_with_no_presence=True) == doc
    return doc


def test_every_command_speaks_one_json_casing(cluster: LocalCluster) -> None:
    at = (*as_identity(cluster), "-o", "json")
    placed = speaks_protobuf_json(
        tessera(*at, "place", "--tenant", "acme", "--gpu", "1").stdout, scheduler_pb2.PlaceResponse
    )
    placement_id = placed["placement"]["placementId"]
    # YAML is the same document.
    listed = json.loads(tessera(*at, "list").stdout)
    assert listed["placements"]
    assert yaml.safe_load(tessera(*at, "list", "-o", "yaml").stdout) == listed
    for args, message in [
        (["explain", "--tenant", "acme", "--gpu", "1"], scheduler_pb2.ExplainResponse),
        (["list"], scheduler_pb2.ListPlacementsResponse),
        (["hosts"], scheduler_pb2.ListHostsResponse),
        (["get", placement_id], placement_pb2.Placement),
        (["host", "cordon", "dgx", "--reason", "json"], scheduler_pb2.HostSummary),
        (["host", "uncordon", "dgx"], scheduler_pb2.HostSummary),
        (["release", placement_id], scheduler_pb2.ReleaseResponse),
        # Nothing left on it: a drain cordons and releases nothing.
        (["host", "drain", "dgx"], scheduler_pb2.DrainHostResponse),
        (["host", "uncordon", "dgx"], scheduler_pb2.HostSummary),
    ]:
        result = tessera(*at, *args)
        assert result.returncode == 0, result.stderr
        speaks_protobuf_json(result.stdout, message)
    shown = json.loads(tessera(*at, "certs", "show", str(cluster.tls_dir("admin", "admin"))).stdout)
    assert set(shown) == {"identity", "expires"}


def test_wide_adds_columns_and_table_stays_narrow(cluster: LocalCluster) -> None:
    at = as_identity(cluster)
    narrow = tessera(*at, "hosts").stdout.splitlines()[0].split()
    wide = tessera(*at, "hosts", "-o", "wide").stdout.splitlines()[0].split()
    assert "AGENT" in wide and "AGENT" not in narrow
    assert narrow == wide[: len(narrow)]


def test_host_cpus_and_memory_are_asked_beside_the_devices(cluster: LocalCluster) -> None:
    at = as_identity(cluster)
    placed = tessera(*at, "place", "--tenant", "acme", "--gpu", "1", "--cpus", "8",
                     "--memory-mib", "16384", "--request-id", "cli-cpus")  # fmt: skip
    assert placed.returncode == 0, placed.stderr
    placement_id = placed.stdout.splitlines()[1].split()[0]
    too_many = tessera(*at, "place", "--tenant", "acme", "--gpu", "1", "--cpus", "4096")
    assert too_many.returncode == 1 and "host-share/host-cpu-short" in too_many.stderr
    bad = tessera(*at, "place", "--tenant", "acme", "--gpu", "1", "--cpus", "-1")
    assert bad.returncode == 2
    assert "argument --cpus: must be 0 to 8,192 CPUs" in bad.stderr.strip().splitlines()[-1]
    assert tessera(*at, "release", placement_id).returncode == 0


def test_the_cli_reports_a_bad_request_with_the_field(cluster: LocalCluster) -> None:
    result = tessera(*as_identity(cluster), "place", "--tenant", "", "--gpu", "1")
    assert result.returncode == 2  # the request is wrong: the user's mistake
    assert "INVALID_ARGUMENT: tenant:" in result.stderr


def test_a_tenant_places_as_itself_and_cannot_name_another(cluster: LocalCluster) -> None:
    at = as_identity(cluster, "tenant", "initech")
    placed = tessera(*at, "place", "--gpu", "1", "--request-id", "cli-tenant")
    assert placed.returncode == 0, placed.stderr
    assert "initech" in placed.stdout  # filled in from the certificate
    other = tessera(*at, "place", "--tenant", "acme", "--gpu", "1")
    assert other.returncode == 1 and "PERMISSION_DENIED" in other.stderr
    assert tessera(*at, "release", placed.stdout.splitlines()[1].split()[0]).returncode == 0


def test_the_cli_refuses_a_missing_tls_dir_in_one_line(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    result = tessera("--scheduler", cluster.scheduler_address, "--tls-dir", str(tmp_path), "list")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "ca.pem" in result.stderr


def test_a_placement_file_in_yaml_is_accepted(cluster: LocalCluster, tmp_path: Path) -> None:
    request = tmp_path / "request.yaml"
    request.write_text(
        "requestId: cli-yaml\ntenant: globex\n"
        "claims:\n- name: gpu\n  kind: DEVICE_KIND_GPU\n  count: 1\n"
        "hostSelector:\n  role: training\n"
    )
    at = as_identity(cluster)
    explained = tessera(*at, "explain", "--file", str(request))
    assert explained.returncode == 0 and "fits on dgx" in explained.stdout
    placed = tessera(*at, "place", "--file", str(request))
    assert placed.returncode == 0, placed.stderr
    assert tessera(*at, "release", placed.stdout.splitlines()[1].split()[0]).returncode == 0


def test_the_scheduler_refuses_a_redis_that_can_lose_placements(tmp_path: Path) -> None:
    with EmbeddedValkey(tmp_path / "valkey") as server:
        client = redis.Redis.from_url(server.url)
        client.config_set("appendonly", "no")
        client.close()
        result = subprocess.run(
            [sys.executable, "-m", "tessera.scheduler", "--listen", "127.0.0.1:0",
             "--redis-url", server.url],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 2
    assert "refusing to start" in result.stderr and "appendonly" in result.stderr


def scheduler_refusal(*args: str) -> str:
    """The one line a scheduler started with ``args`` refuses them with (exit 2, no traceback)."""
    result = subprocess.run(
        [sys.executable, "-m", "tessera.scheduler", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e9", "soon"])
def test_the_scheduler_refuses_a_duration_that_would_never_fire(value: str) -> None:
    error = scheduler_refusal("--full-sweep-interval", value)
    assert "--full-sweep-interval" in error and value in error, error


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1e9", "soon", "-0.5"])
def test_the_scheduler_refuses_a_warming_interval_other_than_off_or_a_duration(
    value: str,
) -> None:
    error = scheduler_refusal(f"--agent-warm-interval={value}")
    assert "--agent-warm-interval" in error and "0 for off" in error, error


@pytest.mark.parametrize("value", ["packing", "tessera-packing ", "", "FIRST-FIT"])
def test_the_scheduler_refuses_a_policy_it_does_not_have(value: str) -> None:
    error = scheduler_refusal("--policy", value)
    assert "--policy" in error and "tessera-packing" in error, error


def test_the_scheduler_raises_its_open_files_limit_to_the_hard_limit() -> None:
    """A connection per agent: a soft limit of 256 would cap the fleet it can reach."""
    code = (
        "import resource; from tessera.scheduler.__main__ import raise_open_files_limit; "
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
        "print(soft, hard, raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    )  # fmt: skip
    soft_before, hard_seen, reported, soft_after = map(int, result.stdout.split())
    assert soft_before == 256 and hard_seen == hard
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert reported == soft_after == wanted


@pytest.fixture(scope="module")
def virt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The 2-socket virtualization host: SR-IOV NICs, a P4 for vGPU, an A100 in MIG mode."""
    with LocalCluster(tmp_path_factory.mktemp("cli-forms")) as c:
        c.start_valkey()
        # Heartbeats every second: a released MIG instance stays live in the
        # host's report (and so taken) until its agent reports again.
        c.start_scheduler("scheduler", "--heartbeat-interval", "1")
        c.start_agent("virt", c.build_fake_host("virt-2s", "virt", mig=("0000:4b:00.0",)))
        c.wait_for_hosts({"virt"})
        yield c


def a100_empty(at: tuple[str, ...]) -> None:
    """Wait until the A100's MIG instances of earlier tests are reported gone (a 7g fits)."""
    deadline = time.monotonic() + 30
    while tessera(*at, "explain", "--tenant", "acme", "--mig", "7g.80gb").returncode != 0:
        assert time.monotonic() < deadline, "the A100's instances were never reported gone"
        time.sleep(0.5)


@pytest.mark.parametrize(
    ("flags", "shown"),
    [
        (["--vf", "2"], "VF 1 of"),
        (["--mdev", "nvidia-63"], "mdev nvidia-63 on"),
        (["--mig", "3g.40gb:2"], "MIG 3g.40gb@"),
        (["--mig", "1g.10gb", "--vf", "1"], "MIG 1g.10gb@"),
    ],
    ids=["vf", "mdev", "mig", "mig+vf"],
)
def test_every_form_is_placed_from_flags(virt: LocalCluster, flags: list[str], shown: str) -> None:
    at = as_identity(virt)
    a100_empty(at)
    placed = tessera(*at, "place", "--tenant", "acme", *flags)
    assert placed.returncode == 0, placed.stderr
    assert shown in placed.stdout
    placement_id = placed.stdout.splitlines()[1].split()[0]
    assert tessera(*at, "release", placement_id).returncode == 0


def test_explain_exits_0_when_a_request_would_be_placed_and_1_when_not(virt: LocalCluster) -> None:
    at = as_identity(virt)
    a100_empty(at)
    fits = tessera(*at, "explain", "--tenant", "acme", "--mig", "1g.10gb")
    assert fits.returncode == 0, fits.stderr
    # Passthrough cannot live-migrate: no host can take it.
    refused = tessera(*at, "explain", "--tenant", "acme", "--gpu", "1", "--migratable")
    assert refused.returncode == 1, refused.stderr
    assert "rejected" in refused.stdout
