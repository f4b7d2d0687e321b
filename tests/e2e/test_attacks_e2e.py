"""Attacks from the network, with real processes and real mutual TLS.

Each test is one thing an attacker on the same network tries with nothing but
the public protos and whatever certificate it could get: none, one from
another CA, an expired one, one without a Tessera identity, or a genuine one of
the wrong role or for the wrong resource. Every attempt must be refused, and
an independent look at the store (``auditor.read_store``: raw Redis reads) and
at both fake hosts (``auditor.read_host``: driver links, mdevs, MIG state,
VFs) and the agents' checkpoints afterwards must find nothing changed.

A refusal comes in one of two forms. A caller whose certificate does not
verify (none, another CA's, expired) never gets a TLS connection: gRPC reports
UNAVAILABLE to it and no request reaches a handler. A caller whose certificate
verifies but names no identity is UNAUTHENTICATED; one whose identity may not
make the call, PERMISSION_DENIED.

The cluster::

    scheduler (TLS) ── agent alpha (gpu-workstation: 2 GPUs, each with its HDMI audio)
                    └─ agent beta  (gpu-workstation)
    victim: tenant acme holds one GPU on alpha (request "victim-1")
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.message import Message

from tessera.scheduler.local_cluster import LocalCluster
from tessera.scheduler.store import schema
from tessera.security.certs import CA_CERT, CA_KEY, CERT, KEY, create_ca, issue, write_private
from tessera.security.identity import SCHEDULER_DNS_NAME, agent_dns_name
from tessera.security.tls import channel_options
from tessera.v1 import agent_pb2, inventory_pb2, placement_pb2, scheduler_pb2

from .auditor import HostFacts, StoreView, read_host, read_store

HOSTS = ("alpha", "beta")
OPERATOR_CONFIG = "frontends:\n  portal: ['team-*']\n"


@dataclass
class Attacked:
    """The running cluster and what the attacks need of it."""

    cluster: LocalCluster
    agents: dict[str, str]  # host id -> agent address
    victim: placement_pb2.Placement

    def root(self, host: str) -> Path:
        return self.cluster.workdir / "hosts" / host


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attacked]:
    workdir = tmp_path_factory.mktemp("attacks")
    config = workdir / "operator.yaml"
    config.write_text(OPERATOR_CONFIG)
    with LocalCluster(workdir) as c:
        c.start_valkey()
        c.start_scheduler("scheduler", "--operator-config", str(config))
        agents = {
            h: c.start_agent(h, c.build_fake_host("gpu-workstation", h), {"name": h}) for h in HOSTS
        }
        c.wait_for_hosts(set(HOSTS))
        with c.channel(role="tenant", name="acme") as channel:
            victim = call(
                channel,
                "/tessera.v1.Scheduler/Place",
                scheduler_pb2.PlaceRequest(request=gpu_request("victim-1", "", "alpha")),
                scheduler_pb2.PlaceResponse,
            )
        assert isinstance(victim, scheduler_pb2.PlaceResponse), victim
        yield Attacked(c, agents, victim.placement)


# -- calling -------------------------------------------------------------------


def call(
    channel: grpc.Channel, method: str, request: Message, response: type[Message]
) -> Message | grpc.StatusCode:
    """One unary call: the response, or the status code it failed with."""
    stub: grpc.UnaryUnaryMultiCallable[Message, Message] = channel.unary_unary(
        method,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )
    try:
        result: Message = stub(request, timeout=15)
    except grpc.RpcError as err:
        return err.code()
    return result


def code_of(result: Message | grpc.StatusCode) -> grpc.StatusCode:
    return result if isinstance(result, grpc.StatusCode) else grpc.StatusCode.OK


def channel_with(
    address: str, server_name: str, ca: bytes | None, key: bytes | None, cert: bytes | None
) -> grpc.Channel:
    """A TLS channel with exactly the material given (None: no TLS at all)."""
    if ca is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(ca, key, cert)
    return grpc.secure_channel(address, credentials, options=channel_options(server_name))


def tls_files(directory: Path) -> tuple[bytes, bytes, bytes]:
    return (
        (directory / CA_CERT).read_bytes(),
        (directory / KEY).read_bytes(),
        (directory / CERT).read_bytes(),
    )


def gpu_request(request_id: str, tenant: str, host: str = "") -> placement_pb2.PlacementRequest:
    claim = placement_pb2.Claim(
        name="gpu",
        kind=placement_pb2.DEVICE_KIND_GPU,
        count=1,
        forms=[placement_pb2.DEVICE_FORM_WHOLE_DEVICE],
    )
    request = placement_pb2.PlacementRequest(request_id=request_id, tenant=tenant, claims=[claim])
    if host:
        request.host_selector["name"] = host
    return request


# -- every RPC, with a request aimed at the victim -------------------------------


@dataclass(frozen=True)
class Rpc:
    """One RPC: where it is served and a request an attacker would send."""

    method: str
    on_agent: bool
    request: Callable[[Attacked], Message]
    response: type[Message]

    @property
    def name(self) -> str:
        return self.method.rsplit("/", 1)[-1]

    def target(self, a: Attacked) -> tuple[str, str]:
        """The address and the server name to verify."""
        if self.on_agent:
            return a.agents["alpha"], agent_dns_name("alpha")
        return a.cluster.scheduler_address, SCHEDULER_DNS_NAME


def _inventory(host: str, boot: str = "forged-boot") -> inventory_pb2.HostInventory:
    return inventory_pb2.HostInventory(host_id=host, boot_id=boot, generation=1)


S = "/tessera.v1.Scheduler/"
RPCS = [
    Rpc(S + "Place", False, lambda a: scheduler_pb2.PlaceRequest(
        request=gpu_request("attack-place", "acme")), scheduler_pb2.PlaceResponse),
    Rpc(S + "PlaceBatch", False, lambda a: scheduler_pb2.PlaceBatchRequest(
        requests=[gpu_request("attack-batch", "acme")]), scheduler_pb2.PlaceBatchResponse),
    Rpc(S + "Release", False, lambda a: scheduler_pb2.ReleaseRequest(
        placement_id=a.victim.placement_id), scheduler_pb2.ReleaseResponse),
    Rpc(S + "GetPlacement", False, lambda a: scheduler_pb2.GetPlacementRequest(
        placement_id=a.victim.placement_id), placement_pb2.Placement),
    Rpc(S + "ListPlacements", False, lambda a: scheduler_pb2.ListPlacementsRequest(
        tenant="acme"), scheduler_pb2.ListPlacementsResponse),
    Rpc(S + "Explain", False, lambda a: scheduler_pb2.ExplainRequest(
        request=gpu_request("attack-explain", "acme")), scheduler_pb2.ExplainResponse),
    Rpc(S + "ListHosts", False, lambda a: scheduler_pb2.ListHostsRequest(),
        scheduler_pb2.ListHostsResponse),
    Rpc(S + "CordonHost", False, lambda a: scheduler_pb2.CordonHostRequest(host_id="alpha"),
        scheduler_pb2.HostSummary),
    Rpc(S + "UncordonHost", False, lambda a: scheduler_pb2.UncordonHostRequest(host_id="alpha"),
        scheduler_pb2.HostSummary),
    Rpc(S + "DrainHost", False, lambda a: scheduler_pb2.DrainHostRequest(host_id="alpha"),
        scheduler_pb2.DrainHostResponse),
    Rpc(S + "ForgetHost", False, lambda a: scheduler_pb2.ForgetHostRequest(
        host_id="alpha", force=True), scheduler_pb2.ForgetHostResponse),
    Rpc("/tessera.v1.Registry/Register", False, lambda a: scheduler_pb2.RegisterRequest(
        inventory=_inventory("alpha"), agent_address="127.0.0.1:1"),
        scheduler_pb2.RegisterResponse),
    Rpc("/tessera.v1.Registry/Heartbeat", False, lambda a: scheduler_pb2.HeartbeatRequest(
        host_id="alpha", boot_id="forged-boot"), scheduler_pb2.HeartbeatResponse),
    Rpc("/tessera.v1.Agent/Prepare", True, lambda a: agent_pb2.PrepareRequest(
        placement=a.victim), agent_pb2.PrepareResponse),
    Rpc("/tessera.v1.Agent/Unprepare", True, lambda a: agent_pb2.UnprepareRequest(
        placement=a.victim, fencing_token=2**64 - 1), agent_pb2.UnprepareResponse),
    Rpc("/tessera.v1.Agent/GetState", True, lambda a: agent_pb2.GetStateRequest(),
        agent_pb2.GetStateResponse),
]  # fmt: skip
BY_NAME = {rpc.name: rpc for rpc in RPCS}

#: Who may call what: every (role, RPC) pair *not* listed is refused.
ALLOWED: dict[str, set[str]] = {
    "tenant": {"Place", "PlaceBatch", "Release", "GetPlacement", "ListPlacements", "Explain"},
    "frontend": {"Place", "PlaceBatch", "Release", "GetPlacement", "ListPlacements", "Explain",
                 "ListHosts"},
    "admin": {name for name in BY_NAME if name.startswith(tuple(
        ["Place", "Release", "Get", "List", "Explain", "Cordon", "Uncordon", "Drain", "Forget"]))},
    "agent": {"Register", "Heartbeat"},
    "scheduler": {"Prepare", "Unprepare", "GetState"},
    "store": set(),
}  # fmt: skip
WRONG_ROLE = [
    (role, rpc) for role, allowed in ALLOWED.items() for rpc in RPCS if rpc.name not in allowed
]


# -- the independent check -------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """Everything an attack could have changed, read without scheduler code."""

    store: StoreView
    registrations: dict[str, tuple[str, str]]  # host -> (boot id, agent address)
    hosts: dict[str, HostFacts]
    fences: dict[str, int]


def observe(a: Attacked) -> Observed:
    with redis.Redis.from_url(a.cluster.redis_url) as client:
        store = read_store(client)
        registrations = {}
        for host in HOSTS:
            boot, address = client.hmget(schema.host(host), ["boot_id", "agent_address"])
            registrations[host] = (_text(boot), _text(address))
    fences = {}
    for host in HOSTS:
        checkpoint = a.cluster.workdir / "agent-state" / f"{host}.checkpoint.json"
        # No checkpoint yet: the agent has persisted nothing, no fence either.
        state = json.loads(checkpoint.read_text()) if checkpoint.exists() else {}
        fences[host] = int(state.get("fence", 0))
    return Observed(store, registrations, {h: read_host(a.root(h)) for h in HOSTS}, fences)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture
def unchanged(attacked: Attacked) -> Iterator[None]:
    """After the test: the store, both hosts and both checkpoints are as before it."""
    before = observe(attacked)
    yield
    after = observe(attacked)
    assert after.store == before.store, "the store changed"
    assert after.registrations == before.registrations, "a registration changed"
    assert after.hosts == before.hosts, "a host changed"
    assert after.fences == before.fences, "an agent remembered a fencing token"


def attempt(a: Attacked, rpc: Rpc, role: str, name: str) -> grpc.StatusCode:
    address, server = rpc.target(a)
    directory = a.cluster.tls_dir(role, name)
    with channel_with(address, server, *tls_files(directory)) as channel:
        return code_of(call(channel, rpc.method, rpc.request(a), rpc.response))


def attempt_with(a: Attacked, rpc: Rpc, material: tuple[bytes | None, ...]) -> grpc.StatusCode:
    address, server = rpc.target(a)
    ca, key, cert = material
    with channel_with(address, server, ca, key, cert) as channel:
        return code_of(call(channel, rpc.method, rpc.request(a), rpc.response))


# -- no usable certificate ----------------------------------------------------------


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name)
def test_a_plaintext_call_is_refused_at_the_handshake(attacked: Attacked, rpc: Rpc) -> None:
    assert attempt_with(attacked, rpc, (None, None, None)) is grpc.StatusCode.UNAVAILABLE


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name)
def test_a_call_without_a_client_certificate_is_refused_at_the_handshake(
    attacked: Attacked, rpc: Rpc
) -> None:
    ca = (attacked.cluster.ca_dir / CA_CERT).read_bytes()
    assert attempt_with(attacked, rpc, (ca, None, None)) is grpc.StatusCode.UNAVAILABLE


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name)
def test_an_admin_certificate_from_another_ca_is_refused(
    attacked: Attacked, rpc: Rpc, tmp_path: Path
) -> None:
    create_ca(tmp_path / "rogue-ca")
    issue(tmp_path / "rogue-ca", "admin", "admin", tmp_path / "rogue")
    # Trusting the real CA for the server, presenting the rogue CA's admin.
    _, key, cert = tls_files(tmp_path / "rogue")
    ca = (attacked.cluster.ca_dir / CA_CERT).read_bytes()
    assert attempt_with(attacked, rpc, (ca, key, cert)) is grpc.StatusCode.UNAVAILABLE


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name)
def test_an_expired_admin_certificate_is_refused(
    attacked: Attacked, rpc: Rpc, tmp_path: Path
) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    issue(attacked.cluster.ca_dir, "admin", "admin", tmp_path, days=1, not_before=start)
    assert attempt_with(attacked, rpc, tls_files(tmp_path)) is grpc.StatusCode.UNAVAILABLE


def _cert_without_identity(
    ca_dir: Path, out: Path, sans: list[x509.GeneralName]
) -> tuple[bytes, ...]:
    """A certificate the cluster's CA really signed, naming no Tessera identity."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin/admin")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(out, key_pem)
    return (
        (ca_dir / CA_CERT).read_bytes(),
        key_pem,
        cert.public_bytes(serialization.Encoding.PEM),
    )


