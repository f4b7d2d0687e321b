"""Who may call what, on which resources: the one access policy of every Tessera service.

The table :data:`RULES` maps each RPC to the roles allowed to call it and the
*scope* that ties the call to resources the caller owns, the way Kubernetes'
node authorizer lets a kubelet touch only its own Node:

=================  ==========================================================
scope              the caller may act when
=================  ==========================================================
``ANY``            its role is listed
``OWN_HOST``       the host the request names is the one in its certificate
``TENANTS``        every tenant the request names is one it acts for (a
                   tenant's own name is filled in when the request leaves it
                   empty)
``OWNER``          the placement it addresses belongs to a tenant it acts
                   for (checked once the placement is loaded:
                   :func:`require_owner`); a request id is looked up among
                   the ids of the tenant the request names, which must be
                   one it acts for (a tenant's own name filled in)
=================  ==========================================================

A tenant acts for itself, a frontend for the tenants the operator granted it
(glob patterns in the scheduler's operator config), an admin for everyone. An
RPC missing from the table is refused (deny by default). A plaintext server
(development, loopback) has no identities: its callers are trusted with every
role, which :func:`Principal.plaintext` stands for.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import Message

from tessera.security.identity import Identity, Role
from tessera.v1 import placement_pb2, scheduler_pb2

A = Role.ADMIN
T = Role.TENANT
F = Role.FRONTEND


class Scope(enum.Enum):
    """How a call is tied to the caller's own resources (see the module table)."""

    ANY = "any"
    OWN_HOST = "own-host"
    TENANTS = "tenants"
    OWNER = "owner"


class AccessDeniedError(Exception):
    """The caller may not do this (PERMISSION_DENIED)."""


@dataclass(frozen=True)
class Principal:
    """The caller of one RPC: its identity and the tenants it acts for.

    Args:
        identity: from its certificate; None on a plaintext server.
        tenant_patterns: glob patterns of the tenants a frontend acts for.
    """

    identity: Identity | None
    tenant_patterns: tuple[str, ...] = ()

    @classmethod
    def plaintext(cls) -> Principal:
        """The caller of a plaintext (development) server: trusted with every role."""
        return cls(None)

    @property
    def who(self) -> str:
        """The caller as the audit log names it."""
        return self.identity.uri if self.identity else "plaintext (unauthenticated)"

    def has_role(self, roles: Iterable[Role]) -> bool:
        """Whether the caller holds one of ``roles``."""
        return self.identity is None or self.identity.role in set(roles)

    @property
    def sees_everything(self) -> bool:
        """An admin (or a plaintext caller): every tenant, every host detail."""
        return self.identity is None or self.identity.role is Role.ADMIN

    @property
    def reads_everything(self) -> bool:
        """An admin or a viewer (or a plaintext caller): may look at every host and tenant."""
        return self.identity is None or self.identity.role in READERS

    def acts_for(self, tenant: str) -> bool:
        """Whether the caller may act for ``tenant``."""
        if self.sees_everything:
            return True
        assert self.identity is not None
        if self.identity.role is Role.TENANT:
            return tenant == self.identity.name
        if self.identity.role is Role.FRONTEND:
            return any(fnmatch.fnmatchcase(tenant, p) for p in self.tenant_patterns)
        return False


@dataclass(frozen=True)
class Rule:
    """What one RPC needs.

    Args:
        roles: the roles that may call it.
        scope: how the call is tied to the caller's resources.
        audited: it changes something: every call is an audit record (refusals
            of any RPC are recorded regardless).
        tenants: the tenant fields of the request (``TENANTS`` scope), each a
            getter and a setter used to fill a tenant's own name in.
        host: the host the request names (``OWN_HOST`` scope).
    """

    roles: frozenset[Role]
    scope: Scope = Scope.ANY
    audited: bool = False
    tenants: Callable[[Message], Sequence[TenantField]] | None = None
    host: Callable[[Message], Sequence[str]] | None = None


@dataclass(frozen=True)
class TenantField:
    """One tenant a request names, and how to fill it in when empty."""

    value: str
    fill: Callable[[str], None] = field(repr=False)


