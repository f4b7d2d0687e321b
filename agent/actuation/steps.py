"""The host changes one placement is carried out by, as checkpoint records.

A placement is prepared as a sequence of steps, one host operation each:
enabling a PF's VFs, binding a group to a VFIO driver, creating an mdev,
creating a MIG partition. Each step is recorded ``started`` (with whatever
undoing it needs, such as the original drivers) before its first write and
``done`` after its last, so a crash anywhere leaves a record from which the
step can be undone exactly; undoing every step in reverse order puts the host
back as it was. Every step's undo is idempotent, because it may run for a
step that did nothing, did half, or was already undone once.

This module is the records only (data and JSON forms); the service runs and
undoes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tessera.agent.actuation.vfio import BindingRecord
from tessera.agent.probes.pci import is_pci_address
from tessera.agent.probes.vfio import VFIO_PCI

StepState = Literal["started", "done"]


@dataclass(frozen=True)
class VfioBind:
    """Endpoints moved to a VFIO driver (a whole group, or one VF's group).

    Attributes:
        bindings: each endpoint's binding before the step.
        driver: the VFIO driver they were bound to.
        pf: for a VF, its PF (so the PF's VFs are known to be in use).
    """

    bindings: tuple[BindingRecord, ...]
    driver: str = VFIO_PCI
    pf: str | None = None

    @property
    def key(self) -> str:
        """What the step acts on, to match it with a record of an earlier attempt."""
        return "vfio:" + ",".join(sorted(b.address for b in self.bindings))


@dataclass(frozen=True)
class SriovEnable:
    """VFs the agent enabled on a PF that had none.

    Attributes:
        pf: the physical function.
        num_vfs: how many VFs were enabled.
        original_autoprobe: ``sriov_drivers_autoprobe`` before the step.
    """

    pf: str
    num_vfs: int
    original_autoprobe: bool

    @property
    def key(self) -> str:
        """What the step acts on."""
        return f"sriov:{self.pf}"


@dataclass(frozen=True)
class MdevCreate:
    """An mdev the placement holds.

    Attributes:
        parent: the parent device.
        type_id: the mdev type.
        uuid: the mdev's UUID.
        created: whether the agent wrote ``create`` for it (False: it existed
            already with this type and was adopted; a rollback leaves it).
    """

    parent: str
    type_id: str
    uuid: str
    created: bool

    @property
    def key(self) -> str:
        """What the step acts on."""
        return f"mdev:{self.uuid}"


@dataclass(frozen=True)
class MigCreate:
    """A MIG partition (one GPU instance and its one compute instance).

    Attributes:
        gpu_uuid: NVML's ``GPU-...`` UUID of the GPU.
        gpu_address: the GPU's PCI address.
        profile_id: the GPU-instance profile ID.
        start: the placement's first memory slice.
        size: the placement's memory slices.
        gi_id: the GPU instance's id once created; -1 before.
        ci_id: the compute instance's id once created; -1 before.
    """

    gpu_uuid: str
    gpu_address: str
    profile_id: int
    start: int
    size: int
    gi_id: int = -1
    ci_id: int = -1

    @property
    def key(self) -> str:
        """What the step acts on."""
        return f"mig:{self.gpu_address}:{self.profile_id}:{self.start}+{self.size}"

    def overlaps(self, other: MigCreate) -> bool:
        """Whether both partitions claim a memory slice of the same GPU."""
        return self.gpu_address == other.gpu_address and (
            self.start < other.start + other.size and other.start < self.start + self.size
        )


Step = VfioBind | SriovEnable | MdevCreate | MigCreate


@dataclass(frozen=True)
class StepRecord:
    """A step and how far it got.

    Attributes:
        step: the operation and what undoing it needs.
        state: ``started`` from before its first host write, ``done`` after
            its last.
    """

    step: Step
    state: StepState = "started"

    def to_dict(self) -> dict[str, Any]:
        """JSON form, for the agent's checkpoint."""
        step = self.step
        body: dict[str, Any]
        if isinstance(step, VfioBind):
            body = {
                "op": "vfio_bind",
                "driver": step.driver,
                "pf": step.pf,
                "bindings": [b.to_dict() for b in step.bindings],
            }
        elif isinstance(step, SriovEnable):
            body = {
                "op": "sriov_enable",
                "pf": step.pf,
                "num_vfs": step.num_vfs,
                "original_autoprobe": step.original_autoprobe,
            }
        elif isinstance(step, MdevCreate):
            body = {
                "op": "mdev_create",
                "parent": step.parent,
                "type_id": step.type_id,
                "uuid": step.uuid,
                "created": step.created,
            }
        else:
            body = {
                "op": "mig_create",
                "gpu_uuid": step.gpu_uuid,
                "gpu_address": step.gpu_address,
                "profile_id": step.profile_id,
                "start": step.start,
                "size": step.size,
                "gi_id": step.gi_id,
                "ci_id": step.ci_id,
            }
        return {"state": self.state, **body}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepRecord:
        """Parse the JSON form.

        Raises:
            ValueError: an unknown operation or state, or a malformed field.
        """
        state = data.get("state")
        if state not in ("started", "done"):
            raise ValueError(f"step record: unknown state {state!r}")
        op = data.get("op")
        try:
            step: Step
            if op == "vfio_bind":
                pf = data.get("pf")
                step = VfioBind(
                    tuple(BindingRecord.from_dict(b) for b in data["bindings"]),
                    _text(data, "driver"),
                    pf if isinstance(pf, str) and is_pci_address(pf) else None,
                )
            elif op == "sriov_enable":
                step = SriovEnable(
                    _address(data, "pf"),
                    _number(data, "num_vfs"),
                    bool(data["original_autoprobe"]),
                )
            elif op == "mdev_create":
                step = MdevCreate(
                    _address(data, "parent"),
                    _text(data, "type_id"),
                    _text(data, "uuid"),
                    bool(data["created"]),
                )
            elif op == "mig_create":
                step = MigCreate(
                    _text(data, "gpu_uuid"),
                    _address(data, "gpu_address"),
                    _number(data, "profile_id"),
                    _number(data, "start"),
                    _number(data, "size"),
                    _number(data, "gi_id"),
                    _number(data, "ci_id"),
                )
            else:
                raise ValueError(f"step record: unknown operation {op!r}")
        except (KeyError, TypeError) as err:
            raise ValueError(f"step record {op}: missing or malformed {err}") from err
        return cls(step, state)


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise TypeError(key)
    return value


def _address(data: Mapping[str, Any], key: str) -> str:
    value = _text(data, key)
    if not is_pci_address(value):
        raise TypeError(key)
    return value


def _number(data: Mapping[str, Any], key: str) -> int:
    value = data[key]
    # bool is an int in Python; a JSON true is no number here.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(key)
    return value
