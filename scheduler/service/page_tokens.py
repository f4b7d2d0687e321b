"""Page sizes and page tokens of the paginated lists (ListPlacements, ListHosts).

AIP-158 pagination over a stable order: placements by host id, then placement
id; hosts by host id. A token names the last item of the page it ends, so the
next page starts after that key whatever was added or removed since: no
snapshot is held between calls and a token never expires while its format
holds.

A token is opaque to clients but not secret: it is URL-safe base64 (no
padding) of ``t1|<list>|<filters>|<last key>``, where ``<list>`` says which
RPC issued it and ``<filters>`` is a digest of the request's filters, so a
token cannot be replayed against the other list or other filters (AIP-158:
the other fields of the request must not change between pages). A forged
token can only move where a list starts: every page is read through the
caller's access policy as the first page is. Tokens arrive from untrusted
callers, so :func:`last_key` checks the length before decoding, the alphabet,
the version, the list, the filters and the key's own grammar, and names
``page_token`` in every refusal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum

from tessera.scheduler.core.validation import (
    MAX_IDENT,
    MAX_PLACEMENT_ID,
    InvalidRequestError,
    validate_identifier,
    validate_lookup,
)
from tessera.scheduler.store import schema

#: Items in a page when the request leaves page_size at 0.
DEFAULT_PAGE_SIZE = 500
#: Most items in one page, whatever page_size asks: a page is read, built and
#: sent in one piece.
MAX_PAGE_SIZE = 1000
#: Most bytes of the items of one page. A client refuses a message over 4 MiB
#: by default (grpc.max_receive_message_length) and a placement with its
#: history runs to a few KB, so 1,000 of them could pass it: a page stops
#: early instead, with a token for the rest.
MAX_PAGE_BYTES = 2 * 1024 * 1024

#: The token format's version: a token of another version is refused (list
#: again from the first page) rather than misread.
TOKEN_VERSION = "t1"
#: Longest token accepted, checked before anything is decoded: the encoding
#: of the longest prefix (16 hex digits of filters digest) and key, in base64's
#: 4 characters per 3 bytes.
MAX_TOKEN_CHARS = -(-4 * (len(f"{TOKEN_VERSION}|placements|{'0' * 16}|") + MAX_PLACEMENT_ID) // 3)
#: URL-safe base64 without padding.
_TOKEN_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")
#: ``t<digits>``: a token of this format, of some version.
_VERSION = re.compile(r"t[0-9]{1,4}")

FIELD = "page_token"


class Listing(StrEnum):
    """Which list a token belongs to."""

    PLACEMENTS = "placements"
    HOSTS = "hosts"


@dataclass(frozen=True)
class PageRequest:
    """Where a page starts and how long it may be.

    Attributes:
        size: most items (1 to :data:`MAX_PAGE_SIZE`).
        after: the last key of the previous page; empty for the first page.
    """

    size: int
    after: str = ""


def page_size(requested: int) -> int:
    """The number of items a page holds at most, for a request's page_size.

    Raises:
        InvalidRequestError: a negative size.
    """
    if requested < 0:
        raise InvalidRequestError.of("page_size", f"must not be negative, not {requested:,}")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def filters_digest(*filters: str) -> str:
    """A short digest of a request's filters, which a token carries to be checked against."""
    joined = "\0".join(filters).encode()
    return hashlib.blake2b(joined, digest_size=8).hexdigest()


def encode(listing: Listing, filters: str, last_key: str) -> str:
    """The token that resumes ``listing`` after ``last_key`` (empty key: no token)."""
    if not last_key:
        return ""
    raw = f"{TOKEN_VERSION}|{listing.value}|{filters}|{last_key}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def last_key(token: str, listing: Listing, filters: str) -> str:
    """The key a token resumes after; empty for an empty token (the first page).

    Args:
        token: as the client sent it (untrusted).
        listing: the list being read.
        filters: :func:`filters_digest` of this request's filters.

    Raises:
        InvalidRequestError: naming ``page_token``: too long, not this
            encoding, another version, another list, other filters, or a key
            no item of this list could have.
    """
    if not token:
        return ""
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidRequestError.of(
            FIELD, f"must be at most {MAX_TOKEN_CHARS} characters, not {len(token):,}"
        )
    malformed = InvalidRequestError.of(
        FIELD, "is not a token this scheduler issued; pass next_page_token as it came"
    )
    if not _TOKEN_ALPHABET.fullmatch(token):
        raise malformed
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise malformed from None
    parts = raw.split("|", 3)
    if len(parts) != 4:
        raise malformed
    version, kind, digest, key = parts
    if version != TOKEN_VERSION:
        if _VERSION.fullmatch(version):
            raise InvalidRequestError.of(
                FIELD, "was issued by an incompatible scheduler version; list from the first page"
            )
        raise malformed
    if kind != listing.value:
        if kind in {other.value for other in Listing}:
            raise InvalidRequestError.of(FIELD, f"was issued for {kind}, not {listing.value}")
        raise malformed
    if digest != filters:
        raise InvalidRequestError.of(
            FIELD, "was issued for other filters; keep the filters of the first page"
        )
    if not _key_is_valid(listing, key):
        raise malformed
    return key


def _key_is_valid(listing: Listing, key: str) -> bool:
    """Whether ``key`` is a key ``listing`` orders by (a placement id, a host id)."""
    if listing is Listing.PLACEMENTS:
        return (
            not validate_lookup(placement_id=key)
            and schema.host_of_placement(key) is not None
            and len(key) <= MAX_PLACEMENT_ID
        )
    return not validate_identifier(key, FIELD) and len(key) <= MAX_IDENT
