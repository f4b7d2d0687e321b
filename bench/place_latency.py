"""Placement latency of the foundation: in-process picker and end to end.

Measures (1) the pure core's ``schedule()`` on snapshots of N copies of the
DGX A100 fixture (100, 1,000, 5,000 hosts), and (2) Place and Release end to
end over gRPC with Redis commits and agents binding fake hosts to vfio-pci,
sequentially and from concurrent clients. Writes JSON to bench/out/ and prints
a short report. Asserts nothing about time.

    .venv/bin/python bench/place_latency.py [--cycles 200] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from google.protobuf import json_format

if __package__ in (None, ""):
    # Run as a script: make ``bench`` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import latency_summary
from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.identity import HostId, RequestId, TenantName
from tessera.scheduler.core.request import Claim, DeviceKind, NumaPolicy, PlacementRequest
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState
from tessera.scheduler.local_cluster import LocalCluster
from tessera.scheduler.service.convert import host_view_from_inventory
from tessera.v1 import inventory_pb2, placement_pb2, scheduler_pb2

OUT = Path(__file__).parent / "out"


def dgx_inventory(workdir: Path) -> inventory_pb2.HostInventory:
    """The DGX A100 fixture's inventory, as its agent would report it."""
    root = workdir / "dgx"
    subprocess.run(
        [sys.executable, "-m", "tessera.agent", "fakehost", "build", "dgx-a100", str(root)],
        check=True, capture_output=True,
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "tessera.agent", "inventory", "--json", "--sysfs-root", str(root),
         "--host-id", "dgx"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return json_format.Parse(out, inventory_pb2.HostInventory())


def bench_core(
    inventory: inventory_pb2.HostInventory, sizes: list[int]
) -> dict[str, dict[str, float]]:
    """Latency of the pure picker on fleets of ``sizes`` copies of one host."""
    base = host_view_from_inventory(inventory)
    results: dict[str, dict[str, float]] = {}
    for n in sizes:
        hosts = {
            HostId(f"h{i:05d}"): HostState(view=replace(base, host_id=HostId(f"h{i:05d}")),
                                           alloc_generation=0)
            for i in range(n)
        }  # fmt: skip
        snap = ClusterSnapshot(hosts=hosts)
        engine = Engine()
        for label, claim, policy in (
            ("1gpu", Claim("g", DeviceKind.GPU, 1), NumaPolicy.NONE),
            ("2gpu-single-numa", Claim("g", DeviceKind.GPU, 2), NumaPolicy.SINGLE_NUMA_NODE),
        ):
            req = PlacementRequest(RequestId("r"), TenantName("t"), (claim,), numa_policy=policy)
            samples = []
            for _ in range(20 if n >= 5000 else 50):
                t0 = time.perf_counter()
                engine.schedule(snap, req)
                samples.append(time.perf_counter() - t0)
            results[f"{n}-hosts/{label}"] = latency_summary(samples)
    return results


def _request(rid: str) -> placement_pb2.PlacementRequest:
    return placement_pb2.PlacementRequest(
        request_id=rid, tenant="bench",
        claims=[placement_pb2.Claim(name="gpu", kind=placement_pb2.DEVICE_KIND_GPU, count=1)],
    )  # fmt: skip


def bench_e2e(workdir: Path, hosts: int, cycles: int, clients: int) -> dict[str, Any]:
    """Place and Release over gRPC against a local cluster of fake DGX hosts."""
    with LocalCluster(workdir / "cluster") as cluster:
        cluster.start_valkey()
        cluster.start_scheduler()
        for i in range(hosts):
            hid = f"dgx-{i}"
            cluster.start_agent(hid, cluster.build_fake_host("dgx-a100", hid))
        cluster.wait_for_hosts({f"dgx-{i}" for i in range(hosts)})
        stub = cluster.stub()
        place: list[float] = []
        release: list[float] = []
        lock = threading.Lock()

        def worker(w: int, n: int) -> None:
            for k in range(n):
                t0 = time.perf_counter()
                p = stub.Place(scheduler_pb2.PlaceRequest(request=_request(f"b{w}-{k}")),
                               timeout=60).placement  # fmt: skip
                t1 = time.perf_counter()
                stub.Release(scheduler_pb2.ReleaseRequest(placement_id=p.placement_id), timeout=60)
                t2 = time.perf_counter()
                with lock:
                    place.append(t1 - t0)
                    release.append(t2 - t1)

        worker(-1, 5)  # warm channels and caches
        place.clear()
        release.clear()
        t0 = time.perf_counter()
        worker(0, cycles)
        seq_wall = time.perf_counter() - t0
        sequential = {"place": latency_summary(place), "release": latency_summary(release),
                      "cycles_per_s": round(cycles / seq_wall, 1)}  # fmt: skip
        place.clear()
        release.clear()
        per = max(1, cycles // clients)
        threads = [threading.Thread(target=worker, args=(w + 1, per)) for w in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        concurrent = {
            "clients": clients,
            "place": latency_summary(place),
            "release": latency_summary(release),
            "cycles_per_s": round(clients * per / wall, 1),
        }
        return {"hosts": hosts, "sequential": sequential, "concurrent": concurrent}


def main() -> int:
    """Run both benchmarks, write JSON, print the report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--sizes", default="100,1000,5000")
    opts = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        work = Path(tmp)
        core = bench_core(dgx_inventory(work), [int(s) for s in opts.sizes.split(",")])
        e2e = bench_e2e(work, opts.hosts, opts.cycles, opts.clients)
    result = {
        "machine": {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count(),
                    "platform": platform.platform()},
        "core_schedule": core,
        "end_to_end": e2e,
    }  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / "place_latency.json").write_text(json.dumps(result, indent=2))
    print("core schedule() on N DGX-A100 hosts:")
    for key, s in core.items():
        print(f"  {key:28} p50 {s['p50_ms']:8.3f} ms  p99 {s['p99_ms']:8.3f} ms")
    for mode in ("sequential", "concurrent"):
        m = e2e[mode]
        print(
            f"end to end ({mode}, {e2e['hosts']} hosts): Place p50 {m['place']['p50_ms']} ms "
            f"p99 {m['place']['p99_ms']} ms; Release p50 {m['release']['p50_ms']} ms; "
            f"{m['cycles_per_s']} place+release cycles/s"
        )
    print(f"written {OUT / 'place_latency.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
