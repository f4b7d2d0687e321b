"""Request validation: every problem named by the field it is in.

Field paths follow the wire contract (``claims[0].count``), so a client sees
exactly which part of its PlacementRequest to fix. Validation never stops at
the first problem: the caller gets all of them, up to a bound.

Every string and list a client sends has a bound, checked before the value is
used: an id of 20 KB is refused here, not echoed into a status message (gRPC
carries status details in trailing metadata, whose hard limit would turn the
answer into RESOURCE_EXHAUSTED) nor written into a Redis key. Messages echo a
client's value only through :func:`shown`, which cuts it.
"""

from __future__ import annotations

import re
from collections.abc import Sized
from dataclasses import dataclass

from tessera.scheduler.core.mig import KNOWN_PROFILE_NAMES
from tessera.scheduler.core.request import DeviceForm, DeviceKind, PlacementRequest

#: Identifiers that end up in Redis keys, logs and sysfs-adjacent names.
#: Used with ``fullmatch``: ``^...$`` would let a trailing newline through.
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]*")

#: Longest identifier: request and tenant ids, claim names, mdev types,
#: MIG profile names, gangs, host and boot ids, label keys.
MAX_IDENT = 128
#: Longest placement id: ``pl-<token>@<host id>`` with room to spare.
MAX_PLACEMENT_ID = 256
#: Longest free text a request carries: GPU model names, label values.
MAX_TEXT = 256
#: Most claims in one request.
MAX_CLAIMS = 32
#: Most devices one claim asks for.
MAX_COUNT = 64

#: Most host CPU one request may ask for, in thousandths: 8,192 CPUs, the
#: most a Linux host has (CONFIG_NR_CPUS under MAXSMP).
MAX_CPU_MILLI = 8_192_000

#: Most host memory one request may ask for, in MiB: 64 TiB, past any host.
MAX_MEMORY_MIB = 64 << 20
#: Most entries of one claim's lists (forms, mdev types, MIG profiles,
#: selector device ids and models); there are 4 forms and a dozen profiles.
MAX_CLAIM_LIST = 16
#: Most affinities in one request (every pair of 12 claims fits).
MAX_AFFINITIES = 64
#: Most labels a host selector may require.
MAX_SELECTOR_LABELS = 32
#: Most requests in one PlaceBatch (the largest batch the benchmarks solve).
MAX_BATCH = 10_000
#: PCI vendor and device ids are 16 bits.
_MAX_PCI_ID = 0xFFFF

#: Problems one error reports in its message; the others are only counted,
#: so that a request with thousands of bad entries cannot make an answer
#: larger than itself.
MAX_REPORTED = 16


def shown(value: str, limit: int = 64) -> str:
    """A client's value as an error message may echo it: a repr, cut when long.

    Args:
        value: the untrusted value.
        limit: characters kept before the cut.

    Returns:
        ``repr(value)`` when it has at most ``limit`` characters, else the repr
        of its first ``limit`` characters with an ellipsis inside the quotes and
        the original length: ``'aaaa…' (20,000 characters)``.
    """
    if len(value) <= limit:
        return repr(value)
    cut = repr(value[:limit])
    return f"{cut[:-1]}…{cut[-1]} ({len(value):,} characters)"


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one field."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidRequestError(ValueError):
    """A request that cannot be scheduled as written.

    Args:
        violations: the problems (all of them: callers may inspect each).
        more: problems found beyond ``violations`` and not kept.
    """

    def __init__(self, violations: list[FieldViolation], more: int = 0) -> None:
        self.violations = violations
        self.more = more
        told = "; ".join(str(v) for v in violations[:MAX_REPORTED])
        untold = more + max(0, len(violations) - MAX_REPORTED)
        if untold:
            told += f"; and {untold:,} more problem{'s' if untold != 1 else ''}"
        super().__init__(told)

    @classmethod
    def of(cls, field: str, message: str) -> InvalidRequestError:
        """The error of one problem with one field."""
        return cls([FieldViolation(field, message)])


def _check_ident(value: str, path: str, out: list[FieldViolation], limit: int = MAX_IDENT) -> None:
    if not value:
        out.append(FieldViolation(path, "must not be empty"))
    elif len(value) > limit:
        out.append(FieldViolation(path, f"must be at most {limit} characters, not {len(value):,}"))
    elif not _IDENT.fullmatch(value):
        out.append(
            FieldViolation(
                path,
                f"{shown(value)} must start with a letter or digit and use only "
                "letters, digits and . _ : @ / -",
            )
        )