def _place_tenants(msg: Message) -> Sequence[TenantField]:
    assert isinstance(msg, scheduler_pb2.PlaceRequest | scheduler_pb2.ExplainRequest)
    return [TenantField(msg.request.tenant, _tenant_setter(msg.request))]


def _batch_tenants(msg: Message) -> Sequence[TenantField]:
    assert isinstance(msg, scheduler_pb2.PlaceBatchRequest)
    return [TenantField(req.tenant, _tenant_setter(req)) for req in msg.requests]


def _tenant_setter(req: placement_pb2.PlacementRequest) -> Callable[[str], None]:
    def fill(tenant: str) -> None:
        req.tenant = tenant

    return fill


def _list_tenants(msg: Message) -> Sequence[TenantField]:
    assert isinstance(msg, scheduler_pb2.ListPlacementsRequest)
    # An empty filter means "every tenant I act for": the servicer filters.
    return [TenantField(msg.tenant, lambda t: None)] if msg.tenant else []


def _lookup_tenants(msg: Message) -> Sequence[TenantField]:
    assert isinstance(msg, scheduler_pb2.GetPlacementRequest | scheduler_pb2.ReleaseRequest)
    if not msg.request_id:
        return []  # by placement id: the owner is checked once it is loaded

    def fill(tenant: str) -> None:
        msg.tenant = tenant

    return [TenantField(msg.tenant, fill)]


def _register_host(msg: Message) -> Sequence[str]:
    assert isinstance(msg, scheduler_pb2.RegisterRequest)
    return [msg.inventory.host_id]


def _heartbeat_host(msg: Message) -> Sequence[str]:
    assert isinstance(msg, scheduler_pb2.HeartbeatRequest)
    hosts = [msg.host_id]
    if msg.HasField("inventory"):
        hosts.append(msg.inventory.host_id)
    return hosts


_USERS = frozenset({T, F, A})
#: Who may look at everything without changing anything: the dashboard's
#: pages, /metrics, ListHosts with every detail.
READERS = frozenset({A, Role.VIEWER})
#: Who may act from the dashboard (cordon, drain, release, forget).
DASHBOARD_ACTORS = frozenset({A})
_ADMIN = frozenset({A})
_EVERYONE = frozenset(Role) - {Role.STORE}

#: Every RPC Tessera serves, and what it needs. Not listed: refused.
RULES: Mapping[str, Rule] = {
    # Scheduler: tenants and frontends act for their tenants, admins for all.
    "/tessera.v1.Scheduler/Place": Rule(_USERS, Scope.TENANTS, True, _place_tenants),
    "/tessera.v1.Scheduler/PlaceBatch": Rule(_USERS, Scope.TENANTS, True, _batch_tenants),
    "/tessera.v1.Scheduler/Explain": Rule(_USERS, Scope.TENANTS, False, _place_tenants),
    "/tessera.v1.Scheduler/ListPlacements": Rule(_USERS, Scope.TENANTS, False, _list_tenants),
    "/tessera.v1.Scheduler/GetPlacement": Rule(_USERS, Scope.OWNER, False, _lookup_tenants),
    "/tessera.v1.Scheduler/Release": Rule(_USERS, Scope.OWNER, True, _lookup_tenants),
    # Frontends see capacity without the agents' addresses and boot ids.
    "/tessera.v1.Scheduler/ListHosts": Rule(frozenset({F, A, Role.VIEWER})),
    "/tessera.v1.Scheduler/CordonHost": Rule(_ADMIN, Scope.ANY, True),
    "/tessera.v1.Scheduler/UncordonHost": Rule(_ADMIN, Scope.ANY, True),
    "/tessera.v1.Scheduler/DrainHost": Rule(_ADMIN, Scope.ANY, True),
    "/tessera.v1.Scheduler/ForgetHost": Rule(_ADMIN, Scope.ANY, True),
    # Registry: an agent speaks for the host in its certificate only.
    "/tessera.v1.Registry/Register": Rule(
        frozenset({Role.AGENT}), Scope.OWN_HOST, True, host=_register_host
    ),
    "/tessera.v1.Registry/Heartbeat": Rule(
        frozenset({Role.AGENT}), Scope.OWN_HOST, host=_heartbeat_host
    ),
    # Agent: only a scheduler drives hosts (and only it sends fencing tokens).
    "/tessera.v1.Agent/Prepare": Rule(frozenset({Role.SCHEDULER}), Scope.ANY, True),
    "/tessera.v1.Agent/Unprepare": Rule(frozenset({Role.SCHEDULER}), Scope.ANY, True),
    "/tessera.v1.Agent/GetState": Rule(frozenset({Role.SCHEDULER})),
    # Health for any authenticated peer (probes, load balancers with a cert).
    "/grpc.health.v1.Health/Check": Rule(_EVERYONE),
    "/grpc.health.v1.Health/Watch": Rule(_EVERYONE),
    # Reflection describes every RPC: operators' tooling only.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Rule(_ADMIN),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Rule(_ADMIN),
}