URI = x509.UniformResourceIdentifier
ADMIN_TEXT = "spiffe://tessera/admin/evil"
NO_IDENTITY = {
    "no-san": [],
    "other-trust-domain": [URI("spiffe://other-domain/admin/admin")],
    "unknown-role": [URI("spiffe://tessera/root/admin")],
    "not-spiffe": [URI("urn:admin")],
    "two-identities": [URI("spiffe://tessera/tenant/a"), URI("spiffe://tessera/admin/b")],
    # What an operator's CA may sign for anyone asking for a host name: text
    # that reads as an identity, in a SAN that is not a URI.
    "identity-text-in-a-dns-san": [x509.DNSName(ADMIN_TEXT)],
    "identity-text-in-an-email-san": [x509.RFC822Name(ADMIN_TEXT)],
    "https-uri-and-identity-text-in-a-dns-san": [
        URI("https://web.example"),
        x509.DNSName(ADMIN_TEXT),
    ],
}


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("sans", list(NO_IDENTITY.values()), ids=list(NO_IDENTITY))
@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name)
def test_a_ca_signed_certificate_without_a_tessera_identity_is_unauthenticated(
    attacked: Attacked, rpc: Rpc, sans: list[x509.GeneralName], tmp_path: Path
) -> None:
    material = _cert_without_identity(attacked.cluster.ca_dir, tmp_path / "key.pem", sans)
    assert attempt_with(attacked, rpc, material) is grpc.StatusCode.UNAUTHENTICATED


