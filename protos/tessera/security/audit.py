"""The audit log: who did what to which resources, and how it ended, one JSON object a line.

Apart from the debug log (its own logger, never propagated), so an operator
can ship it to its own store and keep it as long as policy says. Each line::

    {"time": "2026-12-06T07:01:02.345Z", "audit": "tessera", "service": "scheduler",
     "who": "spiffe://tessera/tenant/acme", "peer": "ipv4:10.0.0.7:51234",
     "action": "Place", "outcome": "OK", "resources": {"tenant": "acme",
     "request_id": "r1", "placement_id": "pl-...@dgx-07", "host_id": "dgx-07"}}

``outcome`` is the gRPC status code name the caller got (``OK``,
``PERMISSION_DENIED``, ...); ``detail`` adds the reason when it is not OK.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from pythonjsonlogger.json import JsonFormatter

#: Values written to the audit log are cut to this many characters, and lists
#: to this many items: a hostile caller must not be able to grow the log by
#: sending long ids or many of them.
MAX_VALUE = 256
MAX_ITEMS = 16


def _shown(value: object) -> object:
    if isinstance(value, str) and len(value) > MAX_VALUE:
        return value[: MAX_VALUE - 3] + "..."
    if isinstance(value, list | tuple | set | frozenset):
        items = [_shown(v) for v in list(value)[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            items.append(f"... {len(value) - MAX_ITEMS} more")
        return items
    return value


class _UtcFormatter(JsonFormatter):
    def formatTime(  # noqa: N802 - logging's name
        self, record: logging.LogRecord, datefmt: str | None = None
    ) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


class AuditLog:
    """Writes audit records to a file (appended), to stdout (``-``), or nowhere (None).

    Args:
        sink: a path, ``-`` for standard output, or None to keep no audit log.
        service: which process writes (``scheduler``, ``agent``).
    """

    def __init__(self, sink: str | None, service: str) -> None:
        self._service = service
        # A logger of its own, outside logging's registry: it has no parent,
        # so no record can reach the root logger's handlers whatever the
        # process's logging setup, and it goes with this object (a
        # registered logger per audit log, named by id(), was never freed,
        # and a later log reusing the id got the old logger back).
        self._logger = logging.Logger(f"tessera.audit.{service}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._handler: logging.Handler | None = None
        if sink:
            if sink == "-":
                self._handler = logging.StreamHandler(sys.stdout)
            else:
                Path(sink).parent.mkdir(parents=True, exist_ok=True)
                self._handler = logging.FileHandler(sink, encoding="utf-8")
            self._handler.setFormatter(
                _UtcFormatter(
                    ["asctime"],
                    rename_fields={"asctime": "time"},
                    static_fields={"audit": "tessera", "service": service},
                )
            )
            self._logger.addHandler(self._handler)

    @property
    def enabled(self) -> bool:
        """Whether records go anywhere."""
        return self._handler is not None

    def record(
        self,
        *,
        who: str,
        action: str,
        outcome: str,
        resources: Mapping[str, object] | None = None,
        peer: str = "",
        detail: str = "",
    ) -> None:
        """Write one record.

        Args:
            who: the caller's identity (its SPIFFE ID), or what stands for it.
            action: the RPC or job step (``Place``, ``Register``, ``reap``).
            outcome: the status code name the caller got.
            resources: the tenant, placement, request and host ids involved.
            peer: the caller's network address.
            detail: why, when the outcome is not OK.
        """
        if self._handler is None:
            return
        extra: dict[str, object] = {
            "who": _shown(who),
            "peer": _shown(peer),
            "action": action,
            "outcome": outcome,
            "resources": {
                k: _shown(v) for k, v in (resources or {}).items() if v not in ("", None)
            },
        }
        if detail:
            extra["detail"] = _shown(detail)
        self._logger.info("", extra=extra)

    def close(self) -> None:
        """Flush and close the sink."""
        if self._handler is not None:
            self._logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
