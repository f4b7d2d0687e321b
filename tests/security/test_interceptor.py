"""The access interceptor on a real server: authentication, authorization, audit, bad bodies.

Spec (``tessera.security.interceptor``): an undecodable body answers
INVALID_ARGUMENT with a rate-limited log line; a caller whose verified
certificate names no Tessera identity is UNAUTHENTICATED; a refusal of the
policy is PERMISSION_DENIED; the handler runs with the caller bound to
``CURRENT_PRINCIPAL``; every change and every refusal is an audit record; a
certificate from another CA, an expired one or none at all fails the TLS
handshake (UNAVAILABLE) and never reaches a handler.

Each test runs a ``grpc.aio`` server on ``127.0.0.1`` port 0 with real mutual
TLS, the real policy and the scheduler's audit description of requests. The
servicer is scaffolding: it records who called and answers at once.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from tessera.scheduler.service.server import audit_resources
from tessera.security.audit import AuditLog
from tessera.security.identity import SCHEDULER_DNS_NAME, Identity, Role
from tessera.security.interceptor import AccessInterceptor, current_principal
from tessera.security.policy import RULES, AccessDeniedError, AccessPolicy, Principal, require_owner
from tessera.security.tls import TlsDir, channel_options
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

from ..conftest import Runner
from .pki import Pki, raw_credentials, serving
from .test_policy_matrix import CALLERS, OWN_HOST, OWN_TENANT, REQUESTS, ROLE_MATRIX

FRESH = [("grpc.use_local_subchannel_pool", 1)]
SCHEDULER_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
Context = grpc.aio.ServicerContext[Any, Any]
Raw = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]


class RecordingScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Records each call and the principal bound while it runs; answers at once."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Principal, Message]] = []

    def _seen(self, name: str, request: Message) -> None:
        self.calls.append((name, current_principal(), request))

    async def Place(  # noqa: N802 - the RPC's name
        self, request: scheduler_pb2.PlaceRequest, context: Context
    ) -> scheduler_pb2.PlaceResponse:
        self._seen("Place", request)
        return scheduler_pb2.PlaceResponse(
            placement=placement_pb2.Placement(
                placement_id="pl-1@dgx-07",
                request_id=request.request.request_id,
                tenant=request.request.tenant,
                host_id="dgx-07",
            )
        )

    async def PlaceBatch(  # noqa: N802
        self, request: scheduler_pb2.PlaceBatchRequest, context: Context
    ) -> scheduler_pb2.PlaceBatchResponse:
        self._seen("PlaceBatch", request)
        return scheduler_pb2.PlaceBatchResponse()

    async def Explain(  # noqa: N802
        self, request: scheduler_pb2.ExplainRequest, context: Context
    ) -> scheduler_pb2.ExplainResponse:
        self._seen("Explain", request)
        return scheduler_pb2.ExplainResponse()

    async def ListPlacements(  # noqa: N802
        self, request: scheduler_pb2.ListPlacementsRequest, context: Context
    ) -> scheduler_pb2.ListPlacementsResponse:
        self._seen("ListPlacements", request)
        return scheduler_pb2.ListPlacementsResponse()

    async def GetPlacement(  # noqa: N802
        self, request: scheduler_pb2.GetPlacementRequest, context: Context
    ) -> placement_pb2.Placement:
        self._seen("GetPlacement", request)
        return placement_pb2.Placement()

    async def Release(  # noqa: N802
        self, request: scheduler_pb2.ReleaseRequest, context: Context
    ) -> scheduler_pb2.ReleaseResponse:
        # An OWNER-scoped handler checks the placement it loaded: this one is globex's.
        self._seen("Release", request)
        try:
            require_owner(current_principal(), "globex", request.placement_id)
        except AccessDeniedError as err:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        return scheduler_pb2.ReleaseResponse()

    async def ListHosts(  # noqa: N802
        self, request: scheduler_pb2.ListHostsRequest, context: Context
    ) -> scheduler_pb2.ListHostsResponse:
        self._seen("ListHosts", request)
        return scheduler_pb2.ListHostsResponse()

    async def CordonHost(  # noqa: N802
        self, request: scheduler_pb2.CordonHostRequest, context: Context
    ) -> scheduler_pb2.HostSummary:
        self._seen("CordonHost", request)
        return scheduler_pb2.HostSummary(host_id=request.host_id)

    async def UncordonHost(  # noqa: N802
        self, request: scheduler_pb2.UncordonHostRequest, context: Context
    ) -> scheduler_pb2.HostSummary:
        self._seen("UncordonHost", request)
        return scheduler_pb2.HostSummary(host_id=request.host_id)

    async def DrainHost(  # noqa: N802
        self, request: scheduler_pb2.DrainHostRequest, context: Context
    ) -> scheduler_pb2.DrainHostResponse:
        self._seen("DrainHost", request)
        return scheduler_pb2.DrainHostResponse()

    async def ForgetHost(  # noqa: N802
        self, request: scheduler_pb2.ForgetHostRequest, context: Context
    ) -> scheduler_pb2.ForgetHostResponse:
        self._seen("ForgetHost", request)
        return scheduler_pb2.ForgetHostResponse(host_id=request.host_id)


@dataclass
class Served:
    address: str
    servicer: RecordingScheduler
    audit_path: Path

    def credentials(self, directory: Path) -> grpc.ChannelCredentials:
        """A client presenting the certificate in ``directory``."""
        return raw_credentials(directory)

    def channel(self, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        """A new connection to the server; plaintext when ``credentials`` is None."""
        if credentials is None:
            return grpc.aio.insecure_channel(self.address, options=FRESH)
        return grpc.aio.secure_channel(
            self.address, credentials, options=[*channel_options(SCHEDULER_DNS_NAME), *FRESH]
        )

    def audit(self) -> list[dict[str, Any]]:
        """Every audit record written so far."""
        text = self.audit_path.read_text() if self.audit_path.exists() else ""
        return [json.loads(line) for line in text.splitlines()]


@asynccontextmanager
async def scheduler_server(pki: Pki, *, tls: bool = True) -> AsyncIterator[Served]:
    """The scaffolding servicer and health behind the real interceptor and policy."""
    servicer = RecordingScheduler()
    audit_path = pki.root / "audit.log"
    audit = AuditLog(str(audit_path), "scheduler")
    interceptor = AccessInterceptor(
        AccessPolicy(frontend_grants={"portal": ("team-*",)}),
        tls=tls,
        audit=audit,
        resources={method: audit_resources for method in RULES},
    )
    # The asyncio one, as the scheduler serves it (a blocking Watch would pin
    # a worker thread until the process exits).
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    def register(server: grpc.aio.Server) -> None:
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SCHEDULER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

    credentials = TlsDir(pki.issue(Role.SCHEDULER, "sched-1")).server_credentials() if tls else None
    try:
        async with serving(register, credentials, interceptors=[interceptor]) as address:
            yield Served(address, servicer, audit_path)
    finally:
        audit.close()


def place(tenant: str, request_id: str = "r1") -> scheduler_pb2.PlaceRequest:
    return scheduler_pb2.PlaceRequest(
        request=placement_pb2.PlacementRequest(request_id=request_id, tenant=tenant)
    )


async def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        await call()
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def send(raw: Raw, body: bytes) -> grpc.StatusCode:
    return await code_of(lambda: raw(body, timeout=5))


def run_served(pki: Pki, arun: Runner, test: Callable[[Served], Any], *, tls: bool = True) -> None:
    async def body() -> None:
        async with scheduler_server(pki, tls=tls) as served:
            await test(served)

    arun(body())


# -- who gets through ----------------------------------------------------------------


def test_a_tenants_call_reaches_the_handler_with_its_principal_bound(
    pki: Pki, arun: Runner
) -> None:
    async def test(served: Served) -> None:
        creds = served.credentials(pki.issue(Role.TENANT, "acme"))
        async with served.channel(creds) as channel:
            reply = await scheduler_pb2_grpc.SchedulerStub(channel).Place(place(""), timeout=5)
        assert reply.placement.tenant == "acme"  # its own name, filled in
        [(name, principal, request)] = served.servicer.calls
        assert name == "Place"
        assert principal.identity == Identity(Role.TENANT, "acme")
        assert isinstance(request, scheduler_pb2.PlaceRequest)
        assert request.request.tenant == "acme"

    run_served(pki, arun, test)
    with pytest.raises(LookupError):
        current_principal()  # bound only while a handler runs


def test_a_frontend_reaches_the_handler_with_its_grant(pki: Pki, arun: Runner) -> None:
    async def test(served: Served) -> None:
        creds = served.credentials(pki.issue(Role.FRONTEND, "portal"))
        async with served.channel(creds) as channel:
            await scheduler_pb2_grpc.SchedulerStub(channel).Place(place("team-a"), timeout=5)
        [(_, principal, _)] = served.servicer.calls
        assert principal.identity == Identity(Role.FRONTEND, "portal")
        assert principal.tenant_patterns == ("team-*",)

    run_served(pki, arun, test)


@pytest.mark.parametrize("role", [r for r in Role if r is not Role.STORE], ids=str)
def test_health_answers_every_authenticated_role(pki: Pki, arun: Runner, role: Role) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.issue(role, "x1"))) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    run_served(pki, arun, test)


def test_over_the_wire_each_role_reaches_exactly_the_scheduler_handlers_of_its_row(
    pki: Pki, arun: Runner
) -> None:
    rows = [row for row in ROLE_MATRIX if row[0].startswith("/tessera.v1.Scheduler/")]
    assert len(rows) == 11

    async def test(served: Served) -> None:
        for column, caller in enumerate(CALLERS, start=1):
            creds = served.credentials(pki.issue(caller.role, caller.name))
            async with served.channel(creds) as channel:
                for row in rows:
                    method, allowed = row[0], row[column]
                    request = REQUESTS[method](
                        OWN_TENANT.get(caller, "acme"), OWN_HOST.get(caller, "dgx-07")
                    )
                    assert request is not None
                    raw: Raw = channel.unary_unary(method)
                    before = len(served.servicer.calls)
                    code = await send(raw, request.SerializeToString())
                    ran = len(served.servicer.calls) > before
                    # Release's handler checks the owner itself (globex): only an admin passes.
                    owner_ok = not method.endswith("/Release") or caller.role is Role.ADMIN
                    assert (code is grpc.StatusCode.OK) is (allowed and owner_ok), (
                        caller,
                        method,
                        code,
                    )
                    assert ran is allowed, (caller, method)
                    if not allowed:
                        assert code is grpc.StatusCode.PERMISSION_DENIED, (caller, method)

    run_served(pki, arun, test)


# -- refused by the policy ---------------------------------------------------------------


def test_a_wrong_role_gets_permission_denied_and_an_audit_line(pki: Pki, arun: Runner) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.issue(Role.TENANT, "acme"))) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            code = await code_of(
                lambda: stub.CordonHost(scheduler_pb2.CordonHostRequest(host_id="dgx-07"))
            )
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert served.servicer.calls == []
        [line] = served.audit()
        assert line["outcome"] == "PERMISSION_DENIED"
        assert line["who"] == "spiffe://tessera/tenant/acme"
        assert line["action"] == "CordonHost"
        assert line["resources"] == {"host_id": "dgx-07"}
        assert line["detail"]
        assert line["peer"]

    run_served(pki, arun, test)


def test_a_tenant_acting_for_another_is_refused_and_audited(pki: Pki, arun: Runner) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.issue(Role.TENANT, "acme"))) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            code = await code_of(lambda: stub.Place(place("globex"), timeout=5))
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert served.servicer.calls == []
        [line] = served.audit()
        assert (line["outcome"], line["action"]) == ("PERMISSION_DENIED", "Place")
        assert line["resources"]["tenant"] == "globex"

    run_served(pki, arun, test)


def test_a_store_certificate_may_not_even_ask_for_health(pki: Pki, arun: Runner) -> None:
    async def test(served: Served) -> None:
        creds = served.credentials(pki.issue(Role.STORE, "valkey-0"))
        async with served.channel(creds) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            code = await code_of(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5))
        assert code is grpc.StatusCode.PERMISSION_DENIED

    run_served(pki, arun, test)


def test_a_refusal_by_the_handler_itself_is_audited(pki: Pki, arun: Runner) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.issue(Role.TENANT, "acme"))) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            code = await code_of(
                lambda: stub.Release(
                    scheduler_pb2.ReleaseRequest(placement_id="pl-9@dgx-07"), timeout=5
                )
            )
        assert code is grpc.StatusCode.PERMISSION_DENIED
        [line] = served.audit()
        assert (line["outcome"], line["action"]) == ("PERMISSION_DENIED", "Release")
        assert line["resources"]["placement_id"] == "pl-9@dgx-07"

    run_served(pki, arun, test)


# -- not authenticated: a CA-signed certificate that names no Tessera identity -----------

UNAUTHENTICATED: dict[str, list[x509.GeneralName]] = {
    "no URI SAN": [x509.DNSName("acme.tenant.tessera")],
    "no SAN at all": [],
    "a URI of another trust domain": [
        x509.UniformResourceIdentifier("spiffe://example.org/admin/ops")
    ],
    "a Tessera URI of an unknown role": [
        x509.UniformResourceIdentifier("spiffe://tessera/root/ops")
    ],
    "two Tessera identities": [
        x509.UniformResourceIdentifier("spiffe://tessera/tenant/acme"),
        x509.UniformResourceIdentifier("spiffe://tessera/admin/ops"),
    ],
}


@pytest.mark.parametrize("sans", [pytest.param(v, id=k) for k, v in UNAUTHENTICATED.items()])
def test_a_ca_signed_certificate_without_a_tessera_identity_is_unauthenticated(
    pki: Pki, arun: Runner, sans: list[x509.GeneralName]
) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.custom(sans))) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            code = await code_of(lambda: stub.Place(place("acme"), timeout=5))
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert served.servicer.calls == []
        [line] = served.audit()
        assert (line["outcome"], line["action"]) == ("UNAUTHENTICATED", "Place")
        assert not line["who"].startswith("spiffe://")

    run_served(pki, arun, test)


# -- refused at the handshake -----------------------------------------------------------


def _other_ca(pki: Pki) -> grpc.ChannelCredentials:
    # A tenant certificate of another CA, that trusts the real CA (so only the server refuses).
    stranger = Pki(pki.root / "stranger").issue(Role.ADMIN, "ops")
    (stranger / "ca.pem").write_bytes((pki.ca / "ca.pem").read_bytes())
    return raw_credentials(stranger)


def _expired(pki: Pki) -> grpc.ChannelCredentials:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    return raw_credentials(pki.issue(Role.ADMIN, "ops", not_before=start, days=1))


def _no_certificate(pki: Pki) -> grpc.ChannelCredentials:
    return raw_credentials(pki.issue(Role.ADMIN, "ops"), with_cert=False)


HANDSHAKE_FAILURES: dict[str, Callable[[Pki], grpc.ChannelCredentials]] = {
    "a certificate from another CA": _other_ca,
    "an expired certificate": _expired,
    "no client certificate at all": _no_certificate,
}


@pytest.mark.parametrize(
    "credentials", [pytest.param(v, id=k) for k, v in HANDSHAKE_FAILURES.items()]
)
def test_a_client_the_tls_handshake_refuses_sees_unavailable_and_no_handler_runs(
    pki: Pki, arun: Runner, credentials: Callable[[Pki], grpc.ChannelCredentials]
) -> None:
    async def test(served: Served) -> None:
        async with served.channel(credentials(pki)) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            place_code = await code_of(lambda: stub.Place(place("acme"), timeout=5))
            assert place_code is grpc.StatusCode.UNAVAILABLE
            health_stub = health_pb2_grpc.HealthStub(channel)
            assert (
                await code_of(lambda: health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5))
                is grpc.StatusCode.UNAVAILABLE
            )
        assert served.servicer.calls == []
        assert served.audit() == []

    run_served(pki, arun, test)


# -- undecodable bodies ----------------------------------------------------------------

GARBAGE = b"\xff\xff\xff"


def test_an_undecodable_body_is_invalid_argument_and_never_reaches_the_handler(
    pki: Pki, arun: Runner
) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.issue(Role.ADMIN, "ops"))) as channel:
            raw: Raw = channel.unary_unary("/tessera.v1.Scheduler/Place")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw(GARBAGE, timeout=5)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "Place" in (err.value.details() or "")
        assert served.servicer.calls == []

    run_served(pki, arun, test)


def test_a_hundred_undecodable_bodies_log_a_couple_of_lines_at_most(
    pki: Pki, arun: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.issue(Role.ADMIN, "ops"))) as channel:
            raw: Raw = channel.unary_unary("/tessera.v1.Scheduler/Place")
            codes = [await code_of(lambda: raw(GARBAGE, timeout=5)) for _ in range(100)]
        assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
        assert served.servicer.calls == []

    with caplog.at_level(logging.INFO):
        run_served(pki, arun, test)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING and not _loop_noise(r)]
    assert 1 <= len(noisy) <= 2, [r.getMessage() for r in noisy]
    assert not any(r.exc_info for r in noisy)


def _loop_noise(record: logging.LogRecord) -> bool:
    """gRPC's poller waking an earlier test's closed event loop: the harness, not the server."""
    return (
        record.name == "asyncio"
        and record.exc_info is not None
        and "Event loop is closed" in str(record.exc_info[1])
    )


def test_an_undecodable_health_check_is_invalid_argument_too(pki: Pki, arun: Runner) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.issue(Role.AGENT, "dgx-07"))) as channel:
            raw: Raw = channel.unary_unary("/grpc.health.v1.Health/Check")
            assert await code_of(lambda: raw(GARBAGE, timeout=5)) is (
                grpc.StatusCode.INVALID_ARGUMENT
            )

    run_served(pki, arun, test)


# -- the audit of calls that ran -------------------------------------------------------------


def test_an_audited_call_that_succeeds_writes_an_ok_line_with_its_resources(
    pki: Pki, arun: Runner
) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.issue(Role.TENANT, "acme"))) as channel:
            await scheduler_pb2_grpc.SchedulerStub(channel).Place(place("acme", "r7"), timeout=5)
        [line] = served.audit()
        assert line["outcome"] == "OK"
        assert line["action"] == "Place"
        assert line["who"] == "spiffe://tessera/tenant/acme"
        assert line["service"] == "scheduler"
        assert line["resources"] == {
            "tenant": "acme",
            "request_id": "r7",
            "placement_id": "pl-1@dgx-07",
            "host_id": "dgx-07",
        }
        assert "detail" not in line

    run_served(pki, arun, test)


def test_an_admin_change_is_audited_too(pki: Pki, arun: Runner) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.issue(Role.ADMIN, "ops"))) as channel:
            await scheduler_pb2_grpc.SchedulerStub(channel).CordonHost(
                scheduler_pb2.CordonHostRequest(host_id="dgx-07", reason="fan"), timeout=5
            )
        [line] = served.audit()
        assert (line["outcome"], line["action"], line["who"]) == (
            "OK",
            "CordonHost",
            "spiffe://tessera/admin/ops",
        )
        assert line["resources"] == {"host_id": "dgx-07"}

    run_served(pki, arun, test)


def test_a_read_that_succeeds_writes_no_audit_line(pki: Pki, arun: Runner) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.issue(Role.FRONTEND, "portal"))) as ch:
            await scheduler_pb2_grpc.SchedulerStub(ch).ListHosts(
                scheduler_pb2.ListHostsRequest(), timeout=5
            )
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert [name for name, _, _ in served.servicer.calls] == ["ListHosts"]
        assert served.audit() == []

    run_served(pki, arun, test)


# -- streaming calls ----------------------------------------------------------------------


async def first_watch_status(channel: grpc.aio.Channel) -> Any:
    """The first status a Health/Watch streams, or the RpcError's code."""
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
    try:
        async for reply in call:
            return reply.status
    except grpc.aio.AioRpcError as err:
        return err.code()
    finally:
        call.cancel()
    return None