# -- a genuine certificate of the wrong role ---------------------------------------------


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("role", "rpc"), WRONG_ROLE, ids=[f"{role}-{rpc.name}" for role, rpc in WRONG_ROLE]
)
def test_a_wrong_role_is_refused_on_every_rpc(attacked: Attacked, role: str, rpc: Rpc) -> None:
    # The agent identity is beta's: a genuine agent, aiming at alpha's resources.
    name = {"agent": "beta", "tenant": "globex", "frontend": "portal"}.get(role, "intruder")
    assert attempt(attacked, rpc, role, name) is grpc.StatusCode.PERMISSION_DENIED


# -- a genuine certificate, someone else's resources ---------------------------------------


@pytest.mark.usefixtures("unchanged")
def test_an_agent_cannot_register_or_heartbeat_another_host(attacked: Attacked) -> None:
    alpha_boot = observe(attacked).registrations["alpha"][0]
    as_beta = attacked.cluster.tls_dir("agent", "beta")
    forged = [
        # A new boot id for alpha: would turn alpha's placements FAILED.
        (BY_NAME["Register"], scheduler_pb2.RegisterRequest(
            inventory=_inventory("alpha"), agent_address=attacked.agents["beta"])),
        (BY_NAME["Heartbeat"], scheduler_pb2.HeartbeatRequest(host_id="alpha", boot_id=alpha_boot)),
        # Its own host id outside, alpha's inventory inside.
        (BY_NAME["Heartbeat"], scheduler_pb2.HeartbeatRequest(
            host_id="beta", boot_id="b", inventory=_inventory("alpha", alpha_boot))),
    ]  # fmt: skip
    for rpc, request in forged:
        address, server = rpc.target(attacked)
        with channel_with(address, server, *tls_files(as_beta)) as channel:
            got = code_of(call(channel, rpc.method, request, rpc.response))
        assert got is grpc.StatusCode.PERMISSION_DENIED, rpc.name


