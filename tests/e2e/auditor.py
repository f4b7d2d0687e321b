"""An independent auditor of a Tessera cluster: the store and every fake host.

It trusts no scheduler code. It reads the store with raw redis-py commands
(key names from :mod:`scheduler.store.schema`, the only scheduler module it
imports), decodes placements with the wire contract (``tessera.v1``), parses
slot keys with its own reading of their grammar, and reads each fake host tree
directly: driver links, mdev devices, ``sriov_numvfs`` and the fake NVML state
file. It reports:

* **double allocations**: a slot a placement lists that another placement owns;
  one IOMMU group, VF, mdev or MIG memory slice held by two placements; a
  device handed over whole while another placement holds a slice of it; mdevs
  and MIG instances of different placements on one GPU;
* **inconsistencies**: a placement whose slots are not all in the alloc hash
  (owned by it), whose allocations and slots disagree, without a state, whose
  id does not name its host, or whose request record does not name it;
* **leaked on host** (host checks): a device bound to vfio-pci (or a variant),
  an mdev or a MIG GPU instance that belongs to no PENDING, READY or RELEASING
  placement; VFs left enabled on a PF no placement uses;
* **lost acknowledged placements**: ids the caller got READY for, never
  released, absent from the store;
* **leaked slots**: alloc entries whose placement no longer exists, and
  (``final=True``, after every release) anything left at all but claims of
  calls that died before committing.

On a plain server the store is read atomically (one script), so store-only
audits are exact while the cluster runs. On a Redis Cluster
(``redis+cluster://``) one script cannot read keys of several hash slots: each
host is read atomically (its keys share its shard's slot), and the request
records after every host. Every invariant checked is per host, except that
a placement's request record names it: the record lives in another slot, so a
mismatch is confirmed by a re-read (see :func:`_check_records`). Host checks
compare two different instants of host and store: run them when no Place or
Release is in flight (``check_hosts=True``).

Example::

    report = audit(redis_url, {"ws-0": Path(".../hosts/ws-0")}, check_hosts=True)
    assert report.clean, report.text()
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster

from tessera.scheduler.store import schema
from tessera.v1 import placement_pb2

LIVE_STATES = frozenset({"pending", "ready", "releasing"})
KNOWN_STATES = LIVE_STATES | {"failed"}
NVML_STATE = ".tessera-fake-nvml.json"
CLUSTER_SUFFIX = "+cluster"

#: A client of either kind of store the scheduler runs on.
StoreClient = redis.Redis | RedisCluster


def connect(redis_url: str) -> StoreClient:
    """A client of the store at ``redis_url``, as the scheduler reads the URL.

    Args:
        redis_url: ``redis://`` (``rediss://``, ``unix://``) for one server, or
            ``redis+cluster://HOST:PORT`` (``rediss+cluster://``) naming any
            node of a Redis Cluster.

    Returns:
        A ``redis.Redis``, or a ``RedisCluster`` that follows the slot map.
    """
    scheme, sep, rest = redis_url.partition("://")
    if sep and scheme.lower().endswith(CLUSTER_SUFFIX):
        # redis-py reads a cluster's seed node from a plain URL.
        return RedisCluster.from_url(f"{scheme[: -len(CLUSTER_SUFFIX)]}://{rest}")
    return redis.Redis.from_url(redis_url)


@dataclass
class AuditReport:
    """What one audit found; every list empty means a clean cluster."""

    double_allocations: list[str] = field(default_factory=list)
    inconsistent: list[str] = field(default_factory=list)
    leaked_on_host: list[str] = field(default_factory=list)
    lost_acknowledged: list[str] = field(default_factory=list)
    leaked_slots: list[str] = field(default_factory=list)
    placements: int = 0
    alloc_entries: int = 0
    states: dict[str, int] = field(default_factory=dict)
    hosts_checked: bool = False
    # Record mismatches a cluster's re-read showed released meanwhile (no finding).
    released_during_read: int = 0

    @property
    def clean(self) -> bool:
        """True when nothing at all was found."""
        return not (
            self.double_allocations
            or self.inconsistent
            or self.leaked_on_host
            or self.lost_acknowledged
            or self.leaked_slots
        )

    def counts(self) -> dict[str, int]:
        """Number of findings per category."""
        return {
            "double_allocations": len(self.double_allocations),
            "inconsistent": len(self.inconsistent),
            "leaked_on_host": len(self.leaked_on_host),
            "lost_acknowledged": len(self.lost_acknowledged),
            "leaked_slots": len(self.leaked_slots),
        }

    def text(self, limit: int = 20) -> str:
        """A readable summary with the first findings of each category."""
        lines = [f"audit: {self.counts()} placements={self.placements} states={self.states}"]
        for name in self.counts():
            for item in getattr(self, name)[:limit]:
                lines.append(f"  {name}: {item}")
        return "\n".join(lines)


# -- store -------------------------------------------------------------------


def _s(value: Any) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass
class _HostData:
    alloc: dict[str, str]
    payloads: dict[str, bytes]
    slots: dict[str, str]
    requests: dict[str, str]
    states: dict[str, str]
    tenants: dict[str, str]
    registered: bool


@dataclass
class StoreView:
    """Every host's allocation keys and every request record.

    Attributes:
        hosts: host id -> its keys, each host read at one instant.
        requests: request id -> its record.
        atomic: True when everything was read at one instant (a plain
            server); False on a cluster, where each host is its own instant
            and the records were read after every host.
    """

    hosts: dict[str, _HostData]
    requests: dict[str, dict[str, str]]
    atomic: bool = True

    def placement_ids(self) -> set[str]:
        """Every placement id in any host's placements hash."""
        return {pid for h in self.hosts.values() for pid in h.payloads}