def _check_text(value: str, path: str, out: list[FieldViolation], limit: int = MAX_TEXT) -> None:
    """A free-text value: any characters, bounded length."""
    if len(value) > limit:
        out.append(FieldViolation(path, f"must be at most {limit} characters, not {len(value):,}"))


def check_length(items: Sized, limit: int, path: str, out: list[FieldViolation]) -> bool:
    """Bound a list (or map) a client sent; True when within it.

    Callers check lengths before looking at the entries, so the work done on
    a request never grows with a list longer than the contract allows.

    Args:
        items: the list.
        limit: most entries allowed.
        path: the field path.
        out: where a violation goes.
    """
    if len(items) <= limit:
        return True
    out.append(FieldViolation(path, f"at most {limit} entries, not {len(items):,}"))
    return False


def validate_identifier(value: str, field: str) -> list[FieldViolation]:
    """Problems of one identifier (host id, boot id, ...), or an empty list."""
    out: list[FieldViolation] = []
    _check_ident(value, field, out)
    return out


def validate_text(value: str, field: str, limit: int = MAX_IDENT) -> list[FieldViolation]:
    """Problems of one optional free-text field (a gang name), or an empty list."""
    out: list[FieldViolation] = []
    _check_text(value, field, out, limit)
    return out


#: ``host:port``, ``[v6]:port``: where an agent listens, as it advertises it.
_ADDRESS = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?):([0-9]{1,5})"
)


def validate_address(value: str, field: str) -> list[FieldViolation]:
    """Problems of a ``host:port`` an agent advertises, or an empty list."""
    found = _ADDRESS.fullmatch(value) if len(value) <= 262 else None
    if found is None or not 1 <= int(found.group(1)) <= 65535:
        return [FieldViolation(field, f"{shown(value)} must be host:port (or [v6]:port)")]
    return []


def validate_lookup(
    placement_id: str = "", request_id: str = "", tenant: str = "", host_id: str = ""
) -> list[FieldViolation]:
    """Problems of the ids a lookup (GetPlacement, Release, ListPlacements) names.

    An empty value means "not given" and is fine here (the servicer says
    which one is required). A given value must be an id Place could have
    accepted: anything else names nothing, and is refused before it reaches
    a Redis key or a message.

    Args:
        placement_id: ``pl-<token>@<host>``.
        request_id: the client's idempotency key.
        tenant: a tenant to filter by.
        host_id: a host to filter by.
    """
    out: list[FieldViolation] = []
    if placement_id:
        _check_ident(placement_id, "placement_id", out, MAX_PLACEMENT_ID)
    for value, field in ((request_id, "request_id"), (tenant, "tenant"), (host_id, "host_id")):
        if value:
            _check_ident(value, field, out)
    return out


def _check_sizes(request: PlacementRequest, prefix: str) -> list[FieldViolation]:
    """Every list of the request within its bound, or the ones that are not."""
    out: list[FieldViolation] = []
    check_length(request.claims, MAX_CLAIMS, f"{prefix}claims", out)
    check_length(request.affinities, MAX_AFFINITIES, f"{prefix}affinities", out)
    check_length(request.host_selector, MAX_SELECTOR_LABELS, f"{prefix}host_selector", out)
    for i, claim in enumerate(request.claims[: MAX_CLAIMS + 1]):
        path = f"{prefix}claims[{i}]"
        check_length(claim.mdev_types, MAX_CLAIM_LIST, f"{path}.mdev_types", out)
        check_length(claim.mig_profiles, MAX_CLAIM_LIST, f"{path}.mig_profiles", out)
        check_length(claim.selector.device_ids, MAX_CLAIM_LIST, f"{path}.selector.device_ids", out)
        check_length(claim.selector.models, MAX_CLAIM_LIST, f"{path}.selector.models", out)
    return out


