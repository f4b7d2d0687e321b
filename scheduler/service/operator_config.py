"""What the operator vouches for: which tenants a frontend acts for, which labels a host carries.

Agents say what their hosts are; only the operator may say what they are *for*.
A host label that decides where a tenant lands (``tier=secure``) must not come
from the host itself, or any host could attract any tenant. So the scheduler
reads an operator file (``--operator-config``, YAML)::

    # Tenants each frontend identity may act for (glob patterns).
    frontends:
      portal: ["acme", "team-*"]
    # Labels by host id (glob patterns, applied in file order; later wins).
    host_labels:
      "dgx-*": {tier: gold}
      dgx-07: {tier: quarantine}

Labels under :data:`OPERATOR_PREFIX` come only from this file: an agent
reporting one has it dropped. Labels the operator sets override the agent's
label of the same key.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tessera.scheduler.core.validation import validate_identifier
from tessera.security.identity import IdentityError, check_name
from tessera.v1 import inventory_pb2

log = logging.getLogger(__name__)

#: Label keys only the operator may set.
OPERATOR_PREFIX = "operator.tessera/"

#: Bounds on the file: it is trusted, but a typo must not cost gigabytes.
_MAX_FILE_BYTES = 1 << 20
_MAX_TEXT = 256


class OperatorConfigError(ValueError):
    """An operator config that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class OperatorConfig:
    """The operator's grants and host labels.

    Args:
        frontend_grants: frontend name -> tenant glob patterns.
        host_labels: (host id glob, labels) in file order.
    """

    frontend_grants: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    host_labels: tuple[tuple[str, Mapping[str, str]], ...] = ()

    def labels_for(self, host_id: str) -> dict[str, str]:
        """The labels the operator sets on ``host_id``."""
        out: dict[str, str] = {}
        for pattern, labels in self.host_labels:
            if fnmatch.fnmatchcase(host_id, pattern):
                out.update(labels)
        return out

    def apply(self, inventory: inventory_pb2.HostInventory) -> None:
        """Replace an agent's reserved labels with the operator's, in place."""
        for key in [k for k in inventory.labels if k.startswith(OPERATOR_PREFIX)]:
            log.warning(
                "host %s reported label %r: keys under %s come from the operator only; dropped",
                inventory.host_id,
                key[:64],
                OPERATOR_PREFIX,
            )
            del inventory.labels[key]
        inventory.labels.update(self.labels_for(inventory.host_id))


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str | int | float | bool) or isinstance(value, bool):
        raise OperatorConfigError(f"{where}: must be a string")
    text = str(value)
    if not text or len(text) > _MAX_TEXT or not text.isprintable():
        raise OperatorConfigError(f"{where}: must be 1-{_MAX_TEXT} printable characters")
    return text


def parse_operator_config(body: Any, source: str) -> OperatorConfig:
    """Check and parse the YAML document ``body`` read from ``source``.

    Raises:
        OperatorConfigError: naming ``source`` and the key at fault.
    """
    if body is None:
        return OperatorConfig()
    if not isinstance(body, dict):
        raise OperatorConfigError(f"{source}: must be a mapping with frontends and host_labels")
    unknown = sorted(set(body) - {"frontends", "host_labels"}, key=str)
    if unknown:
        raise OperatorConfigError(f"{source}: unknown key {str(unknown[0])[:64]!r}")
    grants: dict[str, tuple[str, ...]] = {}
    frontends = body.get("frontends") or {}
    if not isinstance(frontends, dict):
        raise OperatorConfigError(f"{source}: frontends: must map frontend names to tenant lists")
    for name, patterns in frontends.items():
        where = f"{source}: frontends.{str(name)[:64]}"
        try:
            check_name(str(name))
        except IdentityError as err:
            raise OperatorConfigError(f"{where}: {err}") from None
        if not isinstance(patterns, list) or not patterns:
            raise OperatorConfigError(f"{where}: must be a non-empty list of tenant patterns")
        grants[str(name)] = tuple(_text(p, f"{where}[{i}]") for i, p in enumerate(patterns))
    labels: list[tuple[str, Mapping[str, str]]] = []
    host_labels = body.get("host_labels") or {}
    if not isinstance(host_labels, dict):
        raise OperatorConfigError(f"{source}: host_labels: must map host patterns to labels")
    for pattern, values in host_labels.items():
        where = f"{source}: host_labels.{str(pattern)[:64]}"
        host = _text(pattern, where)
        if not isinstance(values, dict):
            raise OperatorConfigError(f"{where}: must be a mapping of labels")
        checked: dict[str, str] = {}
        for key, value in values.items():
            key_text = _text(key, f"{where}: label key")
            if violations := validate_identifier(key_text, f"{where}.{key_text[:64]}"):
                raise OperatorConfigError("; ".join(str(v) for v in violations))
            checked[key_text] = _text(value, f"{where}.{key_text[:64]}")
        labels.append((host, checked))
    return OperatorConfig(grants, tuple(labels))


def load_operator_config(path: Path | None) -> OperatorConfig:
    """Read ``--operator-config``; an empty config when ``path`` is None.

    Raises:
        OperatorConfigError: unreadable, too large, not YAML, or invalid.
    """
    if path is None:
        return OperatorConfig()
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_FILE_BYTES + 1)
    except OSError as err:
        raise OperatorConfigError(f"--operator-config {path}: {err.strerror}") from None
    if len(raw) > _MAX_FILE_BYTES:
        raise OperatorConfigError(f"--operator-config {path}: larger than 1 MiB")
    try:
        body = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise OperatorConfigError(f"--operator-config {path}: not YAML ({err})") from None
    return parse_operator_config(body, f"--operator-config {path}")