# The auditor's own atomic read: one script sees the store at one instant
# (a script on a single server; a cluster refuses its cross-slot keys).
_READ_ALL_LUA = """
local requests = {}
for _, key in ipairs(redis.call('KEYS', ARGV[1])) do
  requests[#requests + 1] = key
  requests[#requests + 1] = redis.call('HGETALL', key)
end
local hosts = {}
for i = 1, #KEYS do
  if i % 7 == 1 then
    hosts[#hosts + 1] = redis.call('EXISTS', KEYS[i])
  else
    hosts[#hosts + 1] = redis.call('HGETALL', KEYS[i])
  end
end
return {requests, hosts}
"""


# One host at one instant: every key of a host carries its shard's hash tag,
# so this script stays in one slot of a cluster. KEYS as _host_keys orders them.
_READ_HOST_LUA = """
local reply = {redis.call('EXISTS', KEYS[1])}
for i = 2, #KEYS do
  reply[#reply + 1] = redis.call('HGETALL', KEYS[i])
end
return reply
"""


def _pairs(flat: list[Any]) -> dict[str, Any]:
    return {_s(k): v for k, v in zip(flat[::2], flat[1::2], strict=True)}


def _host_keys(h: str) -> list[str]:
    """The keys of one host the audit reads, in the order the scripts return them."""
    return [
        schema.host(h),
        schema.alloc(h),
        schema.placements(h),
        schema.placement_slots(h),
        schema.placement_requests(h),
        schema.placement_states(h),
        schema.placement_tenants(h),
    ]


def _host_data(reply: list[Any]) -> _HostData:
    """Decode one host's part of a script's reply (see :func:`_host_keys`)."""
    exists, alloc, payloads, slots, reqs, states, tenants = reply
    return _HostData(
        alloc={k: _s(v) for k, v in _pairs(alloc).items()},
        payloads={k: bytes(v) for k, v in _pairs(payloads).items()},
        slots={k: _s(v) for k, v in _pairs(slots).items()},
        requests={k: _s(v) for k, v in _pairs(reqs).items()},
        states={k: _s(v) for k, v in _pairs(states).items()},
        tenants={k: _s(v) for k, v in _pairs(tenants).items()},
        registered=bool(exists),
    )


def _record(fields: Any) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in (fields or {}).items()}