def validate_request(request: PlacementRequest, prefix: str = "") -> list[FieldViolation]:
    """All problems of a request, or an empty list.

    A list over its bound is reported alone: its entries are not examined,
    so a request with a million claims costs no more than one with 33.

    Args:
        request: the request to check.
        prefix: prepended to every field path ("requests[3]." in a batch).
    """
    out = _check_sizes(request, prefix)
    if out:
        return out
    _check_ident(request.request_id, f"{prefix}request_id", out)
    _check_ident(request.tenant, f"{prefix}tenant", out)
    if not request.claims:
        out.append(FieldViolation(f"{prefix}claims", "at least one claim is required"))
    names: set[str] = set()
    for i, claim in enumerate(request.claims):
        path = f"{prefix}claims[{i}]"
        _check_ident(claim.name, f"{path}.name", out)
        if claim.name in names:
            out.append(FieldViolation(f"{path}.name", f"duplicate claim name {shown(claim.name)}"))
        names.add(claim.name)
        if claim.count < 1:
            out.append(FieldViolation(f"{path}.count", "must be at least 1"))
        elif claim.count > MAX_COUNT:
            out.append(FieldViolation(f"{path}.count", f"must be at most {MAX_COUNT}"))
        if claim.selector.vendor_id > _MAX_PCI_ID:
            out.append(
                FieldViolation(f"{path}.selector.vendor_id", "must be a 16-bit PCI vendor id")
            )
        if any(d > _MAX_PCI_ID for d in claim.selector.device_ids):
            out.append(
                FieldViolation(f"{path}.selector.device_ids", "must be 16-bit PCI device ids")
            )
        for j, model in enumerate(sorted(claim.selector.models)):
            _check_text(model, f"{path}.selector.models[{j}]", out)
        if not claim.accepted_forms():
            listed = ", ".join(sorted(f.value for f in claim.forms))
            out.append(
                FieldViolation(
                    f"{path}.forms",
                    f"none of the listed forms ({listed}) meets min_isolation "
                    f"{claim.min_isolation.name}; whole-device needs EXCLUSIVE or looser, "
                    "MIG PARTITIONED or looser, VF and mdev SHARED",
                )
            )
        if DeviceForm.MDEV in claim.forms and not claim.mdev_types:
            out.append(
                FieldViolation(f"{path}.mdev_types", "DEVICE_FORM_MDEV needs at least one type")
            )
        if claim.mdev_types and DeviceForm.MDEV not in claim.forms:
            out.append(
                FieldViolation(f"{path}.mdev_types", "given, but forms lacks DEVICE_FORM_MDEV")
            )
        for j, mdev_type in enumerate(sorted(claim.mdev_types)):
            _check_ident(mdev_type, f"{path}.mdev_types[{j}]", out)
        if DeviceForm.MIG in claim.forms:
            if claim.kind is not DeviceKind.GPU:
                out.append(FieldViolation(f"{path}.forms", "DEVICE_FORM_MIG needs kind GPU"))
            if not claim.mig_profiles:
                out.append(
                    FieldViolation(f"{path}.mig_profiles", "DEVICE_FORM_MIG needs a profile")
                )
        elif claim.mig_profiles:
            out.append(
                FieldViolation(f"{path}.mig_profiles", "given, but forms lacks DEVICE_FORM_MIG")
            )
        for j, profile in enumerate(sorted(claim.mig_profiles)):
            if profile not in KNOWN_PROFILE_NAMES:
                out.append(
                    FieldViolation(
                        f"{path}.mig_profiles[{j}]",
                        f"unknown MIG profile {shown(profile)} "
                        "(known: e.g. 1g.10gb, 3g.40gb, 7g.80gb)",
                    )
                )
    if not 0 <= request.cpu_milli <= MAX_CPU_MILLI:
        out.append(
            FieldViolation(f"{prefix}cpu_milli", f"must be 0..{MAX_CPU_MILLI:,} (8,192 CPUs)")
        )
    if not 0 <= request.memory_mib <= MAX_MEMORY_MIB:
        out.append(FieldViolation(f"{prefix}memory_mib", f"must be 0..{MAX_MEMORY_MIB:,} (64 TiB)"))
    for i, affinity in enumerate(request.affinities):
        path = f"{prefix}affinities[{i}]"
        for side, name in (("claim_a", affinity.claim_a), ("claim_b", affinity.claim_b)):
            if name not in names:
                out.append(FieldViolation(f"{path}.{side}", f"no claim named {shown(name)}"))
        if affinity.claim_a == affinity.claim_b:
            out.append(FieldViolation(f"{path}.claim_b", "must name a different claim"))
    for key, value in sorted(request.host_selector.items()):
        if not key:
            out.append(FieldViolation(f"{prefix}host_selector", "label keys must not be empty"))
        elif len(key) > MAX_IDENT:
            out.append(
                FieldViolation(
                    f"{prefix}host_selector",
                    f"label key {shown(key)} is longer than {MAX_IDENT} characters",
                )
            )
        else:
            _check_text(value, f"{prefix}host_selector[{shown(key)}]", out)
    return out
