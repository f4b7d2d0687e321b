"""The client library against a real scheduler: mutual TLS, every form, pages, errors, waiting.

A :class:`LocalCluster` (embedded Valkey, scheduler, an agent per fake host,
all processes, mutual TLS) with two hosts, each picked by its ``name`` label::

    ws    gpu-workstation: GPUs passed through whole (each with its HDMI audio)
    virt  virt-2s: ConnectX-6 Dx PFs (VFs), an A100 in MIG mode, a Tesla P4

The client reaches it as a frontend would: ``tessera.client`` only, its own
TLS directory, the scheduler's name checked in its certificate.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tessera.client import (
    SCHEDULER_SERVER_NAME,
    Client,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
    UnavailableError,
    all_placements,
)
from tessera.client.channel import CA_FILE, CERT_FILE, KEY_FILE
from tessera.scheduler.local_cluster import LocalCluster
from tessera.security.certs import CA_CERT, CERT, KEY
from tessera.security.identity import SCHEDULER_DNS_NAME
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

A100 = "0000:4b:00.0"
HOSTS = {"ws": "gpu-workstation", "virt": "virt-2s"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("client")) as c:
        c.start_valkey()
        c.start_scheduler()
        for host_id, fixture in HOSTS.items():
            mig = (A100,) if fixture == "virt-2s" else ()
            c.start_agent(host_id, c.build_fake_host(fixture, host_id, mig), {"name": host_id})
        c.wait_for_hosts(set(HOSTS))
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster.scheduler_address, tls_dir=cluster.tls_dir("admin", "admin")) as c:
        yield c


def request(
    request_id: str, host: str, claim: placement_pb2.Claim, tenant: str = "acme"
) -> placement_pb2.PlacementRequest:
    return placement_pb2.PlacementRequest(
        request_id=request_id, tenant=tenant, claims=[claim], host_selector={"name": host}
    )


WHOLE_GPU = placement_pb2.Claim(
    name="gpu", kind=placement_pb2.DEVICE_KIND_GPU, count=1,
    forms=[placement_pb2.DEVICE_FORM_WHOLE_DEVICE],
)  # fmt: skip
A_VF = placement_pb2.Claim(
    name="vf", kind=placement_pb2.DEVICE_KIND_NIC, count=1,
    forms=[placement_pb2.DEVICE_FORM_VF], min_isolation=placement_pb2.ISOLATION_SHARED,
)  # fmt: skip
A_MIG_SLICE = placement_pb2.Claim(
    name="slice", kind=placement_pb2.DEVICE_KIND_GPU, count=1,
    forms=[placement_pb2.DEVICE_FORM_MIG], mig_profiles=["1g.10gb"],
    min_isolation=placement_pb2.ISOLATION_PARTITIONED,
)  # fmt: skip


def test_the_client_names_the_files_and_server_the_scheduler_issues() -> None:
    # The client may not import tessera.security (cryptography): its copies must agree.
    assert SCHEDULER_SERVER_NAME == SCHEDULER_DNS_NAME
    assert (CA_FILE, CERT_FILE, KEY_FILE) == (CA_CERT, CERT, KEY)


def test_places_a_whole_gpu_a_vf_and_a_mig_slice_then_gets_and_releases_each(
    client: Client,
) -> None:
    placed = [
        client.place(request("c-whole", "ws", WHOLE_GPU)),
        client.place(request("c-vf", "virt", A_VF)),
        client.place(request("c-mig", "virt", A_MIG_SLICE)),
    ]
    assert [p.state for p in placed] == [placement_pb2.PLACEMENT_STATE_READY] * 3
    assert placed[0].allocations[0].whole_device.address
    assert placed[1].allocations[0].vf.vf_address
    assert placed[2].allocations[0].mig.gpu_address == A100
    # Idempotent on the request id: the same placement back, not a second one.
    assert client.place(request("c-vf", "virt", A_VF)).placement_id == placed[1].placement_id
    for p in placed:
        assert client.get(p.placement_id) == p
        assert client.get(request_id=p.request_id, tenant="acme").placement_id == p.placement_id
    for p in placed:
        client.release(p.placement_id)
        with pytest.raises(NotFoundError):
            client.get(p.placement_id)


def test_lists_page_through_every_placement_and_host(client: Client, cluster: LocalCluster) -> None:
    placed = [client.place(request(f"c-page-{i}", "virt", A_VF)) for i in range(7)]
    try:
        whole = sorted(p.placement_id for p in placed)
        assert [p.placement_id for p in client.list_placements(host_id="virt")] == whole
        assert [p.placement_id for p in client.list_placements(page_size=2)] == whole
        # Over the wire: full pages of 2, each with a token; the last without.
        stub = scheduler_pb2_grpc.SchedulerStub(cluster.channel())
        first = stub.ListPlacements(scheduler_pb2.ListPlacementsRequest(page_size=2), timeout=10)
        assert len(first.placements) == 2 and first.next_page_token
        pages = [first]
        while pages[-1].next_page_token:
            pages.append(
                stub.ListPlacements(
                    scheduler_pb2.ListPlacementsRequest(
                        page_size=2, page_token=pages[-1].next_page_token
                    ),
                    timeout=10,
                )
            )
        assert [len(page.placements) for page in pages] == [2, 2, 2, 1]
        assert [p.placement_id for p in all_placements(stub, timeout=10)] == whole

        assert [h.host_id for h in client.list_hosts(page_size=1)] == sorted(HOSTS)
    finally:
        for p in placed:
            client.release(p.placement_id)


def test_a_tenant_lists_only_its_own_placements(client: Client, cluster: LocalCluster) -> None:
    ours = client.place(request("c-own", "virt", A_VF, tenant="acme"))
    theirs = client.place(request("c-other", "virt", A_VF, tenant="globex"))
    try:
        with Client(cluster.scheduler_address, tls_dir=cluster.tls_dir("tenant", "acme")) as acme:
            assert [p.placement_id for p in acme.list_placements(page_size=1)] == [
                ours.placement_id
            ]
    finally:
        client.release(ours.placement_id)
        client.release(theirs.placement_id)


def test_an_invalid_request_carries_bad_request_field_violations(
    client: Client, cluster: LocalCluster
) -> None:
    bad = placement_pb2.Claim(name="gpu", kind=placement_pb2.DEVICE_KIND_GPU, count=0)
    with pytest.raises(InvalidArgumentError) as err:
        client.place(request("c-bad", "ws", bad))
    assert "claims[0].count" in [v.field for v in err.value.field_violations]
    assert err.value.message.startswith("claims[0].count: ")

    # The same over the wire, as any grpcio-status reader sees it.
    stub = scheduler_pb2_grpc.SchedulerStub(cluster.channel())
    with pytest.raises(grpc.RpcError) as raw:
        stub.ListPlacements(scheduler_pb2.ListPlacementsRequest(page_token="garbage"), timeout=10)
    call = raw.value
    assert isinstance(call, grpc.Call) and call.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(call)
    assert status is not None and status.message == call.details()
    [detail] = status.details
    violations = error_details_pb2.BadRequest()
    assert detail.Unpack(violations)
    assert [(v.field, v.description) for v in violations.field_violations] == [
        ("page_token", "is not a token this scheduler issued; pass next_page_token as it came")
    ]

    # A required field missing, and a token of the other list.
    with pytest.raises(InvalidArgumentError) as err:
        client.release("")
    assert [str(v) for v in err.value.field_violations] == ["placement_id: is required"]
    hosts = stub.ListHosts(scheduler_pb2.ListHostsRequest(page_size=1), timeout=10)
    with pytest.raises(grpc.RpcError) as raw:
        stub.ListPlacements(
            scheduler_pb2.ListPlacementsRequest(page_token=hosts.next_page_token), timeout=10
        )
    assert raw.value.details() == "page_token: was issued for hosts, not placements"


def _reserved_port() -> socket.socket:
    """A loopback port bound but not listening: connections to it are refused.

    SO_REUSEPORT lets the scheduler (gRPC sets it too) bind the same port
    while this socket holds it, so no other program can take it between.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_a_scheduler_that_cannot_be_reached_is_unavailable_after_the_retries(
    cluster: LocalCluster,
) -> None:
    with _reserved_port() as held:
        port = held.getsockname()[1]
        fast = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05)
        tls = cluster.tls_dir("admin", "admin")
        client = Client(f"127.0.0.1:{port}", tls_dir=tls, retry=fast)
        with client, pytest.raises(UnavailableError) as err:
            client.get("pl-x@ws")
        assert err.value.code is grpc.StatusCode.UNAVAILABLE