def read_store(client: StoreClient) -> StoreView:
    """Read the whole store: at one instant on a plain server, host by host on a cluster.

    Args:
        client: from :func:`connect`.

    Returns:
        The view; ``atomic`` says which of the two reads it is.
    """
    host_ids = sorted(_s(h) for h in client.smembers(schema.HOSTS))
    prefix = schema.request("")
    if isinstance(client, RedisCluster):
        # Each host in one script on its slot; the records only after every
        # host (_check_records relies on that order). A record is one key,
        # so each HGETALL reads one record at one instant.
        hosts = {h: _host_data(client.eval(_READ_HOST_LUA, 7, *_host_keys(h))) for h in host_ids}
        records = {
            _s(key)[len(prefix) :]: _record(client.hgetall(_s(key)))
            for key in client.scan_iter(match=schema.request("*"), count=1000)
        }
        return StoreView(hosts=hosts, requests=records, atomic=False)
    keys = [key for h in host_ids for key in _host_keys(h)]
    requests, flat = client.eval(_READ_ALL_LUA, len(keys), *keys, schema.request("*"))
    hosts = {h: _host_data(flat[7 * i : 7 * i + 7]) for i, h in enumerate(host_ids)}
    records = {
        _s(key)[len(prefix) :]: _record(_pairs(fields))
        for key, fields in zip(requests[::2], requests[1::2], strict=True)
    }
    return StoreView(hosts=hosts, requests=records)


# -- slot keys (the auditor's own reading of the grammar) ----------------------


def _slot_of_allocation(a: placement_pb2.ClaimAllocation) -> str | None:
    kind = a.WhichOneof("slot")
    if kind == "whole_device":
        return f"iommu-group:{a.iommu_group}"
    if kind == "vf":
        return f"vf:{a.vf.pf_address}#{a.vf.vf_index}"
    if kind == "mdev":
        return f"mdev:{a.mdev.parent_address}#{a.mdev.type_id}#{a.mdev.uuid}"
    if kind == "mig":
        p = a.mig.placement
        return f"mig:{a.mig.gpu_address}#{a.mig.profile_id}@{p.start}+{p.size}"
    return None