@dataclass(frozen=True)
class AccessPolicy:
    """The table plus what the operator granted.

    Args:
        frontend_grants: frontend name -> glob patterns of the tenants it
            acts for (``{"portal": ("acme", "team-*")}``).
        rules: the table (tests may narrow it; production uses :data:`RULES`).
    """

    frontend_grants: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rules: Mapping[str, Rule] = field(default_factory=lambda: RULES)

    def principal(self, identity: Identity | None) -> Principal:
        """The principal of a caller with ``identity`` (None: plaintext server)."""
        if identity is not None and identity.role is Role.FRONTEND:
            return Principal(identity, self.frontend_grants.get(identity.name, ()))
        return Principal(identity)

    def authorize(self, method: str, principal: Principal, request: Message | None) -> Rule:
        """Check a call before it runs; fills a tenant's own name into its request.

        Args:
            method: the full RPC name (``/tessera.v1.Scheduler/Place``).
            principal: the caller.
            request: the decoded request (None for streaming calls).

        Returns:
            The RPC's rule.

        Raises:
            AccessDeniedError: with the reason, naming the field where one is at fault.
        """
        rule = self.rules.get(method)
        if rule is None:
            raise AccessDeniedError(f"{method[:128]} is not an RPC any identity may call")
        if not principal.has_role(rule.roles):
            allowed = ", ".join(sorted(r.value for r in rule.roles))
            assert principal.identity is not None
            raise AccessDeniedError(
                f"{principal.identity} may not call {method.rsplit('/', 1)[-1]} "
                f"(allowed: {allowed})"
            )
        if principal.identity is None or request is None:
            return rule
        if rule.scope is Scope.OWN_HOST and rule.host is not None:
            for host in rule.host(request):
                if host != principal.identity.name:
                    raise AccessDeniedError(
                        f"{principal.identity} speaks for host {principal.identity.name!r} "
                        f"only, not {_shown(host)}"
                    )
        # The tenants a request names: under TENANTS its whole scope, under
        # OWNER the tenant a request id belongs to (the owner is checked too).
        if rule.tenants is not None:
            for tenant in rule.tenants(request):
                if not tenant.value and principal.identity.role is Role.TENANT:
                    tenant.fill(principal.identity.name)
                elif not principal.acts_for(tenant.value):
                    raise AccessDeniedError(
                        f"{principal.identity} may not act for tenant {_shown(tenant.value)}"
                    )
        return rule


def require_owner(principal: Principal, tenant: str, what: str) -> None:
    """The ``OWNER`` scope: refuse unless the caller acts for ``tenant``.

    Raises:
        AccessDeniedError: naming ``what`` (the placement) but not its owner.
    """
    if not principal.acts_for(tenant):
        assert principal.identity is not None
        raise AccessDeniedError(f"{principal.identity} may not act on {_shown(what)}")


def _shown(value: str, limit: int = 64) -> str:
    """``value`` quoted, cut to ``limit`` characters: refusals echo untrusted input."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + f"... ({len(value)} characters)"
