"""The authorization matrix: which role may call which RPC, on whose resources.

The expectations are written out here, by hand, from the intent stated in
``tessera.security.policy`` (tenants and frontends act for their tenants,
admins for everyone; an agent speaks for the host in its certificate only; only
a scheduler drives agents; health for every caller, reflection for operators;
anything else is refused). They are never read from ``RULES``: a change of the
table must show up here as a failing row.

Callers (one identity per role)::

    tenant/acme       acts for acme
    frontend/portal   granted "team-*" by the operator
    admin/ops         acts for everyone
    agent/dgx-07      speaks for host dgx-07
    scheduler/sched-1 drives agents
    store/valkey-0    a Redis server's certificate: never a gRPC caller
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from tessera.security.identity import Identity, Role
from tessera.security.policy import (
    RULES,
    AccessDeniedError,
    AccessPolicy,
    Principal,
    require_owner,
)
from tessera.v1 import agent_pb2, inventory_pb2, placement_pb2, scheduler_pb2

TENANT = Identity(Role.TENANT, "acme")
FRONTEND = Identity(Role.FRONTEND, "portal")
ADMIN = Identity(Role.ADMIN, "ops")
VIEWER = Identity(Role.VIEWER, "noc")
AGENT = Identity(Role.AGENT, "dgx-07")
SCHEDULER = Identity(Role.SCHEDULER, "sched-1")
STORE = Identity(Role.STORE, "valkey-0")
#: The columns of the matrix, in order.
CALLERS = (TENANT, FRONTEND, ADMIN, VIEWER, AGENT, SCHEDULER, STORE)

POLICY = AccessPolicy(frontend_grants={"portal": ("team-*",)})

Y = True  # allowed
N = False  # refused

SCHED = "/tessera.v1.Scheduler/"
REG = "/tessera.v1.Registry/"
AGT = "/tessera.v1.Agent/"
HEALTH = "/grpc.health.v1.Health/"
REFLECTION_V1A = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"

# fmt: off
#: Role x RPC, each caller naming only its own resources (its tenant, its host).
ROLE_MATRIX: list[tuple[str, bool, bool, bool, bool, bool, bool, bool]] = [
    # RPC                          tenant frontend admin viewer agent scheduler store
    (SCHED + "Place",                Y,     Y,      Y,    N,    N,    N,       N),
    (SCHED + "PlaceBatch",           Y,     Y,      Y,    N,    N,    N,       N),
    (SCHED + "Explain",              Y,     Y,      Y,    N,    N,    N,       N),
    (SCHED + "ListPlacements",       Y,     Y,      Y,    N,    N,    N,       N),
    (SCHED + "GetPlacement",         Y,     Y,      Y,    N,    N,    N,       N),
    (SCHED + "Release",              Y,     Y,      Y,    N,    N,    N,       N),
    (SCHED + "ListHosts",            N,     Y,      Y,    Y,    N,    N,       N),
    (SCHED + "CordonHost",           N,     N,      Y,    N,    N,    N,       N),
    (SCHED + "UncordonHost",         N,     N,      Y,    N,    N,    N,       N),
    (SCHED + "DrainHost",            N,     N,      Y,    N,    N,    N,       N),
    (SCHED + "ForgetHost",           N,     N,      Y,    N,    N,    N,       N),
    (REG + "Register",               N,     N,      N,    N,    Y,    N,       N),
    (REG + "Heartbeat",              N,     N,      N,    N,    Y,    N,       N),
    (AGT + "Prepare",                N,     N,      N,    N,    N,    Y,       N),
    (AGT + "Unprepare",              N,     N,      N,    N,    N,    Y,       N),
    (AGT + "GetState",               N,     N,      N,    N,    N,    Y,       N),
    (HEALTH + "Check",               Y,     Y,      Y,    Y,    Y,    Y,       N),
    (HEALTH + "Watch",               Y,     Y,      Y,    Y,    Y,    Y,       N),
    (REFLECTION_V1A,                 N,     N,      Y,    N,    N,    N,       N),
    (REFLECTION_V1,                  N,     N,      Y,    N,    N,    N,       N),
]
# fmt: on


# -- requests -------------------------------------------------------------------


def placement_request(tenant: str, request_id: str = "r1") -> placement_pb2.PlacementRequest:
    return placement_pb2.PlacementRequest(request_id=request_id, tenant=tenant)


def placement(tenant: str, host: str) -> placement_pb2.Placement:
    return placement_pb2.Placement(placement_id=f"pl-1@{host}", tenant=tenant, host_id=host)


def place(tenant: str) -> scheduler_pb2.PlaceRequest:
    return scheduler_pb2.PlaceRequest(request=placement_request(tenant))


def explain(tenant: str) -> scheduler_pb2.ExplainRequest:
    return scheduler_pb2.ExplainRequest(request=placement_request(tenant))


def batch(*tenants: str) -> scheduler_pb2.PlaceBatchRequest:
    return scheduler_pb2.PlaceBatchRequest(
        requests=[placement_request(t, f"r{i}") for i, t in enumerate(tenants)]
    )


def register(host: str) -> scheduler_pb2.RegisterRequest:
    return scheduler_pb2.RegisterRequest(
        inventory=inventory_pb2.HostInventory(host_id=host, boot_id="b1"),
        agent_address="10.0.0.7:50052",
    )


def heartbeat(host: str, inventory_host: str | None = None) -> scheduler_pb2.HeartbeatRequest:
    msg = scheduler_pb2.HeartbeatRequest(host_id=host, boot_id="b1", generation=2)
    if inventory_host is not None:
        msg.inventory.CopyFrom(inventory_pb2.HostInventory(host_id=inventory_host, boot_id="b1"))
    return msg


#: A request of each RPC naming ``tenant`` and ``host``; None for a request stream.
REQUESTS: dict[str, Callable[[str, str], Message | None]] = {
    SCHED + "Place": lambda t, h: place(t),
    SCHED + "PlaceBatch": lambda t, h: batch(t, t),
    SCHED + "Explain": lambda t, h: explain(t),
    SCHED + "ListPlacements": lambda t, h: scheduler_pb2.ListPlacementsRequest(tenant=t),
    SCHED + "GetPlacement": lambda t, h: scheduler_pb2.GetPlacementRequest(
        placement_id=f"pl-1@{h}"
    ),
    SCHED + "Release": lambda t, h: scheduler_pb2.ReleaseRequest(placement_id=f"pl-1@{h}"),
    SCHED + "ListHosts": lambda t, h: scheduler_pb2.ListHostsRequest(),
    SCHED + "CordonHost": lambda t, h: scheduler_pb2.CordonHostRequest(host_id=h, reason="x"),
    SCHED + "UncordonHost": lambda t, h: scheduler_pb2.UncordonHostRequest(host_id=h),
    SCHED + "DrainHost": lambda t, h: scheduler_pb2.DrainHostRequest(host_id=h),
    SCHED + "ForgetHost": lambda t, h: scheduler_pb2.ForgetHostRequest(host_id=h),
    REG + "Register": lambda t, h: register(h),
    REG + "Heartbeat": lambda t, h: heartbeat(h, h),
    AGT + "Prepare": lambda t, h: agent_pb2.PrepareRequest(
        placement=placement(t, h), fencing_token=3
    ),
    AGT + "Unprepare": lambda t, h: agent_pb2.UnprepareRequest(
        placement=placement(t, h), fencing_token=3
    ),
    AGT + "GetState": lambda t, h: agent_pb2.GetStateRequest(),
    HEALTH + "Check": lambda t, h: health_pb2.HealthCheckRequest(service=""),
    HEALTH + "Watch": lambda t, h: health_pb2.HealthCheckRequest(service=""),
    REFLECTION_V1A: lambda t, h: None,
    REFLECTION_V1: lambda t, h: None,
}

#: The tenant each caller acts for, and the host it speaks for (its own resources).
OWN_TENANT = {TENANT: "acme", FRONTEND: "team-a", ADMIN: "acme"}
OWN_HOST = {AGENT: "dgx-07"}


def principal_of(identity: Identity | None) -> Principal:
    return POLICY.principal(identity)


def allowed(identity: Identity | None, method: str, request: Message | None) -> bool:
    try:
        POLICY.authorize(method, principal_of(identity), request)
    except AccessDeniedError:
        return False
    return True


def denial(identity: Identity | None, method: str, request: Message | None) -> str:
    with pytest.raises(AccessDeniedError) as err:
        POLICY.authorize(method, principal_of(identity), request)
    return str(err.value)


# -- the matrix -------------------------------------------------------------------


def _role_cases() -> list[object]:
    cases: list[object] = []
    for method, *expected in ROLE_MATRIX:
        for caller, allow in zip(CALLERS, expected, strict=True):
            rpc = method.rsplit("/", 2)[-2].rsplit(".", 1)[-1] + "/" + method.rsplit("/", 1)[-1]
            verdict = "may" if allow else "may not"
            cases.append(
                pytest.param(caller, method, allow, id=f"{caller.role.value} {verdict} call {rpc}")
            )
    return cases


@pytest.mark.parametrize(("caller", "method", "expected"), _role_cases())
def test_each_role_may_call_exactly_the_rpcs_of_its_row(
    caller: Identity, method: str, expected: bool
) -> None:
    tenant = OWN_TENANT.get(caller, "acme")
    host = OWN_HOST.get(caller, "dgx-07")
    request = REQUESTS[method](tenant, host)
    assert allowed(caller, method, request) is expected


def _served_rpcs() -> set[str]:
    out = set()
    for module in (scheduler_pb2, agent_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            out |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return out


def test_the_matrix_has_a_row_for_every_rpc_of_the_three_services() -> None:
    rows = {method for method, *_ in ROLE_MATRIX}
    assert _served_rpcs() <= rows
    assert {HEALTH + "Check", HEALTH + "Watch", REFLECTION_V1A, REFLECTION_V1} <= rows


def test_the_policy_table_grants_no_rpc_the_matrix_does_not_list() -> None:
    assert set(RULES) == {method for method, *_ in ROLE_MATRIX}


# -- resources: own vs foreign ----------------------------------------------------


@dataclass(frozen=True)
class Case:
    caller: Identity
    method: str
    request: Message
    allowed: bool


CASES: dict[str, Case] = {
    # A tenant acts for itself only.
    "a tenant places for itself": Case(TENANT, SCHED + "Place", place("acme"), Y),
    "a tenant places with an empty tenant (its own name is filled in)": Case(
        TENANT, SCHED + "Place", place(""), Y
    ),
    "a tenant may not place for another tenant": Case(TENANT, SCHED + "Place", place("globex"), N),
    "a tenant explains its own request": Case(TENANT, SCHED + "Explain", explain("acme"), Y),
    "a tenant may not explain another tenant's request": Case(
        TENANT, SCHED + "Explain", explain("globex"), N
    ),
    "a tenant batches its own requests, named or empty": Case(
        TENANT, SCHED + "PlaceBatch", batch("acme", "", "acme"), Y
    ),
    "a tenant's batch mixing its own and another tenant's request is refused whole": Case(
        TENANT, SCHED + "PlaceBatch", batch("acme", "globex"), N
    ),
    "a tenant's batch hiding another tenant after empty ones is refused": Case(
        TENANT, SCHED + "PlaceBatch", batch("", "", "globex"), N
    ),
    "a tenant lists its own placements": Case(
        TENANT, SCHED + "ListPlacements", scheduler_pb2.ListPlacementsRequest(tenant="acme"), Y
    ),
    "a tenant lists with no tenant filter (the servicer filters)": Case(
        TENANT, SCHED + "ListPlacements", scheduler_pb2.ListPlacementsRequest(), Y
    ),
    "a tenant may not list another tenant's placements": Case(
        TENANT, SCHED + "ListPlacements", scheduler_pb2.ListPlacementsRequest(tenant="globex"), N
    ),
    # A frontend acts for the tenants the operator granted it.
    "a frontend granted team-* places for team-a": Case(
        FRONTEND, SCHED + "Place", place("team-a"), Y
    ),
    "a frontend granted team-* may not place for acme": Case(
        FRONTEND, SCHED + "Place", place("acme"), N
    ),
    "a frontend granted team-* may not place for a look-alike (TEAM-a)": Case(
        FRONTEND, SCHED + "Place", place("TEAM-a"), N
    ),
    "a frontend naming no tenant is refused (it has no name of its own to fill in)": Case(
        FRONTEND, SCHED + "Place", place(""), N
    ),
    "a frontend batches for several granted tenants": Case(
        FRONTEND, SCHED + "PlaceBatch", batch("team-a", "team-b"), Y
    ),
    "a frontend's batch with one ungranted tenant is refused": Case(
        FRONTEND, SCHED + "PlaceBatch", batch("team-a", "acme"), N
    ),
    "a frontend explains for team-a": Case(FRONTEND, SCHED + "Explain", explain("team-a"), Y),
    "a frontend may not explain for acme": Case(FRONTEND, SCHED + "Explain", explain("acme"), N),
    "a frontend lists team-a's placements": Case(
        FRONTEND, SCHED + "ListPlacements", scheduler_pb2.ListPlacementsRequest(tenant="team-a"), Y
    ),
    "a frontend may not list acme's placements": Case(
        FRONTEND, SCHED + "ListPlacements", scheduler_pb2.ListPlacementsRequest(tenant="acme"), N
    ),
    "a frontend the operator granted nothing may not place for anyone": Case(
        Identity(Role.FRONTEND, "rogue"), SCHED + "Place", place("team-a"), N
    ),
    # An admin acts for everyone.
    "an admin places for any tenant": Case(ADMIN, SCHED + "Place", place("globex"), Y),
    "an admin batches for several tenants": Case(
        ADMIN, SCHED + "PlaceBatch", batch("acme", "globex", "team-a"), Y
    ),
    "an admin lists any tenant's placements": Case(
        ADMIN, SCHED + "ListPlacements", scheduler_pb2.ListPlacementsRequest(tenant="globex"), Y
    ),
    # An agent speaks for the host in its certificate.
    "an agent registers its own host": Case(AGENT, REG + "Register", register("dgx-07"), Y),
    "an agent may not register another host": Case(AGENT, REG + "Register", register("dgx-08"), N),
    "an agent may not register an inventory that names no host": Case(
        AGENT, REG + "Register", register(""), N
    ),
    "an agent heartbeats its own host": Case(AGENT, REG + "Heartbeat", heartbeat("dgx-07"), Y),
    "an agent heartbeats its own host with its own inventory": Case(
        AGENT, REG + "Heartbeat", heartbeat("dgx-07", "dgx-07"), Y
    ),
    "an agent may not heartbeat another host": Case(
        AGENT, REG + "Heartbeat", heartbeat("dgx-08"), N
    ),
    "an agent may not slip another host's inventory into its own heartbeat": Case(
        AGENT, REG + "Heartbeat", heartbeat("dgx-07", "dgx-08"), N
    ),
    "an agent may not heartbeat another host carrying its own inventory": Case(
        AGENT, REG + "Heartbeat", heartbeat("dgx-08", "dgx-07"), N
    ),
    "an agent whose name only starts like the host may not speak for it": Case(
        Identity(Role.AGENT, "dgx-0"), REG + "Register", register("dgx-07"), N
    ),
}


@pytest.mark.parametrize("case", [pytest.param(case, id=name) for name, case in CASES.items()])
def test_resource_scope(case: Case) -> None:
    assert allowed(case.caller, case.method, case.request) is case.allowed


def test_a_tenants_own_name_is_filled_into_an_empty_tenant() -> None:
    single = place("")
    POLICY.authorize(SCHED + "Place", principal_of(TENANT), single)
    assert single.request.tenant == "acme"

    asked = explain("")
    POLICY.authorize(SCHED + "Explain", principal_of(TENANT), asked)
    assert asked.request.tenant == "acme"

    many = batch("", "acme", "")
    POLICY.authorize(SCHED + "PlaceBatch", principal_of(TENANT), many)
    assert [r.tenant for r in many.requests] == ["acme", "acme", "acme"]


def test_a_named_tenant_is_never_rewritten() -> None:
    request = batch("team-a", "team-b")
    POLICY.authorize(SCHED + "PlaceBatch", principal_of(FRONTEND), request)
    assert [r.tenant for r in request.requests] == ["team-a", "team-b"]


# -- OWNER: checked by the servicer once the placement is loaded -----------------

OWNERS: dict[str, tuple[Identity | None, str, bool]] = {
    "a tenant acts on its own placement": (TENANT, "acme", Y),
    "a tenant may not act on another tenant's placement": (TENANT, "globex", N),
    "a frontend acts on a granted tenant's placement": (FRONTEND, "team-a", Y),
    "a frontend may not act on an ungranted tenant's placement": (FRONTEND, "acme", N),
    "an admin acts on anyone's placement": (ADMIN, "globex", Y),
    "an agent acts on no placement": (AGENT, "acme", N),
    "a scheduler identity acts on no placement through the tenant API": (SCHEDULER, "acme", N),
    "a plaintext caller acts on anyone's placement": (None, "globex", Y),
}


@pytest.mark.parametrize(
    ("caller", "owner", "expected"),
    [pytest.param(*v, id=name) for name, v in OWNERS.items()],
)
def test_require_owner(caller: Identity | None, owner: str, expected: bool) -> None:
    try:
        require_owner(principal_of(caller), owner, "pl-1@dgx-07")
    except AccessDeniedError:
        assert not expected
    else:
        assert expected


def test_require_owner_names_the_placement_but_not_its_owner() -> None:
    with pytest.raises(AccessDeniedError) as err:
        require_owner(principal_of(TENANT), "globex-secret-owner", "pl-9@dgx-07")
    assert "pl-9@dgx-07" in str(err.value)
    assert "globex-secret-owner" not in str(err.value)


# -- deny by default ----------------------------------------------------------------

UNKNOWN_RPCS = [
    SCHED + "DeleteEverything",
    AGT + "Reset",
    "/grpc.channelz.v1.Channelz/GetTopChannels",
    "/tessera.v1.Scheduler/place",  # names are case-sensitive
    "/tessera.v1.Scheduler/Place/",
    "",
]


@pytest.mark.parametrize("method", UNKNOWN_RPCS)
@pytest.mark.parametrize("caller", CALLERS, ids=lambda c: c.role.value)
def test_an_rpc_missing_from_the_table_is_refused_to_every_role(
    caller: Identity, method: str
) -> None:
    assert not allowed(caller, method, None)


@pytest.mark.parametrize("method", UNKNOWN_RPCS)
def test_an_rpc_missing_from_the_table_is_refused_even_to_a_plaintext_caller(
    method: str,
) -> None:
    assert not allowed(None, method, None)


# -- plaintext ------------------------------------------------------------------------


@pytest.mark.parametrize("method", [m for m, *_ in ROLE_MATRIX])
def test_a_plaintext_caller_may_call_every_rpc_on_anyones_resources(method: str) -> None:
    request = REQUESTS[method]("globex", "some-other-host")
    assert allowed(None, method, request)


def test_a_plaintext_caller_holds_every_role_and_sees_everything() -> None:
    anyone = Principal.plaintext()
    assert anyone.identity is None
    assert all(anyone.has_role([role]) for role in Role)
    assert anyone.sees_everything
    assert anyone.acts_for("globex")
    assert anyone.who.startswith("plaintext")


def test_a_frontend_principal_carries_exactly_its_grant() -> None:
    assert principal_of(FRONTEND).tenant_patterns == ("team-*",)
    assert principal_of(Identity(Role.FRONTEND, "rogue")).tenant_patterns == ()
    # A tenant that happens to share the frontend's name gets no grant.
    assert principal_of(Identity(Role.TENANT, "portal")).tenant_patterns == ()


# -- refusals echo untrusted values, cut short ----------------------------------------

HUGE = "x" * 20_000

LONG_REFUSALS: dict[str, tuple[Identity, str, Message | None]] = {
    "a tenant naming a 20 KB tenant": (TENANT, SCHED + "Place", place(HUGE)),
    "a tenant batching a 20 KB tenant": (TENANT, SCHED + "PlaceBatch", batch("acme", HUGE)),
    "a tenant listing a 20 KB tenant": (
        TENANT,
        SCHED + "ListPlacements",
        scheduler_pb2.ListPlacementsRequest(tenant=HUGE),
    ),
    "a frontend naming a 20 KB tenant": (FRONTEND, SCHED + "Place", place("acme" + HUGE)),
    "an agent registering a 20 KB host": (AGENT, REG + "Register", register(HUGE)),
    "an agent heartbeating a 20 KB inventory host": (
        AGENT,
        REG + "Heartbeat",
        heartbeat("dgx-07", HUGE),
    ),
    "anyone calling a 20 KB method name": (ADMIN, SCHED + HUGE, None),
}


@pytest.mark.parametrize(
    ("caller", "method", "request_"),
    [pytest.param(*v, id=name) for name, v in LONG_REFUSALS.items()],
)
def test_a_refusal_cuts_long_echoed_values(
    caller: Identity, method: str, request_: Message | None
) -> None:
    message = denial(caller, method, request_)
    assert len(message) < 300, message


def test_require_owner_cuts_a_long_placement_id() -> None:
    with pytest.raises(AccessDeniedError) as err:
        require_owner(principal_of(TENANT), "globex", "pl-" + HUGE)
    assert len(str(err.value)) < 300


def test_a_refusal_says_who_was_refused_and_what_is_allowed() -> None:
    message = denial(TENANT, SCHED + "CordonHost", scheduler_pb2.CordonHostRequest(host_id="h"))
    assert "tenant/acme" in message
    assert "CordonHost" in message
    assert "admin" in message
