"""The agent's on-disk record of what it did to the host, for crash safety.

Before touching a device the agent writes a ``started`` entry holding each
device's original driver; once every write succeeded it marks the entry
``prepared``. A restart finds any ``started`` entry half done and rolls it
back; ``prepared`` entries are adopted. Writes are atomic (temp file, fsync,
rename), so a crash leaves either the old or the new checkpoint, never a torn
one.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

EntryState = Literal["started", "prepared"]
_VERSION = 1


@dataclass(frozen=True)
class CheckpointEntry:
    """One placement's host-side record.

    Attributes:
        placement_id: the placement.
        state: ``started`` while devices are being moved, ``prepared`` after.
        bindings: per device, the JSON form of its original binding.
        placement: the serialized Placement the agent answered with.
    """

    placement_id: str
    state: EntryState
    bindings: tuple[Mapping[str, Any], ...]
    placement: bytes

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "state": self.state,
            "bindings": [dict(b) for b in self.bindings],
            "placement": base64.b64encode(self.placement).decode(),
        }

    @classmethod
    def from_json(cls, placement_id: str, data: Mapping[str, Any]) -> CheckpointEntry:
        """Parse the JSON form."""
        state = data["state"]
        if state not in ("started", "prepared"):
            raise ValueError(f"checkpoint entry {placement_id}: unknown state {state!r}")
        return cls(
            placement_id=placement_id,
            state=state,
            bindings=tuple(data["bindings"]),
            placement=base64.b64decode(data["placement"]),
        )


class Checkpoint:
    """A JSON file of :class:`CheckpointEntry`, rewritten atomically on every change."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._entries: dict[str, CheckpointEntry] = {}
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("version") != _VERSION:
                raise ValueError(f"{path}: unsupported checkpoint version {data.get('version')}")
            self._entries = {
                pid: CheckpointEntry.from_json(pid, e) for pid, e in data["placements"].items()
            }

    def entries(self) -> dict[str, CheckpointEntry]:
        """Every entry, by placement id."""
        return dict(self._entries)

    def get(self, placement_id: str) -> CheckpointEntry | None:
        """One entry, or None."""
        return self._entries.get(placement_id)

    def put(self, entry: CheckpointEntry) -> None:
        """Add or replace an entry and persist."""
        self._entries[entry.placement_id] = entry
        self._flush()

    def remove(self, placement_id: str) -> None:
        """Drop an entry (if present) and persist."""
        if self._entries.pop(placement_id, None) is not None:
            self._flush()

    def _flush(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(
            {
                "version": _VERSION,
                "placements": {pid: e.to_json() for pid, e in sorted(self._entries.items())},
            },
            indent=1,
        )
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".checkpoint-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
