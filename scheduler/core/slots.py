"""The grammar of slot keys: what one placement holds on a host.

A slot key names one unit of allocation in the store (``tessera:{H}:alloc``
maps it to the owning placement). The engine derives a host's occupancy from
these keys alone, so every key carries what is needed to rebuild it:

* ``iommu-group:<N>``: a whole IOMMU group (whole-device passthrough);
* ``vf:<pf>#<index>``: VF ``index`` of PF ``pf``, which need not exist yet;
* ``mdev:<parent>#<type>#<uuid>``: an mdev of a type, with the UUID the
  scheduler chose so that a retried Prepare creates it once;
* ``mig:<gpu>#<profile id>@<start>+<size>``: a MIG GPU instance at a
  placement, in memory slices;
* ``exclusive:<domain>:<instance>#<request id>``: the request holds the
  domain exclusively for its tenant. Keyed by request so one tenant may hold a
  domain with several placements; the tenant is the owning placement's.
* ``host-share:<cpu milli>,<memory MiB>#<tenant>|<request id>``: host CPU
  and memory the request's workload holds beside its devices (a VM's vCPUs
  and RAM), summed over a host's keys against what the host has. Keyed by
  tenant and request: request ids are each tenant's own, and many tenants
  share one host's CPU (``|`` is in neither, as in the store's request names).

PCI addresses contain ``:`` and ``.``, never ``#``, ``@`` or ``+``, so those
separate fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from tessera.scheduler.core.identity import (
    IommuGroupNumber,
    PciAddress,
    RequestId,
    SlotKey,
    TenantName,
    iommu_group_slot,
)
from tessera.scheduler.core.request import ExclusivityDomain

__all__ = [
    "ExclusiveSlot",
    "GroupSlot",
    "HostShareSlot",
    "MdevSlot",
    "MigSlot",
    "ParsedSlot",
    "VfSlot",
    "exclusive_slot",
    "host_share_slot",
    "iommu_group_slot",
    "mdev_slot",
    "mig_slot",
    "parse_slot",
    "vf_slot",
]


@dataclass(frozen=True)
class GroupSlot:
    """A whole IOMMU group."""

    group: IommuGroupNumber


@dataclass(frozen=True)
class VfSlot:
    """One VF of a PF, by index."""

    pf: PciAddress
    index: int


@dataclass(frozen=True)
class MdevSlot:
    """One mdev of a type on a parent."""

    parent: PciAddress
    type_id: str
    uuid: str


@dataclass(frozen=True)
class MigSlot:
    """One MIG GPU instance at a placement."""

    gpu: PciAddress
    profile_id: int
    start: int
    size: int


@dataclass(frozen=True)
class ExclusiveSlot:
    """A request's hold on an exclusivity domain instance."""

    domain: ExclusivityDomain
    instance: str
    request_id: RequestId


@dataclass(frozen=True)
class HostShareSlot:
    """Host CPU and memory a request's workload holds beside its devices."""

    cpu_milli: int
    memory_mib: int
    tenant: TenantName
    request_id: RequestId


ParsedSlot = GroupSlot | VfSlot | MdevSlot | MigSlot | ExclusiveSlot | HostShareSlot


def vf_slot(pf: PciAddress, index: int) -> SlotKey:
    """Slot key of VF ``index`` of ``pf``."""
    return SlotKey(f"vf:{pf}#{index}")


def mdev_slot(parent: PciAddress, type_id: str, uuid: str) -> SlotKey:
    """Slot key of an mdev."""
    return SlotKey(f"mdev:{parent}#{type_id}#{uuid}")


def mig_slot(gpu: PciAddress, profile_id: int, start: int, size: int) -> SlotKey:
    """Slot key of a MIG GPU instance."""
    return SlotKey(f"mig:{gpu}#{profile_id}@{start}+{size}")


def exclusive_slot(domain: ExclusivityDomain, instance: str, request_id: RequestId) -> SlotKey:
    """Slot key of a request's exclusive hold on a domain instance."""
    return SlotKey(f"exclusive:{domain.value}:{instance}#{request_id}")


def host_share_slot(
    cpu_milli: int, memory_mib: int, tenant: TenantName, request_id: RequestId
) -> SlotKey:
    """Slot key of the host CPU (thousandths) and memory (MiB) a tenant's request holds."""
    return SlotKey(f"host-share:{cpu_milli},{memory_mib}#{tenant}|{request_id}")


@lru_cache(maxsize=1 << 16)
def parse_slot(key: str) -> ParsedSlot | None:
    """The slot a key names, or None for a key this grammar does not know.

    Unknown keys are left to the caller: the engine treats them as opaque
    (held, but tied to no device) rather than failing a whole snapshot.
    """
    kind, sep, rest = key.partition(":")
    if not sep:
        return None
    try:
        if kind == "iommu-group":
            return GroupSlot(IommuGroupNumber(int(rest)))
        if kind == "vf":
            pf, index = rest.split("#")
            return VfSlot(PciAddress(pf), int(index))
        if kind == "mdev":
            parent, type_id, uuid = rest.split("#")
            return MdevSlot(PciAddress(parent), type_id, uuid)
        if kind == "mig":
            gpu, where = rest.split("#")
            profile, span = where.split("@")
            start, size = span.split("+")
            return MigSlot(PciAddress(gpu), int(profile), int(start), int(size))
        if kind == "exclusive":
            domain, _, tail = rest.partition(":")
            instance, request_id = tail.rsplit("#", 1)
            return ExclusiveSlot(ExclusivityDomain(domain), instance, RequestId(request_id))
        if kind == "host-share":
            amounts, _, owner = rest.partition("#")
            cpu, memory = amounts.split(",")
            cpu_milli, memory_mib = int(cpu), int(memory)
            if cpu_milli < 0 or memory_mib < 0:
                return None
            tenant, _, request_id = owner.rpartition("|")
            return HostShareSlot(cpu_milli, memory_mib, TenantName(tenant), RequestId(request_id))
    except ValueError:
        return None
    return None