@pytest.mark.usefixtures("unchanged")
def test_a_tenant_cannot_read_list_or_release_another_tenants_placement(
    attacked: Attacked,
) -> None:
    victim = attacked.victim
    with attacked.cluster.channel(role="tenant", name="globex") as channel:
        for rpc, request in [
            (BY_NAME["GetPlacement"], scheduler_pb2.GetPlacementRequest(
                placement_id=victim.placement_id)),
            (BY_NAME["GetPlacement"], scheduler_pb2.GetPlacementRequest(
                request_id="victim-1", tenant="acme")),
            (BY_NAME["Release"], scheduler_pb2.ReleaseRequest(placement_id=victim.placement_id)),
            (BY_NAME["Release"], scheduler_pb2.ReleaseRequest(
                request_id="victim-1", tenant="acme")),
            (BY_NAME["ListPlacements"], scheduler_pb2.ListPlacementsRequest(tenant="acme")),
            (BY_NAME["Place"], scheduler_pb2.PlaceRequest(request=gpu_request("g-1", "acme"))),
            (BY_NAME["PlaceBatch"], scheduler_pb2.PlaceBatchRequest(requests=[
                gpu_request("g-2", "globex"), gpu_request("g-3", "acme")])),
            (BY_NAME["Explain"], scheduler_pb2.ExplainRequest(request=gpu_request("g-4", "acme"))),
        ]:  # fmt: skip
            got = code_of(call(channel, rpc.method, request, rpc.response))
            assert got is grpc.StatusCode.PERMISSION_DENIED, (rpc.name, request)
        # Its own "victim-1" is no one's: request ids are each tenant's own,
        # so another's neither answers nor shows it is in use.
        for rpc, request in [
            (BY_NAME["GetPlacement"], scheduler_pb2.GetPlacementRequest(request_id="victim-1")),
            (BY_NAME["Release"], scheduler_pb2.ReleaseRequest(request_id="victim-1")),
        ]:
            got = code_of(call(channel, rpc.method, request, rpc.response))
            assert got is grpc.StatusCode.NOT_FOUND, rpc.name
        # Listing without a filter shows only globex's own (none).
        listed = call(
            channel,
            BY_NAME["ListPlacements"].method,
            scheduler_pb2.ListPlacementsRequest(),
            scheduler_pb2.ListPlacementsResponse,
        )
        assert isinstance(listed, scheduler_pb2.ListPlacementsResponse)
        assert list(listed.placements) == []


