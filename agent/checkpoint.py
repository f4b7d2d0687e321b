"""The agent's on-disk record of what it did to the host, for crash safety.

Before touching the host the agent writes a ``started`` entry; each host
operation of the placement is added to it as a step record (see
``agent.actuation.steps``) before its first write, holding what undoing it
needs (original drivers, the original SR-IOV autoprobe, ...), and marked done
after its last. Once every step is done the entry is marked ``prepared``. A
restart finds any ``started`` entry half done and rolls it back, undoing its
steps in reverse; ``prepared`` entries are adopted. Writes are atomic (temp file, fsync,
rename), so a crash leaves either the old or the new checkpoint, never a torn
one.

Beside the entries the checkpoint keeps a ledger of the objects the agent
created on the host (VFs it enabled, mdevs, MIG partitions), keyed like their
steps (``mdev:<uuid>``, ``mig:<gpu>:<profile>:<start>+<size>``,
``sriov:<pf>``). An object is added to the ledger before the write that
creates it and leaves it only once it is destroyed (or its creation failed), so
at every instant each object the agent created is in the ledger. At start,
after rolling ``started`` entries back, every ledger object that no entry's
step owns is an orphan the agent made and nobody holds: it is destroyed, then
forgotten. Objects the agent did not create (an mdev it adopted, an
operator's GPU instance) never enter the ledger and are never touched. (An
mdev UUID the scheduler derived with uuid5 cannot be told from any other UUID
by looking at it, hence a ledger rather than a namespace test.) The ledger
lives in the same file as the entries, so both change in one atomic write.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import threading
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
        bindings: per device, the JSON form of its original binding. Entries
            written before step records existed hold only these (a whole-group
            bind); newer entries keep every operation in ``steps``.
        placement: the serialized Placement the agent answered with.
        steps: the JSON form of each host operation, in the order carried out.
    """

    placement_id: str
    state: EntryState
    bindings: tuple[Mapping[str, Any], ...]
    placement: bytes
    steps: tuple[Mapping[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "state": self.state,
            "bindings": [dict(b) for b in self.bindings],
            "steps": [dict(s) for s in self.steps],
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
            # Absent from checkpoints written before step records existed.
            steps=tuple(data.get("steps", ())),
        )


class Checkpoint:
    """A JSON file of :class:`CheckpointEntry`, rewritten atomically on every change.

    Thread-safe: the agent carries out operations on different devices at
    once, each changing its own entry; every change and its write to disk
    are one step, so the file always holds the latest of every entry.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.RLock()
        self._entries: dict[str, CheckpointEntry] = {}
        self._created: dict[str, Mapping[str, Any]] = {}
        self._fence = 0
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("version") != _VERSION:
                raise ValueError(f"{path}: unsupported checkpoint version {data.get('version')}")
            self._entries = {
                pid: CheckpointEntry.from_json(pid, e) for pid, e in data["placements"].items()
            }
            # Absent from checkpoints written before the ledger existed.
            self._created = dict(data.get("created", {}))
            self._fence = int(data.get("fence", 0))

    def entries(self) -> dict[str, CheckpointEntry]:
        """Every entry, by placement id."""
        with self._lock:
            return dict(self._entries)

    def get(self, placement_id: str) -> CheckpointEntry | None:
        """One entry, or None."""
        with self._lock:
            return self._entries.get(placement_id)

    def put(
        self,
        entry: CheckpointEntry,
        *,
        remember: Mapping[str, Mapping[str, Any]] | None = None,
        forget: str | None = None,
    ) -> None:
        """Add or replace an entry and persist, with ledger changes in the same write.

        Args:
            entry: the entry.
            remember: created objects to add to (or update in) the ledger.
            forget: a ledger key to drop.
        """
        with self._lock:
            self._entries[entry.placement_id] = entry
            self._created.update({k: dict(v) for k, v in (remember or {}).items()})
            if forget is not None:
                self._created.pop(forget, None)
            self._flush()

    def remove(self, placement_id: str) -> None:
        """Drop an entry (if present) and persist."""
        with self._lock:
            if self._entries.pop(placement_id, None) is not None:
                self._flush()

    @property
    def fence(self) -> int:
        """The highest fencing token a scheduler background job has shown this agent."""
        with self._lock:
            return self._fence

    def raise_fence(self, token: int) -> None:
        """Remember a higher fencing token (persisted before the job's call acts)."""
        with self._lock:
            if token > self._fence:
                self._fence = token
                self._flush()

    def created(self) -> dict[str, Mapping[str, Any]]:
        """The ledger: each object the agent created and has not destroyed, by key."""
        with self._lock:
            return dict(self._created)

    def forget(self, key: str) -> None:
        """Drop an object from the ledger (if there) and persist.

        Called once it is destroyed, or its creation failed.
        """
        with self._lock:
            if self._created.pop(key, None) is not None:
                self._flush()

    def _flush(self) -> None:
        # Called with the lock held: the body and its place on disk are one step.
        self._path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(
            {
                "version": _VERSION,
                "placements": {pid: e.to_json() for pid, e in sorted(self._entries.items())},
                "created": {k: dict(v) for k, v in sorted(self._created.items())},
                "fence": self._fence,
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
