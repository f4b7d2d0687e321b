"""Place and release through the installed client distribution alone (run by check_dists.py).

Runs in a virtualenv holding only the ``tessera-scheduler-client`` wheel and
what it depends on: it imports nothing of this repository but ``tessera.v1``
and ``tessera.client`` as installed, and fails if the scheduler's own
dependencies (ortools, redis) or packages (tessera.scheduler) are there.

Usage:
    python client_smoke.py ADDRESS TLS_DIR HOST_LABEL
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tessera.client import Client, InvalidArgumentError, NotFoundError
from tessera.v1 import placement_pb2


def _absent(*modules: str) -> list[str]:
    """Those of ``modules`` that can be imported here (none should)."""
    present = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is not None:
                present.append(name)
        except ModuleNotFoundError:  # a parent package is missing: so is the module
            continue
    return present


def main() -> int:
    """Check the installation, then place, list, release and be refused."""
    address, tls_dir, host = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    if leaked := _absent("ortools", "redis", "networkx", "cryptography", "tessera.scheduler"):
        print(f"client_smoke: the client distribution pulled in {leaked}", file=sys.stderr)
        return 1
    proto = Path(placement_pb2.__file__).with_name("scheduler.proto")
    if not proto.is_file():
        print(f"client_smoke: {proto} was not installed", file=sys.stderr)
        return 1
    request = placement_pb2.PlacementRequest(
        request_id="dist-smoke-1",
        tenant="acme",
        claims=[
            placement_pb2.Claim(
                name="vf",
                kind=placement_pb2.DEVICE_KIND_NIC,
                count=1,
                forms=[placement_pb2.DEVICE_FORM_VF],
                min_isolation=placement_pb2.ISOLATION_SHARED,
            )
        ],
        host_selector={"name": host},
    )
    with Client(address, tls_dir=tls_dir) as client:
        placed = client.place(request)
        assert placed.state == placement_pb2.PLACEMENT_STATE_READY, placed
        listed = [p.placement_id for p in client.list_placements(page_size=1)]
        assert listed == [placed.placement_id], listed
        client.release(placed.placement_id)
        try:
            client.get(placed.placement_id)
            raise AssertionError("a released placement is still there")
        except NotFoundError:
            pass
        try:
            client.release("")
            raise AssertionError("a release of nothing went through")
        except InvalidArgumentError as err:
            assert [v.field for v in err.field_violations] == ["placement_id"], err
    print(f"client_smoke: placed and released {placed.placement_id} on {placed.host_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