def test_another_tenants_request_id_is_neither_squatted_nor_revealed(attacked: Attacked) -> None:
    """Request ids are each tenant's own: globex's "victim-1" is a new request of its own."""
    with attacked.cluster.channel(role="tenant", name="globex") as channel:
        mine = call(
            channel,
            S + "Place",
            scheduler_pb2.PlaceRequest(request=gpu_request("victim-1", "")),
            scheduler_pb2.PlaceResponse,
        )
        assert isinstance(mine, scheduler_pb2.PlaceResponse), mine
        assert mine.placement.tenant == "globex"
        assert mine.placement.placement_id != attacked.victim.placement_id
        released = call(
            channel,
            S + "Release",
            scheduler_pb2.ReleaseRequest(request_id="victim-1"),
            scheduler_pb2.ReleaseResponse,
        )
        assert isinstance(released, scheduler_pb2.ReleaseResponse), released
    with attacked.cluster.channel(role="tenant", name="acme") as channel:
        theirs = call(
            channel,
            S + "GetPlacement",
            scheduler_pb2.GetPlacementRequest(request_id="victim-1"),
            placement_pb2.Placement,
        )
    assert isinstance(theirs, placement_pb2.Placement)
    assert theirs.placement_id == attacked.victim.placement_id
    assert theirs.state == placement_pb2.PLACEMENT_STATE_READY


