"""Concurrency under contention: 2,000 placements through two scheduler replicas.

Runs the driver of ``tests/e2e/test_concurrency_e2e.py`` at full size: one
embedded Valkey, two schedulers, eight fake hosts (four GPU workstations, two
vGPU hosts, an SR-IOV NIC host, a virtualization host with its A100 in MIG
mode), sixteen client threads alternating between the replicas, whole GPUs,
VFs, mdevs and MIG partitions, more whole-GPU demand than supply. The
independent auditor runs all along (store) and every 200 operations with the
clients paused (store and hosts), and at the end with everything released.
Writes bench/out/concurrency.json and prints a short report; exits 1 if the
auditor or a client found anything.

    .venv/bin/python bench/concurrency.py [--placements 2000] [--clients 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e import test_concurrency_e2e as driver

OUT = Path(__file__).parent / "out"


def main() -> int:
    """Run the load, write JSON, print the report."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--placements", type=int, default=2000)
    p.add_argument("--clients", type=int, default=driver.CLIENTS)
    p.add_argument("--audit-every", type=int, default=driver.AUDIT_EVERY)
    p.add_argument("--out", type=Path, default=OUT / "concurrency.json")
    opts = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tessera-concurrency-") as tmp:
        cluster, addresses = driver.start_cluster(Path(tmp))
        with cluster:
            load = driver.Load(
                cluster.redis_url,
                [cluster.channel(a) for a in addresses],
                driver.host_roots(cluster),
                opts.placements,
                clients=opts.clients,
                audit_every=opts.audit_every,
            )
            result = load.run()
    figures = result.to_json()
    figures["clients"] = opts.clients
    figures["machine"] = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(figures, indent=2))
    print(driver.report(result))
    print(f"written {opts.out}")
    try:
        driver.assert_clean(result)
    except AssertionError as err:
        print(f"NOT CLEAN: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
