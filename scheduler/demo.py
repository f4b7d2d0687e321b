"""tessera demo: a cluster on three fake hosts, end to end, in about ten seconds.

Starts an embedded Valkey, a scheduler and three agents (each driving a fake
host tree through the kernel emulator and a fake NVML), places whole devices,
SR-IOV VFs, a vGPU mdev and MIG instances, shows where they went and what the
host's drivers became, releases them and checks that every device is back on
its original driver and every VF, mdev and MIG instance is gone.

With ``--serve`` the scheduler also serves the dashboard; the demo keeps its
placements, prints the dashboard's address and the admin certificate to
import into a browser, and keeps the cluster running until interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import grpc

from tessera.client.paging import all_hosts, all_placements
from tessera.scheduler.cli.tables import format_hosts, format_placements
from tessera.scheduler.local_cluster import LocalCluster
from tessera.scheduler.store.connection import redact_url
from tessera.security.certs import browser_bundle
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

#: (host id, fixture, labels, GPUs in MIG mode). Fixtures ship with the agent
#: (agent.testing); the operator put the virtualization host's A100 in MIG mode.
DEMO_HOSTS: tuple[tuple[str, str, dict[str, str], tuple[str, ...]], ...] = (
    ("virt-01", "virt-2s", {"role": "virtualization", "rack": "r1"}, ("0000:4b:00.0",)),
    ("dgx-01", "dgx-a100", {"role": "training", "rack": "r2"}, ()),
    ("ws-01", "gpu-workstation", {"role": "workstation", "rack": "r3"}, ()),
)


def _sliced(
    name: str, kind: int, count: int, form: int, isolation: int, **choices: list[str]
) -> placement_pb2.Claim:
    return placement_pb2.Claim(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        count=count,
        forms=[form],  # type: ignore[list-item]
        min_isolation=isolation,  # type: ignore[arg-type]
        **choices,  # type: ignore[arg-type]
    )


def _claim(name: str, kind: int, count: int, migratable: bool = False) -> placement_pb2.Claim:
    return placement_pb2.Claim(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        count=count,
        forms=[placement_pb2.DEVICE_FORM_WHOLE_DEVICE],
        migratable=migratable,
    )


def demo_requests() -> list[tuple[str, placement_pb2.PlacementRequest]]:
    """The requests the demo places, each with what it shows."""
    gpu, nic, acc = (
        placement_pb2.DEVICE_KIND_GPU,
        placement_pb2.DEVICE_KIND_NIC,
        placement_pb2.DEVICE_KIND_ACCELERATOR,
    )
    return [
        (
            "a workstation GPU whose IOMMU group also holds its HDMI audio function",
            placement_pb2.PlacementRequest(
                request_id="demo-acme-1", tenant="acme", claims=[_claim("gpu", gpu, 1)],
                host_selector={"role": "workstation"},
            ),
        ),
        (
            "two training GPUs on one NUMA node",
            placement_pb2.PlacementRequest(
                request_id="demo-globex-1", tenant="globex", claims=[_claim("gpus", gpu, 2)],
                numa_policy=placement_pb2.NUMA_POLICY_SINGLE_NUMA_NODE,
                host_selector={"role": "training"},
            ),
        ),
        (
            "a whole NIC on the virtualization host",
            placement_pb2.PlacementRequest(
                request_id="demo-initech-1", tenant="initech", claims=[_claim("nic", nic, 1)],
                host_selector={"role": "virtualization"},
            ),
        ),
        (
            "a whole crypto/compression accelerator",
            placement_pb2.PlacementRequest(
                request_id="demo-hooli-1", tenant="hooli", claims=[_claim("qat", acc, 1)],
            ),
        ),
        (
            "two SR-IOV VFs (the agent enables the PF's VFs, binds each VF's own group)",
            placement_pb2.PlacementRequest(
                request_id="demo-stark-1", tenant="stark",
                claims=[_sliced("vf", nic, 2, placement_pb2.DEVICE_FORM_VF,
                                placement_pb2.ISOLATION_SHARED)],
            ),
        ),
        (
            "a time-sliced vGPU (mdev) on the Tesla P4",
            placement_pb2.PlacementRequest(
                request_id="demo-wayne-1", tenant="wayne",
                claims=[_sliced("vgpu", gpu, 1, placement_pb2.DEVICE_FORM_MDEV,
                                placement_pb2.ISOLATION_SHARED, mdev_types=["nvidia-63"])],
            ),
        ),
        (
            # One, placed where a second 3g still fits: the A100 keeps room for
            # the MIG placements `tessera demo --serve` suggests.
            "a MIG 3g.40gb partition of the A100 (placed so that another 3g still fits)",
            placement_pb2.PlacementRequest(
                request_id="demo-tyrell-1", tenant="tyrell",
                claims=[_sliced("slice", gpu, 1, placement_pb2.DEVICE_FORM_MIG,
                                placement_pb2.ISOLATION_PARTITIONED, mig_profiles=["3g.40gb"])],
            ),
        ),
    ]  # fmt: skip


def _driver(root: Path, address: str) -> str:
    """The driver a function is bound to, or what became of it."""
    device = root / "sys" / "bus" / "pci" / "devices" / address
    if not device.exists():
        # A VF whose PF's VFs were disabled again on release: nothing left behind.
        return "removed"
    link = device / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else "no driver"


def _drivers(cluster: LocalCluster, placements: list[placement_pb2.Placement]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in placements:
        root = cluster.workdir / "hosts" / p.host_id
        for a in p.allocations:
            for endpoint in a.whole_device.group_endpoints:
                out[f"{p.host_id} {endpoint}"] = _driver(root, endpoint)
            if a.vf.vf_address:
                out[f"{p.host_id} {a.vf.vf_address} (VF)"] = _driver(root, a.vf.vf_address)
    return out


def _sliced_left(cluster: LocalCluster, placements: list[placement_pb2.Placement]) -> list[str]:
    """The placements' mdevs and VFs that still exist on their hosts."""
    left: list[str] = []
    for p in placements:
        sys_root = cluster.workdir / "hosts" / p.host_id / "sys"
        for a in p.allocations:
            if a.mdev.uuid and (sys_root / "bus" / "mdev" / "devices" / a.mdev.uuid).exists():
                left.append(f"mdev {a.mdev.uuid}")
            vf = a.vf.vf_address
            if vf and (sys_root / "bus" / "pci" / "devices" / vf).exists():
                left.append(f"VF {vf}")
    return left