def test_a_watch_reaches_the_health_servicer_the_scheduler_serves(pki: Pki, arun: Runner) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.issue(Role.AGENT, "dgx-07"))) as ch:
            assert await first_watch_status(ch) == health_pb2.HealthCheckResponse.SERVING

    run_served(pki, arun, test)


def test_a_store_certificate_is_refused_a_watch(pki: Pki, arun: Runner) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.issue(Role.STORE, "valkey-0"))) as ch:
            assert await first_watch_status(ch) is grpc.StatusCode.PERMISSION_DENIED
        [line] = served.audit()
        assert (line["outcome"], line["action"]) == ("PERMISSION_DENIED", "Watch")

    run_served(pki, arun, test)


async def reflect(channel: grpc.aio.Channel, body: bytes) -> tuple[grpc.StatusCode, bytes]:
    """One raw message on a reflection stream: the status and the first reply."""
    stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(REFLECTION)
    call = stream(timeout=5)
    try:
        await call.write(body)
        await call.done_writing()
        first = b""
        async for reply in call:
            first = first or reply
        return grpc.StatusCode.OK, first
    except grpc.aio.AioRpcError as err:
        return err.code(), b""


LIST_SERVICES = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()


def test_reflection_answers_an_admin_and_refuses_everyone_else(pki: Pki, arun: Runner) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.issue(Role.ADMIN, "ops"))) as ch:
            code, reply = await reflect(ch, LIST_SERVICES)
            assert code is grpc.StatusCode.OK
            assert SCHEDULER_SERVICE.encode() in reply
        async with served.channel(served.credentials(pki.issue(Role.FRONTEND, "portal"))) as ch:
            code, reply = await reflect(ch, LIST_SERVICES)
            assert code is grpc.StatusCode.PERMISSION_DENIED
            assert reply == b""

    run_served(pki, arun, test)