def test_a_client_made_before_its_scheduler_waits_for_it(cluster: LocalCluster) -> None:
    with _reserved_port() as held:
        port = held.getsockname()[1]
        tls = cluster.tls_dir("admin", "admin")
        client = Client(f"127.0.0.1:{port}", tls_dir=tls, wait_for_ready=True, timeout=60)
        with client, ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.place, request("c-early", "virt", A_VF))
            # Nothing listens: a call that did not wait would have failed by now.
            with pytest.raises(TimeoutError):
                waiting.result(timeout=1.0)
            # A second replica on the same store, on the port the client dials.
            cluster.start_scheduler("late", "--listen", f"127.0.0.1:{port}")
            try:
                placed = waiting.result(timeout=60)
                assert placed.state == placement_pb2.PLACEMENT_STATE_READY
                client.release(placed.placement_id)
            finally:
                cluster.kill("late", signal.SIGTERM)


def test_thousands_of_problems_still_answer_invalid_argument_with_their_details(
    client: Client,
) -> None:
    # Every request of a large batch wrong twice: the message counts what it
    # leaves out, the BadRequest keeps what fits, and the trailers stay under
    # the client's metadata limit (else gRPC answers RESOURCE_EXHAUSTED).
    bad = placement_pb2.Claim(name="x" * 128, kind=placement_pb2.DEVICE_KIND_GPU, count=0)
    batch = [
        placement_pb2.PlacementRequest(request_id=f"r{i}", tenant="acme", claims=[bad, bad])
        for i in range(2000)
    ]
    with pytest.raises(InvalidArgumentError) as err:
        client.place_batch(batch)
    assert "more problems" in err.value.message
    violations = err.value.field_violations
    assert 10 <= len(violations) < 200
    assert violations[0].field.startswith("requests[0].")
