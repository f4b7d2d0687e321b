"""The channel to a scheduler: mutual TLS from a directory, and gRPC's own retries.

Retries are gRPC's (the ``retryPolicy`` of a service config, gRFC A6), not a
loop here: gRPC retries a call that failed with UNAVAILABLE after a
randomized exponential backoff (each wait drawn between 0 and the current
backoff, so clients that failed together do not come back together), within
the call's one deadline, and never once the scheduler has started answering
it. Calls that never left the client (no connection yet) are retried
transparently besides. Retry throttling stops retries while calls keep
failing, so an outage is not made worse by every client multiplying its load.

Every retried method is safe to repeat: Place and PlaceBatch are idempotent
on each request's ``request_id`` (the same id always yields the same
placement, and a concurrent duplicate gets the first call's answer);
GetPlacement, ListPlacements, ListHosts and Explain change nothing; a
Release repeated after its answer was lost finds nothing left to release
(NOT_FOUND). The scheduler answers UNAVAILABLE when nothing was done (its
store unreachable) or when a host could not carry the work out and it was
undone, so a retry starts afresh.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

#: The DNS name every scheduler certificate carries, which the client
#: verifies (``tessera.security.identity.SCHEDULER_DNS_NAME``).
SCHEDULER_SERVER_NAME = "scheduler.tessera"
#: The files of a TLS directory, as ``tessera certs`` writes them.
CA_FILE = "ca.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"

SERVICE = "tessera.v1.Scheduler"
#: The Scheduler methods retried on UNAVAILABLE (see the module's docstring
#: for why each is safe to repeat). Host administration is left to the
#: operator's tools.
RETRIED_METHODS = (
    "Place",
    "PlaceBatch",
    "Release",
    "GetPlacement",
    "ListPlacements",
    "ListHosts",
    "Explain",
)


class TlsFilesError(ValueError):
    """A TLS directory that cannot be used; the message names the file."""


@dataclass(frozen=True)
class RetryPolicy:
    """How gRPC retries a call that failed with UNAVAILABLE.

    Attributes:
        max_attempts: attempts in all, the first included (2 to 5: gRPC
            caps it at 5).
        initial_backoff_s: the first wait's upper bound, in seconds.
        max_backoff_s: the largest upper bound, in seconds.
        backoff_multiplier: how the upper bound grows from one wait to the
            next.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be 2 to 5, not {self.max_attempts}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("backoffs must be positive, the initial one at most the largest")
        if self.backoff_multiplier <= 0:
            raise ValueError("backoff_multiplier must be positive")


def service_config(retry: RetryPolicy | None) -> str:
    """The JSON service config: :data:`RETRIED_METHODS` retried by ``retry`` (None: not at all)."""
    config: dict[str, Any] = {}
    if retry is not None:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE, "method": m} for m in RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": retry.max_attempts,
                    "initialBackoff": f"{retry.initial_backoff_s}s",
                    "maxBackoff": f"{retry.max_backoff_s}s",
                    "backoffMultiplier": retry.backoff_multiplier,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
        # gRFC A6's token bucket: each failed attempt takes a token, each
        # success gives one back, and no call is retried while half or fewer
        # are left, so a client whose scheduler is down stops retrying after
        # about ten failures and starts again as calls succeed.
        config["retryThrottling"] = {"maxTokens": 20, "tokenRatio": 1.0}
    return json.dumps(config)


def tls_credentials(tls_dir: Path) -> grpc.ChannelCredentials:
    """Client credentials from a TLS directory: the CA to check the scheduler, our certificate.

    Raises:
        TlsFilesError: a file is missing or unreadable.
    """
    blobs: list[bytes] = []
    for name in (CA_FILE, KEY_FILE, CERT_FILE):
        try:
            blobs.append((tls_dir / name).read_bytes())
        except OSError as err:
            raise TlsFilesError(f"{tls_dir / name}: {err.strerror}") from None
    ca, key, cert = blobs
    return grpc.ssl_channel_credentials(ca, key, cert)


def open_channel(
    target: str,
    *,
    tls_dir: Path | None,
    retry: RetryPolicy | None,
    server_name: str = SCHEDULER_SERVER_NAME,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A blocking channel to a scheduler.

    Args:
        target: ``host:port`` (any gRPC target).
        tls_dir: ``ca.pem``, ``cert.pem`` and ``key.pem``; None for
            plaintext (a development scheduler on loopback).
        retry: the retry policy; None retries only transparently.
        server_name: the name the scheduler's certificate must carry.
        options: more channel options, after these (a later one wins).

    Raises:
        TlsFilesError: the TLS directory cannot be read.
    """
    chosen: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(retry)),
    ]
    if tls_dir is None:
        return grpc.insecure_channel(target, options=[*chosen, *options])
    chosen.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, tls_credentials(tls_dir), options=[*chosen, *options])