@pytest.mark.usefixtures("unchanged")
def test_a_frontend_acts_only_for_the_tenants_granted_to_it(attacked: Attacked) -> None:
    with attacked.cluster.channel(role="frontend", name="portal") as channel:
        for rpc, request in [
            (BY_NAME["Place"], scheduler_pb2.PlaceRequest(request=gpu_request("p-1", "acme"))),
            (BY_NAME["GetPlacement"], scheduler_pb2.GetPlacementRequest(
                placement_id=attacked.victim.placement_id)),
            (BY_NAME["Release"], scheduler_pb2.ReleaseRequest(request_id="victim-1")),
        ]:  # fmt: skip
            got = code_of(call(channel, rpc.method, request, rpc.response))
            assert got is grpc.StatusCode.PERMISSION_DENIED, rpc.name
        # It may look at capacity, without where agents listen or what they run.
        hosts = call(
            channel,
            S + "ListHosts",
            scheduler_pb2.ListHostsRequest(),
            scheduler_pb2.ListHostsResponse,
        )
        assert isinstance(hosts, scheduler_pb2.ListHostsResponse)
        assert {h.host_id for h in hosts.hosts} == set(HOSTS)
        assert all(not h.agent_address and not h.boot_id for h in hosts.hosts)


@pytest.mark.usefixtures("unchanged")
def test_a_tenant_an_agent_or_an_admin_cannot_drive_an_agent_directly(attacked: Attacked) -> None:
    for role, name in [("tenant", "acme"), ("agent", "alpha"), ("agent", "beta"), ("admin", "x")]:
        for rpc in (BY_NAME["Prepare"], BY_NAME["Unprepare"], BY_NAME["GetState"]):
            got = attempt(attacked, rpc, role, name)
            assert got is grpc.StatusCode.PERMISSION_DENIED, (role, rpc.name)


@pytest.mark.usefixtures("unchanged")
def test_a_huge_fencing_token_is_refused_and_never_remembered(attacked: Attacked) -> None:
    # Even a genuine scheduler identity: 2**64-1 is no term the store issued.
    for token in (2**64 - 1, 2**40):
        request = agent_pb2.UnprepareRequest(
            placement=placement_pb2.Placement(placement_id="pl-none@alpha", host_id="alpha"),
            fencing_token=token,
        )
        with channel_with(
            attacked.agents["alpha"],
            agent_dns_name("alpha"),
            *tls_files(attacked.cluster.tls_dir("scheduler", "intruder")),
        ) as channel:
            got = code_of(
                call(channel, BY_NAME["Unprepare"].method, request, agent_pb2.UnprepareResponse)
            )
        assert got is grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.usefixtures("unchanged")