#: The demo's output fits a terminal this wide.
WIDTH = 120


def _say(text: str, indent: str = "") -> None:
    """``text`` wrapped to :data:`WIDTH`, continuation lines indented under the first."""
    print(
        textwrap.fill(
            text, WIDTH, initial_indent=indent, subsequent_indent=" " * len(indent) + "   "
        )
    )


#: The password of the demo's browser bundle (a throwaway CA on this machine).
DEMO_BUNDLE_PASSWORD = "tessera-demo"


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _cli_config(cluster: LocalCluster, tls_dir: Path) -> Path:
    """A config file for ``tessera`` that reaches this cluster as ``tls_dir``'s identity."""
    path = cluster.workdir / "tessera.toml"
    path.write_text(f"scheduler = {json.dumps(cluster.scheduler_address)}\n"
                    f"tls_dir = {json.dumps(str(tls_dir))}\n")  # fmt: skip
    return path


def _serve(cluster: LocalCluster) -> int:
    """Keep the cluster running with its placements, the dashboard open, until interrupted."""
    url = cluster.dashboards["scheduler"]
    bundle = cluster.workdir / "tls" / "admin-demo.p12"
    admin = cluster.tls_dir("admin", "demo")
    browser_bundle(admin, bundle, DEMO_BUNDLE_PASSWORD.encode())
    print(
        f"\ndashboard: {url}\n"
        f"  in a browser: import {bundle} (password {DEMO_BUNDLE_PASSWORD}) as your client "
        "certificate, then open the address (the scheduler's certificate is from the demo's "
        "own CA: accept it, or trust "
        f"{cluster.ca_dir / 'ca.pem'})\n"
        f"  with curl: curl --cacert {cluster.ca_dir / 'ca.pem'} --cert {admin / 'cert.pem'} "
        f"--key {admin / 'key.pem'} {url.replace('127.0.0.1', 'scheduler.tessera')}metrics "
        f"--resolve scheduler.tessera:{url.rsplit(':', 1)[1].strip('/')}:127.0.0.1\n"
        "the placements stay; Ctrl-C stops the cluster",
        flush=True,
    )
    config = _cli_config(cluster, admin)
    print(
        f"\nthe CLI, as admin/demo (in another terminal): export TESSERA_CONFIG={config}\n"
        "  tessera hosts -o wide\n"
        "  tessera place --tenant acme --vf 2\n"
        "  tessera place --tenant acme --mdev nvidia-63\n"
        "  tessera place --tenant acme --mig 1g.10gb:2\n"
        "  tessera list; tessera release ID",
        flush=True,
    )
    # A SIGTERM (systemd, timeout, kill) stops the cluster as Ctrl-C does: its
    # processes run in sessions of their own and would outlive us otherwise.
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        while all(p.poll() is None for p in cluster.processes.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping")
        return 0
    gone = [name for name, p in cluster.processes.items() if p.poll() is not None]
    print(f"demo: {', '.join(gone)} stopped; see {cluster.workdir / 'logs'}", file=sys.stderr)
    return 1


def _still_reported(stub: scheduler_pb2_grpc.SchedulerStub, wait_s: float = 15.0) -> list[str]:
    """Hosts whose agents still report units in use, by form, once they had time to report."""
    deadline = time.monotonic() + wait_s
    while True:
        hosts = list(all_hosts(stub, timeout=30))
        used = [
            f"{h.host_id}: {form} {n}"
            for h in hosts
            for form, n in sorted(h.used_by_form.items())
            if n
        ]
        if not used or time.monotonic() > deadline:
            return used
        time.sleep(0.5)


def _run(cluster: LocalCluster, serve: bool = False, http_port: int = 0) -> int:
    print("starting embedded Valkey, scheduler and three agents on fake hosts ...")
    cluster.start_valkey()
    # Heartbeats every second: what the agents report (live VFs, mdevs and
    # MIG instances) is seen soon after each change.
    beat = ("--heartbeat-interval", "1")
    if serve:
        cluster.start_scheduler("scheduler", *beat, "--http-listen", f"127.0.0.1:{http_port}")
    else:
        cluster.start_scheduler("scheduler", *beat)
    for host_id, fixture, labels, mig in DEMO_HOSTS:
        cluster.start_agent(host_id, cluster.build_fake_host(fixture, host_id, mig), labels)
    cluster.wait_for_hosts({h for h, _, _, _ in DEMO_HOSTS})
    stub = cluster.stub()
    print(f"\nscheduler {cluster.scheduler_address}, Redis {redact_url(cluster.redis_url)}")
    _say(
        f"mutual TLS everywhere: CA in {cluster.ca_dir}; the scheduler, each agent and this "
        "client (admin/admin) prove who they are with their own certificate"
    )
    print()
    print(format_hosts(list(all_hosts(stub, timeout=30)), width=WIDTH))

    placements: list[placement_pb2.Placement] = []
    for what, request in demo_requests():
        print(f"\nplace {request.request_id}: {what}")
        placed = stub.Place(scheduler_pb2.PlaceRequest(request=request), timeout=60).placement
        placements.append(placed)
        print(f"  -> {placed.host_id}: {len(placed.allocations)} unit(s), {placed.message}")

    print("\nrefused as it should be: a live-migratable GPU (passthrough cannot migrate)")
    try:
        stub.Place(
            scheduler_pb2.PlaceRequest(
                request=placement_pb2.PlacementRequest(
                    request_id="demo-umbrella-1",
                    tenant="umbrella",
                    claims=[_claim("gpu", placement_pb2.DEVICE_KIND_GPU, 1, migratable=True)],
                )
            )
        )
        print("  !! it was placed")
        return 1
    except grpc.RpcError as err:
        # The headline: the reasons after it repeat the commonest one, with examples.
        headline = (err.details() or "").split("); ", 1)[0]
        headline += ")" if headline.count("(") > headline.count(")") else ""
        _say(f"{err.code().name}: {headline}", indent="  -> ")

    print("\nrefused as it should be: another tenant reading and releasing that placement")
    victim = placements[0]
    with cluster.channel(role="tenant", name="intruder") as channel:
        intruder = scheduler_pb2_grpc.SchedulerStub(channel)
        for rpc, call in (
            ("GetPlacement", lambda: intruder.GetPlacement(
                scheduler_pb2.GetPlacementRequest(placement_id=victim.placement_id))),
            ("Release", lambda: intruder.Release(
                scheduler_pb2.ReleaseRequest(placement_id=victim.placement_id))),
        ):  # fmt: skip
            try:
                call()
                print(f"  !! tenant/intruder's {rpc} went through")
                return 1
            except grpc.RpcError as err:
                _say(f"{rpc}: {err.code().name}: {err.details()}", indent="  -> ")

    listed = list(all_placements(stub, timeout=30))
    print("\nplacements\n" + format_placements(listed, width=WIDTH))
    if serve:
        return _serve(cluster)
    bound = _drivers(cluster, placements)
    print("\nhost drivers while placed:")
    for device, driver in sorted(bound.items()):
        print(f"  {device}: {driver}")
    ok = all(d == "vfio-pci" for d in bound.values())

    for p in placements:
        stub.Release(scheduler_pb2.ReleaseRequest(placement_id=p.placement_id), timeout=60)
    restored = _drivers(cluster, placements)
    print("\nhost drivers after release:")
    for device, driver in sorted(restored.items()):
        print(f"  {device}: {driver}")
    ok = ok and all(d != "vfio-pci" for d in restored.values())
    orphans = _sliced_left(cluster, placements)
    print(f"VFs and mdevs left on the hosts: {orphans or 'none'}")
    reported = _still_reported(stub)
    print(f"units the agents still report in use (MIG instances too): {reported or 'none'}")
    orphans += reported
    left = list(all_placements(stub, timeout=30))
    ok = ok and not left and not orphans
    print(f"\nplacements left: {len(left)}")
    audit_log = cluster.workdir / "logs" / "scheduler.audit.jsonl"
    records = audit_log.read_text().splitlines() if audit_log.exists() else []
    refused = sum('"PERMISSION_DENIED"' in r for r in records)
    print(f"audit log: {len(records)} records, {refused} refusals ({audit_log.name})")
    print("demo OK" if ok else "demo FAILED: see above")
    return 0 if ok else 1


def run_demo(workdir: Path | None = None, *, serve: bool = False, http_port: int = 0) -> int:
    """Run the demo; returns the exit code.

    Args:
        workdir: keep the cluster's files here (default: a temporary directory).
        serve: keep the cluster and its placements running with the dashboard.
        http_port: the dashboard's port on 127.0.0.1 (0: a free one).
    """
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        with LocalCluster(workdir) as cluster:
            return _run(cluster, serve, http_port)
    with (
        tempfile.TemporaryDirectory(prefix="tessera-demo-") as tmp,
        LocalCluster(Path(tmp)) as cluster,
    ):
        try:
            return _run(cluster, serve, http_port)
        except Exception as err:
            logs = Path(tmp) / "logs"
            for log in sorted(logs.glob("*.log")) if logs.exists() else []:
                print(f"--- {log.name}\n{log.read_text()[-1500:]}", file=sys.stderr)
            print(f"demo failed: {err}", file=sys.stderr)
            return 1