@dataclass
class _Holdings:
    """Physical resources of one host and which placements hold them."""

    groups: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    vfs: dict[tuple[str, int], set[str]] = field(default_factory=lambda: defaultdict(set))
    vf_addresses: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    mdevs: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # device address -> placement holding it whole (every endpoint of its group)
    whole: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # device address -> mode -> placements slicing it (vf / mdev / mig)
    sliced: dict[str, dict[str, set[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(set))
    )
    mig_slices: dict[tuple[str, int], set[str]] = field(default_factory=lambda: defaultdict(set))
    mig_spans: dict[str, set[tuple[int, int]]] = field(default_factory=lambda: defaultdict(set))
    pfs_with_vfs: set[str] = field(default_factory=set)


def _holdings(
    host_id: str, data: _HostData, placements: Mapping[str, placement_pb2.Placement]
) -> _Holdings:
    held = _Holdings()
    for pid, placement in placements.items():
        if data.states.get(pid) not in LIVE_STATES and data.states.get(pid) != "failed":
            continue
        for a in placement.allocations:
            kind = a.WhichOneof("slot")
            if kind == "whole_device":
                held.groups[a.iommu_group].add(pid)
                for address in {a.whole_device.address, *a.whole_device.group_endpoints}:
                    held.whole[address].add(pid)
            elif kind == "vf":
                held.vfs[(a.vf.pf_address, a.vf.vf_index)].add(pid)
                if a.vf.vf_address:
                    # Known once the host enabled the VF (READY); a PENDING
                    # payload has neither the VF address nor its group.
                    held.vf_addresses[a.vf.vf_address].add(pid)
                if a.vf.vf_address and data.states.get(pid) == "ready":
                    # A VF's group number lasts as long as the VF: once torn
                    # down (RELEASING) the kernel may give the number to a VF
                    # enabled for another placement (lowest free, ida_alloc).
                    held.groups[a.iommu_group].add(pid)
                held.sliced[a.vf.pf_address]["vf"].add(pid)
                held.pfs_with_vfs.add(a.vf.pf_address)
            elif kind == "mdev":
                held.mdevs[a.mdev.uuid].add(pid)
                held.sliced[a.mdev.parent_address]["mdev"].add(pid)
            elif kind == "mig":
                p = a.mig.placement
                held.sliced[a.mig.gpu_address]["mig"].add(pid)
                held.mig_spans[a.mig.gpu_address].add((p.start, p.size))
                for s in range(p.start, p.start + p.size):
                    held.mig_slices[(a.mig.gpu_address, s)].add(pid)
    return held


def _check_store(view: StoreView, report: AuditReport) -> dict[str, _Holdings]:
    """Store-only checks; returns each host's holdings for the host checks."""
    holdings: dict[str, _Holdings] = {}
    for h, data in sorted(view.hosts.items()):
        report.placements += len(data.payloads)
        report.alloc_entries += len(data.alloc)
        placements: dict[str, placement_pb2.Placement] = {}
        for pid, payload in data.payloads.items():
            try:
                placements[pid] = placement_pb2.Placement.FromString(payload)
            except Exception as err:  # a corrupted payload is a finding, not a crash
                report.inconsistent.append(f"{h}/{pid}: payload does not decode ({err})")
        for pid in data.payloads:
            state = data.states.get(pid)
            report.states[state or "?"] = report.states.get(state or "?", 0) + 1
            if state not in KNOWN_STATES:
                report.inconsistent.append(f"{h}/{pid}: state {state!r}")
            if schema.host_of_placement(pid) != h:
                report.inconsistent.append(f"{h}/{pid}: the id does not name its host")
            try:
                slots = [str(s) for s in json.loads(data.slots.get(pid, "null"))]
            except (ValueError, TypeError):
                report.inconsistent.append(f"{h}/{pid}: slot list {data.slots.get(pid)!r}")
                continue
            for slot in slots:
                owner = data.alloc.get(slot)
                if owner is None:
                    report.inconsistent.append(f"{h}/{pid}: slot {slot} not in the alloc hash")
                elif owner != pid:
                    # Two placements claim one slot.
                    report.double_allocations.append(
                        f"{h}: slot {slot} listed by {pid} but owned by {owner}"
                    )
            placement = placements.get(pid)
            if placement is not None:
                if placement.placement_id != pid or placement.host_id != h:
                    report.inconsistent.append(
                        f"{h}/{pid}: payload names {placement.host_id}/{placement.placement_id}"
                    )
                for a in placement.allocations:
                    expected = _slot_of_allocation(a)
                    if expected is not None and expected not in slots:
                        report.inconsistent.append(
                            f"{h}/{pid}: allocation {expected} missing from its slot list"
                        )
        for pid in data.slots.keys() - data.payloads.keys():
            report.inconsistent.append(f"{h}/{pid}: slot list of a placement that does not exist")
        for pid in data.states.keys() - data.payloads.keys():
            report.inconsistent.append(f"{h}/{pid}: state of a placement that does not exist")
        for slot, owner in sorted(data.alloc.items()):
            if owner not in data.payloads:
                report.leaked_slots.append(f"{h}: slot {slot} owned by vanished placement {owner}")
        held = _holdings(h, data, placements)
        _check_holdings(h, held, report)
        holdings[h] = held
    return holdings


def _check_holdings(h: str, held: _Holdings, report: AuditReport) -> None:
    def twice(what: str, owners: set[str]) -> None:
        if len(owners) > 1:
            report.double_allocations.append(f"{h}: {what} held by {sorted(owners)}")

    for group, owners in held.groups.items():
        twice(f"IOMMU group {group}", owners)
    for (pf, index), owners in held.vfs.items():
        twice(f"VF {pf}#{index}", owners)
    for address, owners in held.vf_addresses.items():
        twice(f"VF {address}", owners)
    for uuid, owners in held.mdevs.items():
        twice(f"mdev {uuid}", owners)
    for (gpu, s), owners in held.mig_slices.items():
        twice(f"MIG memory slice {s} of {gpu}", owners)
    for address, owners in held.whole.items():
        twice(f"device {address} (whole)", owners)
        slicers = set().union(*held.sliced.get(address, {}).values()) - owners
        if slicers:
            report.double_allocations.append(
                f"{h}: device {address} held whole by {sorted(owners)} and sliced by "
                f"{sorted(slicers)}"
            )
    for address, modes in held.sliced.items():
        if modes.get("mdev") and modes.get("mig"):
            report.double_allocations.append(
                f"{h}: GPU {address} time-sliced by {sorted(modes['mdev'])} and partitioned "
                f"by {sorted(modes['mig'])}"
            )


def _names(record: Mapping[str, str], pid: str, h: str) -> bool:
    return (record.get(schema.F_PLACEMENT_ID), record.get(schema.F_HOST_ID)) == (pid, h)


def _check_records(view: StoreView, client: StoreClient, report: AuditReport) -> None:
    """Each placement's request record names it (the one check across hash slots).

    Committed before finalized, forgotten after released: a request's record
    names a placement for as long as a host holds it. That also catches one
    request committed twice, on one host or two: the record names one of them.

    On a plain server the view is one instant and a mismatch is a finding.
    On a cluster the record (its own slot) was read after the host: the
    placement may have been released in between (the release frees the host,
    then forgets the record), which is no finding. So a mismatch there is
    confirmed by re-reading the record, then the host: placement ids are never
    reused (a new placement gets a new token, a released one is deleted for
    good), so a placement the host held at its first read and holds again
    after the record's re-read held it all along, and the record had to name
    it at both of its reads. What this tolerance cannot see is a mismatch that
    lasts only while the placement is being released (say, a record forgotten
    before the host frees it); the single-server run keeps that exact.
    """
    for h, data in sorted(view.hosts.items()):
        for pid in sorted(data.payloads):
            rid = data.requests.get(pid, "")
            if not rid:
                report.inconsistent.append(f"{h}/{pid}: no request id")
                continue
            record = view.requests.get(rid, {})
            if _names(record, pid, h):
                continue
            if not view.atomic:
                again = _record(client.hgetall(schema.request(rid)))
                if not client.hexists(schema.placements(h), pid):
                    report.released_during_read += 1  # after the host was read
                    continue
                record = {**record, "re-read": json.dumps(again, sort_keys=True)}
            report.inconsistent.append(f"{h}/{pid}: request {rid} record is {record}")


# -- hosts ---------------------------------------------------------------------


def _driver(device: Path) -> str | None:
    link = device / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def is_vfio(driver: str | None) -> bool:
    """vfio-pci or a VFIO variant driver (``mlx5_vfio_pci``)."""
    return driver is not None and (driver == "vfio-pci" or driver.endswith("vfio_pci"))


def _nvml_state(root: Path) -> dict[str, Any] | None:
    path = root / NVML_STATE
    for _ in range(20):
        try:
            state: dict[str, Any] = json.loads(path.read_text())
            return state
        except FileNotFoundError:
            return None
        except ValueError:  # caught mid-write
            time.sleep(0.01)
    raise RuntimeError(f"{path} does not parse")


def _nvml_address(bus_id: str) -> str:
    """``00000000:4B:00.0`` -> ``0000:4b:00.0``."""
    return bus_id[-12:].lower()


@dataclass(frozen=True)
class HostFacts:
    """What a fake host tree holds now: vfio-bound devices, mdevs, GIs, VFs."""

    vfio_devices: dict[str, int | None]  # address -> IOMMU group
    mdevs: set[str]
    gpu_instances: dict[str, list[tuple[int, int, int]]]  # gpu -> (start, size, profile)
    numvfs: dict[str, int]  # PF -> sriov_numvfs


def read_host(root: Path) -> HostFacts:
    """Read one fake host tree."""
    devices = root / "sys" / "bus" / "pci" / "devices"
    vfio: dict[str, int | None] = {}
    numvfs: dict[str, int] = {}
    for device in sorted(devices.iterdir()) if devices.is_dir() else []:
        try:
            if is_vfio(_driver(device)):
                group_link = device / "iommu_group"
                group = (
                    int(os.path.basename(os.readlink(group_link)))
                    if group_link.is_symlink()
                    else None
                )
                vfio[device.name] = group
            count = device / "sriov_numvfs"
            if count.exists():
                numvfs[device.name] = int(count.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):  # a VF removed under us
            continue
    mdev_dir = root / "sys" / "bus" / "mdev" / "devices"
    mdevs = {p.name for p in mdev_dir.iterdir()} if mdev_dir.is_dir() else set()
    instances: dict[str, list[tuple[int, int, int]]] = {}
    state = _nvml_state(root)
    for gpu in (state or {}).get("gpus", []):
        gis = [(int(i["start"]), int(i["size"]), int(i["profile_id"])) for i in gpu["instances"]]
        if gis:
            instances[_nvml_address(str(gpu["bus_id"]))] = gis
    return HostFacts(vfio, mdevs, instances, numvfs)


def _check_host(
    h: str,
    *,
    facts: HostFacts,
    held: _Holdings | None,
    live: set[str],
    baseline_numvfs: Mapping[str, int],
    report: AuditReport,
) -> None:
    held = held or _Holdings()

    def owners_live(owners: Iterable[str]) -> bool:
        return any(o in live for o in owners)

    for address, group in sorted(facts.vfio_devices.items()):
        owners = set(held.whole.get(address, set())) | held.vf_addresses.get(address, set())
        if group is not None:
            owners |= held.groups.get(group, set())
        if not owners_live(owners):
            why = f" (held by {sorted(owners)}, not live)" if owners else ""
            report.leaked_on_host.append(
                f"{h}: {address} (group {group}) bound to vfio with no live placement{why}"
            )
    for uuid in sorted(facts.mdevs):
        if not owners_live(held.mdevs.get(uuid, set())):
            report.leaked_on_host.append(f"{h}: mdev {uuid} belongs to no live placement")
    for gpu, gis in sorted(facts.gpu_instances.items()):
        spans = held.mig_spans.get(gpu, set())
        for start, size, profile in gis:
            owners = held.mig_slices.get((gpu, start), set())
            if (start, size) not in spans or not owners_live(owners):
                report.leaked_on_host.append(
                    f"{h}: GPU instance {gpu} profile {profile} at {start}+{size} belongs to "
                    "no live placement"
                )
    for pf, count in sorted(facts.numvfs.items()):
        if count > baseline_numvfs.get(pf, 0) and not owners_live(held.sliced[pf]["vf"]):
            report.leaked_on_host.append(f"{h}: {count} VFs left enabled on {pf}")


# -- the audit -------------------------------------------------------------------


def audit(
    redis_url: str,
    host_roots: Mapping[str, Path],
    *,
    check_hosts: bool = False,
    acknowledged: Iterable[str] = (),
    release_started: Callable[[], Iterable[str]] | None = None,
    final: bool = False,
    baseline_numvfs: Mapping[str, Mapping[str, int]] | None = None,
) -> AuditReport:
    """Audit the store (and the hosts) once.

    Args:
        redis_url: the store.
        host_roots: host id -> fake host tree root.
        check_hosts: also compare every host tree with the store. Exact only
            when no Place or Release is in flight.
        acknowledged: placement ids the client got READY for and has not
            started to release (taken before the store is read).
        release_started: called after the store read: ids among
            ``acknowledged`` whose release started meanwhile (not lost if gone).
        final: every placement has been released: any placement, slot, index
            key, vfio-bound device, mdev, GPU instance or enabled VF is a leak.
        baseline_numvfs: host -> PF -> VFs enabled before the run.

    Returns:
        The report.
    """
    acked = set(acknowledged)
    report = AuditReport()
    client = connect(redis_url)
    try:
        view = read_store(client)
        released_meanwhile = set(release_started()) if release_started is not None else set()
        holdings = _check_store(view, report)
        _check_records(view, client, report)
    finally:
        client.close()
    live = {
        pid
        for data in view.hosts.values()
        for pid, state in data.states.items()
        if state in LIVE_STATES and pid in data.payloads
    }
    existing = view.placement_ids()
    for pid in sorted(acked - existing - released_meanwhile):
        report.lost_acknowledged.append(f"{pid}: acknowledged READY, never released, not in store")
    for h, data in sorted(view.hosts.items()):
        for pid in sorted(acked & data.payloads.keys()):
            if data.states.get(pid) not in ("ready", "releasing") and pid not in released_meanwhile:
                report.lost_acknowledged.append(
                    f"{h}/{pid}: acknowledged READY, now {data.states.get(pid)}"
                )
    if final:
        for h, data in sorted(view.hosts.items()):
            for slot, owner in sorted(data.alloc.items()):
                report.leaked_slots.append(f"{h}: slot {slot} still owned by {owner}")
            for pid in sorted(data.payloads):
                report.leaked_slots.append(f"{h}/{pid}: placement left ({data.states.get(pid)})")
        for rid, record in sorted(view.requests.items()):
            # A claim whose call died before committing holds nothing (the
            # housekeeper drops it); a committed record must be forgotten by
            # the release of its placement, or by the housekeeper's sweep
            # when the release was cut short.
            if record.get(schema.F_STATE) != schema.CLAIMED:
                report.leaked_slots.append(f"request record {rid} left: {record}")
    if check_hosts or final:
        for h, root in sorted(host_roots.items()):
            facts = read_host(root)
            _check_host(
                h,
                facts=facts,
                held=holdings.get(h),
                live=live,
                baseline_numvfs=(baseline_numvfs or {}).get(h, {}),
                report=report,
            )
        report.hosts_checked = True
    return report
