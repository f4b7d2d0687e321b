"""Page tokens come from untrusted callers: a malformed, foreign or stale one names page_token."""

from __future__ import annotations

import base64

import pytest

from tessera.scheduler.core.validation import InvalidRequestError
from tessera.scheduler.service.page_tokens import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    MAX_TOKEN_CHARS,
    Listing,
    encode,
    filters_digest,
    last_key,
    page_size,
)

PLACEMENT = "pl-0123456789abcdef@virt-a"
ACME = filters_digest("acme", "")


def raw(text: str) -> str:
    """A token of any content, encoded as the scheduler encodes its own."""
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def test_a_token_gives_back_the_key_it_was_made_from() -> None:
    token = encode(Listing.PLACEMENTS, ACME, PLACEMENT)
    assert last_key(token, Listing.PLACEMENTS, ACME) == PLACEMENT
    host = encode(Listing.HOSTS, filters_digest(), "dgx-07")
    assert last_key(host, Listing.HOSTS, filters_digest()) == "dgx-07"


def test_no_key_is_no_token_and_no_token_is_the_first_page() -> None:
    assert encode(Listing.PLACEMENTS, ACME, "") == ""
    assert last_key("", Listing.PLACEMENTS, ACME) == ""


def test_the_longest_placement_id_fits_the_token_length_limit() -> None:
    longest = "pl-" + "t" * 200 + "@" + "h" * 52
    assert len(longest) == 256
    token = encode(Listing.PLACEMENTS, ACME, longest)
    assert len(token) <= MAX_TOKEN_CHARS
    assert last_key(token, Listing.PLACEMENTS, ACME) == longest


@pytest.mark.parametrize(
    ("token", "says"),
    [
        ("x" * 20_000, f"must be at most {MAX_TOKEN_CHARS} characters, not 20,000"),
        ("not a token!", "is not a token this scheduler issued"),
        ("abc=", "is not a token this scheduler issued"),  # padding is not sent
        ("a", "is not a token this scheduler issued"),  # not base64 at all
        (raw("\xff\xfe"), "is not a token this scheduler issued"),  # not ASCII
        (raw("t1|placements"), "is not a token this scheduler issued"),
        (raw(f"v9|placements|{ACME}|{PLACEMENT}"), "is not a token this scheduler issued"),
        (raw(f"t2|placements|{ACME}|{PLACEMENT}"), "incompatible scheduler version"),
        (raw(f"t1|hosts|{ACME}|virt-a"), "was issued for hosts, not placements"),
        (raw(f"t1|users|{ACME}|{PLACEMENT}"), "is not a token this scheduler issued"),
        (raw(f"t1|placements|{filters_digest('blue', '')}|{PLACEMENT}"), "other filters"),
        (raw(f"t1|placements|{ACME}|virt-a"), "is not a token"),  # not a placement id
        (raw(f"t1|placements|{ACME}|pl-x@{{evil}}"), "is not a token"),  # odd characters
        (raw(f"t1|placements|{ACME}|"), "is not a token"),
        (raw(f"t1|placements|{ACME}|pl-a|b@virt-a"), "is not a token"),
    ],
)
def test_a_bad_token_is_refused_naming_page_token(token: str, says: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        last_key(token, Listing.PLACEMENTS, ACME)
    [violation] = err.value.violations
    assert violation.field == "page_token"
    assert says in violation.message
    assert len(str(err.value)) < 200  # never echoes the token


@pytest.mark.parametrize(
    ("requested", "size"),
    [(0, DEFAULT_PAGE_SIZE), (1, 1), (MAX_PAGE_SIZE, MAX_PAGE_SIZE), (2**31 - 1, MAX_PAGE_SIZE)],
)
def test_page_size_zero_is_the_default_and_large_ones_are_capped(requested: int, size: int) -> None:
    assert page_size(requested) == size


def test_a_negative_page_size_is_refused_naming_page_size() -> None:
    with pytest.raises(InvalidRequestError) as err:
        page_size(-(2**31))
    [violation] = err.value.violations
    assert violation.field == "page_size" and "must not be negative" in violation.message
