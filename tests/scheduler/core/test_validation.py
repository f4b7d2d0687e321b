"""Request validation names every bad field."""

from __future__ import annotations

from tessera.scheduler.core.identity import RequestId, TenantName
from tessera.scheduler.core.request import (
    Affinity,
    AffinityScope,
    Claim,
    DeviceForm,
    DeviceKind,
    Isolation,
    PlacementRequest,
)
from tessera.scheduler.core.validation import validate_request


def fields(req: PlacementRequest) -> set[str]:
    return {v.field for v in validate_request(req)}


GPU = Claim("gpu", DeviceKind.GPU, 1)


def test_a_good_request_has_no_violations() -> None:
    assert validate_request(PlacementRequest(RequestId("r"), TenantName("t"), (GPU,))) == []


def test_empty_tenant_and_request_id_are_named() -> None:
    assert fields(PlacementRequest(RequestId(""), TenantName(""), (GPU,))) == {
        "request_id",
        "tenant",
    }


def test_count_zero_is_named_by_its_claim_index() -> None:
    bad = Claim("gpu2", DeviceKind.GPU, 0)
    violations = validate_request(PlacementRequest(RequestId("r"), TenantName("t"), (GPU, bad)))
    assert [str(v) for v in violations] == ["claims[1].count: must be at least 1"]


def test_an_unknown_mig_profile_is_named() -> None:
    claim = Claim(
        "m",
        DeviceKind.GPU,
        1,
        forms=frozenset({DeviceForm.MIG}),
        mig_profiles=frozenset({"9g.1tb"}),
        min_isolation=Isolation.PARTITIONED,
    )
    violations = validate_request(PlacementRequest(RequestId("r"), TenantName("t"), (claim,)))
    assert [v.field for v in violations] == ["claims[0].mig_profiles[0]"]
    assert "9g.1tb" in violations[0].message


def test_forms_must_meet_the_isolation_asked_for() -> None:
    claim = Claim("v", DeviceKind.NIC, 1, forms=frozenset({DeviceForm.VF}))
    assert fields(PlacementRequest(RequestId("r"), TenantName("t"), (claim,))) == {
        "claims[0].forms"
    }


def test_affinities_must_name_claims_of_the_request() -> None:
    req = PlacementRequest(
        RequestId("r"),
        TenantName("t"),
        (GPU,),
        affinities=(Affinity("gpu", "nic", AffinityScope.SAME_SWITCH, True),),
    )
    assert fields(req) == {"affinities[0].claim_b"}


def test_duplicate_claim_names_and_no_claims() -> None:
    assert fields(PlacementRequest(RequestId("r"), TenantName("t"), (GPU, GPU))) == {
        "claims[1].name"
    }
    assert fields(PlacementRequest(RequestId("r"), TenantName("t"), ())) == {"claims"}
