"""A scheduler run with ``--policy tessera-packing`` places and explains as the default one does.

Packing changes which host and device win, never what is legal: the same
fake virtualization host, a MIG instance and a whole GPU placed over gRPC,
and Explain shows the packing scorer's charges.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tessera.scheduler.local_cluster import LocalCluster
from tessera.v1 import placement_pb2, scheduler_pb2

HOST = "virt"
A100 = "0000:4b:00.0"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("packing")) as c:
        c.start_valkey()
        c.start_scheduler("scheduler", "--policy", "tessera-packing")
        c.start_agent(HOST, c.build_fake_host("virt-2s", HOST, mig=(A100,)))
        c.wait_for_hosts({HOST})
        yield c


def request(request_id: str, claim: placement_pb2.Claim) -> placement_pb2.PlacementRequest:
    return placement_pb2.PlacementRequest(request_id=request_id, tenant="acme", claims=[claim])


def test_packing_places_a_mig_slice_and_says_what_it_charged(cluster: LocalCluster) -> None:
    stub = cluster.stub()
    claim = placement_pb2.Claim(
        name="slice", kind=placement_pb2.DEVICE_KIND_GPU, count=1,
        forms=[placement_pb2.DEVICE_FORM_MIG], mig_profiles=["3g.40gb"],
        min_isolation=placement_pb2.ISOLATION_PARTITIONED,
    )  # fmt: skip

    def packing_line(rid: str) -> str:
        explained = stub.Explain(scheduler_pb2.ExplainRequest(request=request(rid, claim)))
        assert explained.placeable
        (packing,) = [v for v in explained.verdicts if v.plugin == "packing"]
        return packing.reasons[0]

    # An Explain is no demand: until a request is placed, there is no mix.
    assert packing_line("e-1") == "packing +0: no GPU task mix learnt yet"
    placed = stub.Place(scheduler_pb2.PlaceRequest(request=request("p-1", claim)), timeout=60)
    (a,) = placed.placement.allocations
    assert a.mig.gpu_address == A100 and a.mig.mig_uuid.startswith("MIG-")
    line = packing_line("e-2")
    assert "stranded" in line and "unfillable hole" in line and "GPUs consumed" in line
    whole = placement_pb2.Claim(name="gpu", kind=placement_pb2.DEVICE_KIND_GPU, count=1)
    other = stub.Place(scheduler_pb2.PlaceRequest(request=request("p-2", whole)), timeout=60)
    (b,) = other.placement.allocations
    assert b.whole_device.address not in ("", A100)  # the partitioned GPU is never whole
    for p in (placed.placement, other.placement):
        stub.Release(scheduler_pb2.ReleaseRequest(placement_id=p.placement_id), timeout=60)
