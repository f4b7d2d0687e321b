"""Identities: a role and a name, carried as a SPIFFE-style URI SAN in a certificate.

``spiffe://tessera/<role>/<name>`` names who a peer is; the role decides what it
may do (see :mod:`tessera.security.policy`) and the name which resources it may
touch (an agent's host, a tenant's placements). Each certificate also carries a
DNS SAN ``<name>.<role>.tessera`` (and ``scheduler.tessera`` for schedulers), so
a client can check the server it reached is the one it meant, the way Nomad's
``verify_server_hostname`` does: an agent only talks to a scheduler, and the
scheduler only hands host A's placements to the agent certified for host A.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

#: The trust domain of every Tessera identity.
TRUST_DOMAIN = "tessera"

#: A name as it may stand in a URI path segment and a DNS label sequence.
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")


class Role(StrEnum):
    """What a peer is, and so what it may do."""

    SCHEDULER = "scheduler"
    AGENT = "agent"
    TENANT = "tenant"
    FRONTEND = "frontend"
    ADMIN = "admin"
    #: Looks at everything (the dashboard, ListHosts, metrics), changes nothing.
    VIEWER = "viewer"
    #: A Redis/Valkey server's certificate (never a gRPC caller).
    STORE = "store"


class IdentityError(ValueError):
    """A name or URI that is not a Tessera identity."""


def check_name(name: str) -> str:
    """``name`` if it can name an identity, else :class:`IdentityError`.

    Letters, digits, ``.``, ``_`` and ``-``; starts and ends with a letter or
    digit; at most 128 characters (it stands in a URI and a DNS SAN).
    """
    # fullmatch: with match, "$" would also accept a name ending in a newline.
    if not _NAME.fullmatch(name) or ".." in name:
        shown = name if len(name) <= 64 else name[:61] + "..."
        raise IdentityError(
            f"{shown!r} cannot name an identity: use 1-128 letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return name


@dataclass(frozen=True, order=True)
class Identity:
    """A role and a name, e.g. ``agent/dgx-07`` or ``tenant/acme``."""

    role: Role
    name: str

    def __post_init__(self) -> None:
        check_name(self.name)

    @property
    def uri(self) -> str:
        """The SPIFFE ID: ``spiffe://tessera/<role>/<name>``."""
        return f"spiffe://{TRUST_DOMAIN}/{self.role.value}/{self.name}"

    @property
    def dns_name(self) -> str:
        """The DNS SAN a client verifies: ``<name>.<role>.tessera``."""
        return f"{self.name}.{self.role.value}.{TRUST_DOMAIN}"

    def __str__(self) -> str:
        return f"{self.role.value}/{self.name}"

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """The identity a SPIFFE ID names.

        Raises:
            IdentityError: not ``spiffe://tessera/<role>/<name>`` with a known role.
        """
        prefix = f"spiffe://{TRUST_DOMAIN}/"
        if len(uri) > 256 or not uri.startswith(prefix):
            raise IdentityError(f"not a {prefix}<role>/<name> identity")
        role_text, sep, name = uri[len(prefix) :].partition("/")
        if not sep:
            raise IdentityError(f"not a {prefix}<role>/<name> identity")
        try:
            role = Role(role_text)
        except ValueError:
            known = ", ".join(r.value for r in Role)
            raise IdentityError(f"unknown role {role_text[:32]!r}; known: {known}") from None
        return cls(role, check_name(name))


#: The DNS SAN every scheduler certificate carries: what clients verify.
SCHEDULER_DNS_NAME = f"{Role.SCHEDULER.value}.{TRUST_DOMAIN}"


def agent_dns_name(host_id: str) -> str:
    """The DNS SAN the scheduler verifies on the agent of ``host_id``."""
    return Identity(Role.AGENT, host_id).dns_name