def test_an_undecodable_body_is_an_invalid_argument_not_a_crash(attacked: Attacked) -> None:
    with attacked.cluster.channel() as channel:
        raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(S + "Place")
        for body in (b"\xff\xff\xff\xff", b"\x0a\xff\x01", bytes(range(256))):
            with pytest.raises(grpc.RpcError) as err:
                raw(body, timeout=10)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "address", ["x" * (3 << 20) + ":1", "", "beta", "127.0.0.1:0", "a b:1", "127.0.0.1:1\n"]
)
def test_an_agent_cannot_register_a_malformed_agent_address(
    attacked: Attacked, address: str
) -> None:
    inventory = _stored_inventory(attacked.cluster, "beta")
    inventory.generation += 1
    with channel_with(
        attacked.cluster.scheduler_address,
        SCHEDULER_DNS_NAME,
        *tls_files(attacked.cluster.tls_dir("agent", "beta")),
    ) as channel:
        register: grpc.UnaryUnaryMultiCallable[Message, Message] = channel.unary_unary(
            BY_NAME["Register"].method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=scheduler_pb2.RegisterResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            register(
                scheduler_pb2.RegisterRequest(inventory=inventory, agent_address=address),
                timeout=15,
            )
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("agent_address:")
    assert len(err.value.details() or "") < 300


def test_every_refusal_is_in_the_audit_logs(attacked: Attacked) -> None:
    logs = attacked.cluster.workdir / "logs"
    records: list[dict[str, Any]] = []
    for name in ("scheduler", "agent-alpha"):
        records += [json.loads(line) for line in (logs / f"{name}.audit.jsonl").open()]
    refused = [r for r in records if r["outcome"] in ("PERMISSION_DENIED", "UNAUTHENTICATED")]
    who = {r["who"] for r in refused}
    assert "spiffe://tessera/tenant/globex" in who
    assert "spiffe://tessera/agent/beta" in who
    assert "unauthenticated" in who
    assert any(r["action"] == "Release" and r["resources"].get("placement_id") for r in refused)
    assert all({"time", "who", "peer", "action", "outcome"} <= set(r) for r in records)
    placed = [r for r in records if r["action"] == "Place" and r["outcome"] == "OK"]
    assert placed and placed[0]["resources"]["tenant"] == "acme"


def test_a_host_advertising_another_agents_address_gets_nothing_prepared_there(
    attacked: Attacked,
) -> None:
    """Beta's own (stolen) identity re-registers beta at alpha's agent address.

    The scheduler then tries to prepare beta's placements at alpha's agent,
    which cannot prove it is beta's: the TLS name check refuses the
    connection, the placement fails, and alpha is untouched. Runs last: beta's
    real agent is stopped for it.
    """
    c = attacked.cluster
    c.kill("agent-beta")
    alpha_before = read_host(attacked.root("alpha"))
    with channel_with(c.scheduler_address, SCHEDULER_DNS_NAME, *tls_files(
        c.tls_dir("agent", "beta"))) as channel:  # fmt: skip
        boot = observe(attacked).registrations["beta"][0]
        inventory = _inventory("beta", boot)
        inventory.CopyFrom(_stored_inventory(c, "beta"))
        inventory.generation += 1
        got = call(
            channel,
            BY_NAME["Register"].method,
            scheduler_pb2.RegisterRequest(
                inventory=inventory, agent_address=attacked.agents["alpha"]
            ),
            scheduler_pb2.RegisterResponse,
        )
        assert isinstance(got, scheduler_pb2.RegisterResponse), got
    assert observe(attacked).registrations["beta"][1] == attacked.agents["alpha"]
    with c.channel(role="tenant", name="acme") as channel:
        place: grpc.UnaryUnaryMultiCallable[Message, Message] = channel.unary_unary(
            S + "Place",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=scheduler_pb2.PlaceResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            place(scheduler_pb2.PlaceRequest(request=gpu_request("lured", "", "beta")), timeout=60)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    # Refused by the name check on alpha's certificate, not for want of a listener.
    assert attacked.agents["alpha"] in (err.value.details() or "")
    assert "Hostname Verification" in (err.value.details() or ""), err.value.details()
    assert read_host(attacked.root("alpha")) == alpha_before


def _stored_inventory(c: LocalCluster, host: str) -> inventory_pb2.HostInventory:
    with redis.Redis.from_url(c.redis_url) as client:
        raw = client.hget(schema.host(host), "inventory")
    assert isinstance(raw, bytes)
    return inventory_pb2.HostInventory.FromString(raw)
