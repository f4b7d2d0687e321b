"""Every string and list a client sends is bounded, and error messages echo values cut short.

The outside tester's finding: a 20 KB id came back in full in the status
message, which gRPC carries in trailing metadata, and the client saw
RESOURCE_EXHAUSTED "metadata size exceeds hard limit" instead of the error.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Callable

import pytest

from tessera.scheduler.core.identity import RequestId, TenantName
from tessera.scheduler.core.request import (
    Affinity,
    AffinityScope,
    Claim,
    DeviceForm,
    DeviceKind,
    DeviceSelector,
    Isolation,
    PlacementRequest,
)
from tessera.scheduler.core.validation import (
    MAX_AFFINITIES,
    MAX_BATCH,
    MAX_CLAIM_LIST,
    MAX_CLAIMS,
    MAX_IDENT,
    MAX_REPORTED,
    MAX_SELECTOR_LABELS,
    MAX_TEXT,
    FieldViolation,
    InvalidRequestError,
    shown,
    validate_lookup,
    validate_request,
)
from tessera.scheduler.service.convert import parsed_request, parsed_requests, request_from_proto
from tessera.scheduler.service.servicers import MAX_DETAILS_BYTES, _details
from tessera.v1 import placement_pb2

HUGE = "x" * 20_000
GPU = Claim("gpu", DeviceKind.GPU, 1)
MDEV = Claim(
    "vgpu",
    DeviceKind.GPU,
    1,
    forms=frozenset({DeviceForm.MDEV}),
    mdev_types=frozenset({"nvidia-63"}),
    min_isolation=Isolation.SHARED,
)
MIG = Claim(
    "slice",
    DeviceKind.GPU,
    1,
    forms=frozenset({DeviceForm.MIG}),
    mig_profiles=frozenset({"1g.10gb"}),
    min_isolation=Isolation.PARTITIONED,
)
GOOD = PlacementRequest(
    RequestId("r-1"),
    TenantName("acme"),
    (GPU, MDEV, MIG),
    affinities=(Affinity("gpu", "vgpu", AffinityScope.SAME_NUMA_NODE, False),),
    host_selector={"zone": "a"},
)


def with_claim(index: int, **changes: object) -> PlacementRequest:
    claims = list(GOOD.claims)
    claims[index] = dataclasses.replace(claims[index], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(GOOD, claims=tuple(claims))


def test_the_good_request_is_good() -> None:
    assert validate_request(GOOD) == []


# -- shown ----------------------------------------------------------------------------


def test_shown_keeps_a_short_value_as_its_repr() -> None:
    assert shown("acme") == "'acme'"
    assert shown("a\x00b") == repr("a\x00b")


def test_shown_cuts_a_long_value_and_says_how_long_it_was() -> None:
    assert shown(HUGE) == f"'{'x' * 64}…' (20,000 characters)"
    assert shown("y" * 10, limit=4) == "'yyyy…' (10 characters)"


def test_shown_stays_small_whatever_the_characters() -> None:
    # repr escapes control characters: at most ten characters each.
    assert len(shown("\x00" * 1_000_000)) < 64 * 10 + 40
    assert len(shown("é" * 1_000_000)) < 64 + 40


# -- strings --------------------------------------------------------------------------

OVERLONG: list[tuple[str, Callable[[str], PlacementRequest], str]] = [
    ("request_id", lambda s: dataclasses.replace(GOOD, request_id=RequestId(s)), "request_id"),
    ("tenant", lambda s: dataclasses.replace(GOOD, tenant=TenantName(s)), "tenant"),
    ("claim name", lambda s: with_claim(2, name=s), "claims[2].name"),
    ("mdev type", lambda s: with_claim(1, mdev_types=frozenset({s})), "claims[1].mdev_types[0]"),
    (
        "MIG profile",
        lambda s: with_claim(2, mig_profiles=frozenset({s})),
        "claims[2].mig_profiles[0]",
    ),
    (
        "selector model",
        lambda s: with_claim(0, selector=DeviceSelector(models=frozenset({s}))),
        "claims[0].selector.models[0]",
    ),
    (
        "affinity claim",
        lambda s: dataclasses.replace(
            GOOD, affinities=(Affinity("gpu", s, AffinityScope.SAME_SWITCH, True),)
        ),
        "affinities[0].claim_b",
    ),
    ("label key", lambda s: dataclasses.replace(GOOD, host_selector={s: "a"}), "host_selector"),
    (
        "label value",
        lambda s: dataclasses.replace(GOOD, host_selector={"zone": s}),
        "host_selector['zone']",
    ),
]


@pytest.mark.parametrize(("what", "make", "field"), OVERLONG, ids=[o[0] for o in OVERLONG])
def test_a_20kb_string_is_refused_naming_its_field_in_a_short_message(
    what: str, make: Callable[[str], PlacementRequest], field: str
) -> None:
    violations = validate_request(make(HUGE))
    assert [v.field for v in violations] == [field], what
    assert len(str(violations[0])) < 300


@pytest.mark.parametrize(
    ("make", "limit"),
    [
        (lambda s: dataclasses.replace(GOOD, request_id=RequestId(s)), MAX_IDENT),
        (lambda s: with_claim(2, name=s), MAX_IDENT),
        (lambda s: with_claim(0, selector=DeviceSelector(models=frozenset({s}))), MAX_TEXT),
        (lambda s: dataclasses.replace(GOOD, host_selector={"zone": s}), MAX_TEXT),
    ],
)
def test_the_limits_are_inclusive(make: Callable[[str], PlacementRequest], limit: int) -> None:
    assert validate_request(make("a" * limit)) == []
    assert len(validate_request(make("a" * (limit + 1)))) == 1


def test_pci_ids_are_16_bits() -> None:
    selector = DeviceSelector(vendor_id=0x1_0000, device_ids=frozenset({0x1_0000}))
    assert {v.field for v in validate_request(with_claim(0, selector=selector))} == {
        "claims[0].selector.vendor_id",
        "claims[0].selector.device_ids",
    }


# -- lists ----------------------------------------------------------------------------


def test_each_list_over_its_bound_is_reported_alone_without_looking_at_its_entries() -> None:
    many = tuple(Claim(f"c{i}", DeviceKind.GPU, 0) for i in range(100_000))
    violations = validate_request(dataclasses.replace(GOOD, claims=many))
    # One violation, not one per claim of count 0.
    assert [str(v) for v in violations] == [f"claims: at most {MAX_CLAIMS} entries, not 100,000"]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (
            lambda n: dataclasses.replace(
                GOOD, affinities=(Affinity("gpu", "vgpu", AffinityScope.SAME_SWITCH, True),) * n
            ),
            "affinities",
        ),
        (
            lambda n: dataclasses.replace(GOOD, host_selector={f"k{i}": "v" for i in range(n)}),
            "host_selector",
        ),
        (
            lambda n: with_claim(1, mdev_types=frozenset(f"t{i}" for i in range(n))),
            "claims[1].mdev_types",
        ),
        (
            lambda n: with_claim(0, selector=DeviceSelector(device_ids=frozenset(range(n)))),
            "claims[0].selector.device_ids",
        ),
    ],
)
def test_list_bounds_name_the_list(make: Callable[[int], PlacementRequest], field: str) -> None:
    bound = {"affinities": MAX_AFFINITIES, "host_selector": MAX_SELECTOR_LABELS}.get(
        field, MAX_CLAIM_LIST
    )
    assert [v.field for v in validate_request(make(bound + 1))] == [field]


# -- lookups --------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["placement_id", "request_id", "tenant", "host_id"])
def test_a_lookup_with_a_20kb_id_is_refused_naming_the_field(field: str) -> None:
    violations = validate_lookup(**{field: HUGE})
    assert [v.field for v in violations] == [field]
    assert len(str(violations[0])) < 200


def test_lookups_accept_real_ids_and_absent_ones() -> None:
    assert validate_lookup() == []
    assert validate_lookup(placement_id="pl-0123456789abcdef@" + "h" * MAX_IDENT) == []
    assert validate_lookup(request_id="r-1", tenant="acme", host_id="gpu-7") == []


def test_a_lookup_id_with_odd_characters_is_refused_and_echoed_cut() -> None:
    (violation,) = validate_lookup(request_id="{slot}\n" + "z" * 100)
    assert violation.field == "request_id"
    assert "…" in violation.message and "\n" not in violation.message


# -- the error itself -----------------------------------------------------------------


def test_an_error_reports_a_bounded_number_of_problems_and_counts_the_rest() -> None:
    violations = [FieldViolation(f"claims[{i}].count", "must be at least 1") for i in range(100)]
    err = InvalidRequestError(violations, more=5)
    assert str(err).count("must be at least 1") == MAX_REPORTED
    assert str(err).endswith(f"; and {100 - MAX_REPORTED + 5:,} more problems")
    assert len(err.violations) == 100


# -- the wire -------------------------------------------------------------------------


def wire_claim(**fields: object) -> placement_pb2.Claim:
    return placement_pb2.Claim(name="g", kind=placement_pb2.DEVICE_KIND_GPU, count=1, **fields)  # type: ignore[arg-type]


def test_a_wire_claim_with_100k_unknown_forms_gets_one_violation() -> None:
    msg = placement_pb2.PlacementRequest(
        request_id="r", tenant="t", claims=[wire_claim(forms=[99] * 100_000)]
    )
    with pytest.raises(InvalidRequestError) as err:
        request_from_proto(msg)
    assert [str(v) for v in err.value.violations] == [
        f"claims[0].forms: at most {MAX_CLAIM_LIST} entries, not 100,000"
    ]


def test_duplicates_on_the_wire_count_against_the_bound() -> None:
    # The domain's frozenset would hide them; the wire list is bounded.
    msg = placement_pb2.PlacementRequest(
        request_id="r",
        tenant="t",
        claims=[wire_claim(selector=placement_pb2.DeviceSelector(models=["A100"] * 1000))],
    )
    with pytest.raises(InvalidRequestError) as err:
        request_from_proto(msg)
    assert [v.field for v in err.value.violations] == ["claims[0].selector.models"]


def test_a_20kb_gang_is_refused() -> None:
    msg = placement_pb2.PlacementRequest(
        request_id="r", tenant="t", claims=[wire_claim()], gang=HUGE
    )
    with pytest.raises(InvalidRequestError) as err:
        parsed_request(msg)
    assert [v.field for v in err.value.violations] == ["gang"]


def test_a_batch_of_bad_requests_keeps_a_few_problems_and_counts_the_rest() -> None:
    bad = [placement_pb2.PlacementRequest(request_id=HUGE) for _ in range(1000)]
    with pytest.raises(InvalidRequestError) as err:
        parsed_requests(bad)
    assert len(err.value.violations) == MAX_REPORTED
    assert err.value.more > 1000
    assert len(str(err.value)) < 4000


def test_a_batch_over_its_bound_is_refused_before_any_request_is_read() -> None:
    batch = [placement_pb2.PlacementRequest()] * (MAX_BATCH + 1)
    with pytest.raises(InvalidRequestError) as err:
        parsed_requests(batch)
    assert [v.field for v in err.value.violations] == ["requests"]


# -- status details -------------------------------------------------------------------


def wire_size(details: str) -> int:
    """Bytes of a status message as gRPC sends it (percent-encoded UTF-8)."""
    return len(urllib.parse.quote(details.encode(), safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"))


@pytest.mark.parametrize("text", ["a" * 100_000, "é" * 100_000, "%" * 100_000, "\x00" * 10])
def test_status_details_stay_within_their_cap_on_the_wire(text: str) -> None:
    details = _details(text)
    assert wire_size(details) <= MAX_DETAILS_BYTES
    if len(text) > 10:
        assert "(cut at" in details


def test_short_status_details_are_left_alone() -> None:
    assert _details("claims[0].count: must be at least 1") == "claims[0].count: must be at least 1"


@pytest.mark.parametrize("field", ["request_id", "tenant", "host_id"])
def test_a_trailing_newline_is_not_part_of_an_id(field: str) -> None:
    # Found by the request fuzzer: ``^...$`` matched "virt\n".
    assert [v.field for v in validate_lookup(**{field: "virt\n"})] == [field]
    assert [
        v.field for v in validate_request(dataclasses.replace(GOOD, tenant=TenantName("acme\n")))
    ] == ["tenant"]
