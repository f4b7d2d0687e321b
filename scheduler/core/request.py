"""What a tenant asks for, in domain terms (see protos/tessera/v1/placement.proto)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from tessera.scheduler.core.fast_enum import IdentityHashedEnum
from tessera.scheduler.core.identity import RequestId, TenantName


class DeviceKind(IdentityHashedEnum):
    """The kind of device a claim wants."""

    GPU = "gpu"
    NIC = "nic"
    ACCELERATOR = "accelerator"


class DeviceForm(IdentityHashedEnum):
    """A shape a claim may take."""

    WHOLE_DEVICE = "whole-device"
    VF = "vf"
    MDEV = "mdev"
    MIG = "mig"


class Isolation(enum.IntEnum):
    """Least isolation a claim accepts; a higher value accepts more sharing."""

    EXCLUSIVE = 1
    PARTITIONED = 2
    SHARED = 3


#: The least isolation level at which each form is acceptable.
FORM_ISOLATION: Mapping[DeviceForm, Isolation] = {
    DeviceForm.WHOLE_DEVICE: Isolation.EXCLUSIVE,
    DeviceForm.MIG: Isolation.PARTITIONED,
    DeviceForm.VF: Isolation.SHARED,
    DeviceForm.MDEV: Isolation.SHARED,
}


class NumaPolicy(enum.Enum):
    """Placement of all claims relative to NUMA nodes."""

    NONE = "none"
    PREFERRED = "preferred"
    SINGLE_NUMA_NODE = "single-numa-node"
    SOCKET = "socket"


class AffinityScope(enum.Enum):
    """How close two claims' devices must be."""

    SAME_SWITCH = "same-switch"
    SAME_ROOT_PORT = "same-root-port"
    SAME_NUMA_NODE = "same-numa-node"


class ExclusivityDomain(IdentityHashedEnum):
    """The tenant's exclusive blast radius."""

    NONE = "none"
    DEVICE = "device"
    PCIE_SWITCH = "pcie-switch"
    NUMA_NODE = "numa-node"
    HOST = "host"


@dataclass(frozen=True)
class DeviceSelector:
    """Vendor and model restrictions; empty fields match anything."""

    vendor_id: int = 0
    device_ids: frozenset[int] = frozenset()
    models: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Claim:
    """One thing a request needs."""

    name: str
    kind: DeviceKind
    count: int
    forms: frozenset[DeviceForm] = frozenset({DeviceForm.WHOLE_DEVICE})
    selector: DeviceSelector = DeviceSelector()
    mdev_types: frozenset[str] = frozenset()
    mig_profiles: frozenset[str] = frozenset()
    min_isolation: Isolation = Isolation.EXCLUSIVE
    migratable: bool = False

    def accepted_forms(self) -> frozenset[DeviceForm]:
        """Forms both listed and allowed by the claim's isolation level."""
        return frozenset(f for f in self.forms if FORM_ISOLATION[f] <= self.min_isolation)


@dataclass(frozen=True)
class Affinity:
    """A topology relation between two named claims."""

    claim_a: str
    claim_b: str
    scope: AffinityScope
    required: bool


@dataclass(frozen=True)
class PlacementRequest:
    """A tenant's request for devices on one host."""

    request_id: RequestId
    tenant: TenantName
    claims: tuple[Claim, ...]
    priority: int = 0
    numa_policy: NumaPolicy = NumaPolicy.NONE
    affinities: tuple[Affinity, ...] = ()
    exclusivity: ExclusivityDomain = ExclusivityDomain.NONE
    host_selector: Mapping[str, str] = field(default_factory=dict)
    #: Host CPU the workload needs beside its devices, in thousandths of a CPU.
    cpu_milli: int = 0
    #: Host memory the workload needs beside its devices, in MiB.
    memory_mib: int = 0