def test_an_undecodable_message_in_a_request_stream_is_invalid_argument_too(
    pki: Pki, arun: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(served: Served) -> None:
        async with served.channel(served.credentials(pki.issue(Role.ADMIN, "ops"))) as ch:
            codes = [(await reflect(ch, GARBAGE))[0] for _ in range(10)]
        assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}

    with caplog.at_level(logging.INFO):
        run_served(pki, arun, test)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING and not _loop_noise(r)]
    assert len(noisy) <= 2, [r.getMessage() for r in noisy]
    assert not any(r.exc_info for r in noisy)


# -- plaintext ----------------------------------------------------------------------------


def test_a_plaintext_server_lets_calls_through_as_the_plaintext_principal(
    pki: Pki, arun: Runner
) -> None:
    async def test(served: Served) -> None:
        async with served.channel(None) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            await stub.Place(place("globex"), timeout=5)
            await stub.CordonHost(scheduler_pb2.CordonHostRequest(host_id="dgx-07"), timeout=5)
        assert [name for name, _, _ in served.servicer.calls] == ["Place", "CordonHost"]
        assert all(p == Principal.plaintext() for _, p, _ in served.servicer.calls)
        assert [line["who"] for line in served.audit()] == [Principal.plaintext().who] * 2

    run_served(pki, arun, test, tls=False)
