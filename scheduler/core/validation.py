"""Request validation: every problem named by the field it is in.

Field paths follow the wire contract (``claims[0].count``), so a client sees
exactly which part of its PlacementRequest to fix. Validation never stops at
the first problem: the caller gets all of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from scheduler.core.mig import KNOWN_PROFILE_NAMES
from scheduler.core.request import DeviceForm, DeviceKind, PlacementRequest

#: Identifiers that end up in Redis keys, logs and sysfs-adjacent names.
_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]*$")
_MAX_IDENT = 128
_MAX_CLAIMS = 32
_MAX_COUNT = 64


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one field."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidRequestError(ValueError):
    """A request that cannot be scheduled as written."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(str(v) for v in violations))


def _check_ident(value: str, path: str, out: list[FieldViolation]) -> None:
    if not value:
        out.append(FieldViolation(path, "must not be empty"))
    elif len(value) > _MAX_IDENT:
        out.append(FieldViolation(path, f"must be at most {_MAX_IDENT} characters"))
    elif not _IDENT.match(value):
        out.append(
            FieldViolation(
                path,
                f"{value!r} must start with a letter or digit and use only "
                "letters, digits and . _ : @ / -",
            )
        )


def validate_identifier(value: str, field: str) -> list[FieldViolation]:
    """Problems of one identifier (host id, boot id, ...), or an empty list."""
    out: list[FieldViolation] = []
    _check_ident(value, field, out)
    return out


def validate_request(request: PlacementRequest, prefix: str = "") -> list[FieldViolation]:
    """All problems of a request, or an empty list.

    Args:
        request: the request to check.
        prefix: prepended to every field path ("requests[3]." in a batch).
    """
    out: list[FieldViolation] = []
    _check_ident(request.request_id, f"{prefix}request_id", out)
    _check_ident(request.tenant, f"{prefix}tenant", out)
    if not request.claims:
        out.append(FieldViolation(f"{prefix}claims", "at least one claim is required"))
    if len(request.claims) > _MAX_CLAIMS:
        out.append(FieldViolation(f"{prefix}claims", f"at most {_MAX_CLAIMS} claims"))
    names: set[str] = set()
    for i, claim in enumerate(request.claims):
        path = f"{prefix}claims[{i}]"
        _check_ident(claim.name, f"{path}.name", out)
        if claim.name in names:
            out.append(FieldViolation(f"{path}.name", f"duplicate claim name {claim.name!r}"))
        names.add(claim.name)
        if claim.count < 1:
            out.append(FieldViolation(f"{path}.count", "must be at least 1"))
        elif claim.count > _MAX_COUNT:
            out.append(FieldViolation(f"{path}.count", f"must be at most {_MAX_COUNT}"))
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
                        f"unknown MIG profile {profile!r} (known: e.g. 1g.10gb, 3g.40gb, 7g.80gb)",
                    )
                )
    for i, affinity in enumerate(request.affinities):
        path = f"{prefix}affinities[{i}]"
        for side, name in (("claim_a", affinity.claim_a), ("claim_b", affinity.claim_b)):
            if name not in names:
                out.append(FieldViolation(f"{path}.{side}", f"no claim named {name!r}"))
        if affinity.claim_a == affinity.claim_b:
            out.append(FieldViolation(f"{path}.claim_b", "must name a different claim"))
    for key in sorted(request.host_selector):
        if not key:
            out.append(FieldViolation(f"{prefix}host_selector", "label keys must not be empty"))
    return out
