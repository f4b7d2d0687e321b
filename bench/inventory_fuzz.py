"""Inventory fuzzing: thousands of malformed Register calls against a real scheduler.

Starts an embedded Valkey and a scheduler process (plaintext on loopback),
then sends Register calls whose inventories are mutations of the real
discovered fixture hosts (``tests/agent/golden/*.json``): numbers set to 0,
to their type's maximum or to a negative number as it wraps in an unsigned
field; strings made huge, emptied or filled with odd characters; fields and
list entries dropped or duplicated; IOMMU group, physfn, bridge-chain and MIG
profile references broken; bytes of the serialized message flipped and the
result decoded leniently (what still parses is sent); and, so that valid
inventories get through too and reach the engine, VFs enabled, MIG instances
and live mdevs added, consistently or not. Every 50 calls it also sends a
Register body that does not decode at all. Every few hundred calls it asks
ListHosts and Explain (whole GPU, VFs, MIG, mdev), which parse and place on
whatever was accepted.

It reports the answers by status code and checks what must hold:

* no INTERNAL and no UNKNOWN, from Register or from the queries after it;
* every refusal is INVALID_ARGUMENT and its details start with a field path
  under ``inventory.``; an undecodable body is INVALID_ARGUMENT too;
* the scheduler process is alive at the end, and its RSS (VmRSS of
  ``/proc/PID/status``) grew by less than :data:`RSS_BOUND_MIB`;
* the store holds exactly the hosts of accepted inventories, each with the
  inventory last accepted for it (the store's generation rule applied), and
  no key of any host only refused inventories named.

The CI test ``tests/e2e/test_inventory_fuzz_e2e.py`` runs the same code with
:data:`QUICK_CASES` inventories. It is not a part of ``bench/run.py``: it
measures no performance to compare and asserts its outcome, as
``bench/concurrency.py`` does. ``--no-queries`` sends Register alone, which
tells the registry's memory apart from what the engine caches for the hosts
the queries plan on. Results go to ``bench/out/inventory_fuzz.json``::

    .venv/bin/python bench/inventory_fuzz.py [--cases 20000] [--quick] [--seed 0] [--no-queries]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import redis
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

if __package__ in (None, ""):
    # Run as a script: make ``bench`` and the project importable from the root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.protowire import varint
from tessera.scheduler.local_cluster import LocalCluster
from tessera.scheduler.store import schema
from tessera.v1 import inventory_pb2, placement_pb2, scheduler_pb2, scheduler_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "agent" / "golden"
OUT = Path(__file__).parent / "out"

#: Inventories of a full run, and of the CI test and ``--quick``.
FULL_CASES = 20_000
QUICK_CASES = 1_000
#: Most growth of the scheduler's resident memory over a run.
RSS_BOUND_MIB = 200
#: Client threads; each owns its own host ids, so its calls on one host
#: arrive in order and the expected store content is known.
THREADS = 4
#: Host ids per thread: accepted inventories overwrite each other, so the
#: store (and the scheduler's cache of parsed hosts) stays small and the RSS
#: figure measures leaks, not a growing fleet.
HOSTS_PER_THREAD = 8
#: Queries (ListHosts and Explain) after this many calls of each thread.
QUERY_EVERY = 250
#: Besides the inventories, a Register body that is no HostInventory at all
#: (bytes that do not decode) every this many calls: refused before any
#: servicer sees it, counted apart.
RAW_EVERY = 50
#: Where agents would listen: never called, as nothing is placed.
AGENT_ADDRESS = "127.0.0.1:9"
#: Sample problems kept for the report.
MAX_SAMPLES = 20
#: First letter of each client thread's host ids.
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


# -- the real inventories ------------------------------------------------------


def golden_inventories() -> dict[str, inventory_pb2.HostInventory]:
    """The discovered fixture hosts, by name, as their agents would register them.

    The golden files replace the two values that change from run to run
    (boot id, generation) by placeholders; a real boot id and generation
    stand in for them.
    """
    out: dict[str, inventory_pb2.HostInventory] = {}
    for path in sorted(GOLDEN.glob("*.json")):
        data = json.loads(path.read_text())
        data["bootId"] = f"boot-{path.stem}"
        data["generation"] = "1"
        out[path.stem] = json_format.ParseDict(data, inventory_pb2.HostInventory())
    return out


# -- mutations -----------------------------------------------------------------

_UINT32 = (0, 1, 7, 8, 255, 1024, 65_535, 65_536, 99_999, 2**31, 2**32 - 2, 2**32 - 1)
_INT32 = (0, -1, -2, 7, 1024, 99_999, 2**31 - 1, -(2**31))
_UINT64 = (0, 1, 2**42 + 1, 2**63, 2**64 - 2, 2**64 - 1)
_ODD = (
    "\x00",
    "\n",
    "\r\n",
    "\t",
    "\x7f",
    "\u202e",  # right-to-left override
    "\u00a0",
    "\U0001f4a5",
    "%s%n%x",
    "../../etc/passwd",
    "'; DROP TABLE hosts; --",
    "{host}",
    "*",
    "\\",
)

#: One mutation: changes an inventory in place, drawing from ``rng``.
Mutation = Callable[[inventory_pb2.HostInventory, random.Random], None]


def _is_map(fd: FieldDescriptor) -> bool:
    return bool(fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry)


def _fields(msg: Message) -> list[tuple[Message, FieldDescriptor]]:
    """Every (message, field) pair of the tree: scalars, lists and maps, set or not."""
    out: list[tuple[Message, FieldDescriptor]] = []
    stack = [msg]
    while stack:
        m = stack.pop()
        for fd in m.DESCRIPTOR.fields:
            out.append((m, fd))
            if fd.type != FieldDescriptor.TYPE_MESSAGE or _is_map(fd):
                continue
            if fd.is_repeated:
                stack.extend(getattr(m, fd.name))
            elif m.HasField(fd.name):
                stack.append(getattr(m, fd.name))
    return out


def _pick(
    inv: inventory_pb2.HostInventory, rng: random.Random, keep: Callable[[FieldDescriptor], bool]
) -> tuple[Message, FieldDescriptor] | None:
    found = [(m, fd) for m, fd in _fields(inv) if keep(fd)]
    return rng.choice(found) if found else None


def _number(fd: FieldDescriptor, rng: random.Random) -> int:
    if fd.type == FieldDescriptor.TYPE_UINT64:
        return rng.choice((*_UINT64, rng.randrange(2**64)))
    if fd.type == FieldDescriptor.TYPE_INT32:
        return rng.choice((*_INT32, rng.randrange(-(2**31), 2**31)))
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return rng.choice((0, 7, 99, -1, 2**31 - 1))
    return rng.choice((*_UINT32, rng.randrange(2**32)))


def _odd_string(rng: random.Random, near: str) -> str:
    kind = rng.randrange(9)
    if kind == 0:
        return ""
    if kind == 1:
        return "x" * rng.choice((65, 129, 257, 4097, 20_000))
    if kind == 2:
        return rng.choice("ab0:.-") * rng.choice((100_000, 1_000_000))
    if kind == 3:
        return near + rng.choice(_ODD)
    if kind == 4:
        return rng.choice(_ODD) * rng.randint(1, 3)
    if kind == 5:
        return near.upper()
    if kind == 6:
        return near[: rng.randint(0, len(near))]
    if kind == 7:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randint(1, 40)))
    return "".join(rng.choice("0123456789abcdef:.") for _ in range(rng.randint(1, 20)))


def mutate_number(inv: inventory_pb2.HostInventory, rng: random.Random) -> None:
    """A number or enum anywhere set to 0, a maximum, a wrapped negative or a random value."""
    numeric = {
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_ENUM,
    }
    found = _pick(inv, rng, lambda fd: fd.type in numeric)
    if found is None:
        return
    m, fd = found
    if fd.is_repeated:
        values = getattr(m, fd.name)
        if values:
            values[rng.randrange(len(values))] = _number(fd, rng)
        else:
            values.append(_number(fd, rng))
    else:
        setattr(m, fd.name, _number(fd, rng))


def mutate_string(inv: inventory_pb2.HostInventory, rng: random.Random) -> None:
    """A string anywhere (map keys and values too) made huge, empty, odd or slightly off."""
    found = _pick(inv, rng, lambda fd: fd.type == FieldDescriptor.TYPE_STRING or _is_map(fd))
    if found is None:
        return
    m, fd = found
    if _is_map(fd):
        entries = getattr(m, fd.name)
        textual = fd.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_STRING
        if entries and rng.random() < 0.5:
            key = rng.choice(sorted(entries))
            entries[key] = _odd_string(rng, entries[key]) if textual else rng.choice(_UINT32)
        else:
            key = _odd_string(rng, "key")
            entries[key] = _odd_string(rng, "value") if textual else rng.choice(_UINT32)
        return
    if fd.is_repeated:
        values = getattr(m, fd.name)
        if values:
            i = rng.randrange(len(values))
            values[i] = _odd_string(rng, values[i])
        else:
            values.append(_odd_string(rng, ""))
    else:
        setattr(m, fd.name, _odd_string(rng, getattr(m, fd.name)))


def mutate_list(inv: inventory_pb2.HostInventory, rng: random.Random) -> None:
    """An entry of a list dropped or duplicated, a list doubled or cleared, a field cleared."""
    found = _pick(inv, rng, lambda fd: fd.is_repeated or fd.type == FieldDescriptor.TYPE_MESSAGE)
    if found is None:
        return
    m, fd = found
    if not fd.is_repeated or _is_map(fd):
        m.ClearField(fd.name)
        return
    values: Any = getattr(m, fd.name)
    how = rng.randrange(4)
    if how == 0 and values:
        del values[rng.randrange(len(values))]
    elif how == 1 and values:
        item = values[rng.randrange(len(values))]
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            values.add().CopyFrom(item)
        else:
            values.append(item)
    elif how == 2 and values:
        copies = list(values)
        for item in copies:
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                values.add().CopyFrom(item)
            else:
                values.append(item)
    else:
        m.ClearField(fd.name)


def _addresses(inv: inventory_pb2.HostInventory) -> list[str]:
    return [f.address for f in inv.pci_functions]


def mutate_references(inv: inventory_pb2.HostInventory, rng: random.Random) -> None:
    """A cross-reference broken: groups, members, physfn, bridge chains, MIG and mdev ids."""
    fns = list(inv.pci_functions)
    how = rng.randrange(8)
    if how == 0 and inv.iommu_groups:
        # A group some function names disappears.
        del inv.iommu_groups[rng.randrange(len(inv.iommu_groups))]
    elif how == 1 and len(inv.iommu_groups) > 1:
        a, b = rng.sample(range(len(inv.iommu_groups)), 2)
        if inv.iommu_groups[a].members:
            inv.iommu_groups[b].members.append(inv.iommu_groups[a].members.pop())
    elif how == 2 and fns:
        f = rng.choice(fns)
        f.iommu_group = rng.choice((f.iommu_group + 1, 99_999, 0))
        f.has_iommu_group = rng.random() < 0.8
    elif how == 3 and len(fns) > 1:
        # A loop: two functions each below the other (as bridges or not).
        upper, lower = rng.sample(fns, 2)
        upper.bridge_chain[:] = [lower.address]
        lower.bridge_chain[:] = [upper.address]
        if rng.random() < 0.7:
            upper.role = lower.role = inventory_pb2.PCI_ROLE_SWITCH_DOWNSTREAM
    elif how == 4 and fns:
        f = rng.choice(fns)
        f.bridge_chain.append(rng.choice([*_addresses(inv), "0000:ff:1f.7", f.address]))
    elif how == 5 and fns:
        rng.choice(fns).physfn = rng.choice([*_addresses(inv), "0000:ee:00.0"])
    elif how == 6 and inv.gpus:
        gpu = rng.choice(inv.gpus)
        gpu.mig_mode_current = inventory_pb2.MIG_MODE_ENABLED
        gi = gpu.gpu_instances.add(id=rng.randrange(1, 15), profile_id=rng.choice((1, 19, 99)))
        gi.placement.start = rng.choice((0, 3, 7, 8, 2**32 - 1))
        gi.placement.size = rng.choice((0, 1, 2, 8, 2**32 - 1))
    elif how == 7 and inv.mdev_parents:
        parent = rng.choice(inv.mdev_parents)
        parent.instances.add(uuid=str(uuid.UUID(int=rng.getrandbits(128))), type_id="nvidia-0")


def _vf_address(pf: str, offset: int, stride: int, index: int) -> str:
    domain, bus, slot = pf.split(":")
    dev, fn = slot.split(".")
    rid = (int(dev, 16) << 3 | int(fn)) + offset + stride * index
    return f"{domain}:{int(bus, 16) + (rid >> 8):02x}:{(rid & 0xFF) >> 3:02x}.{rid & 7}"


def enable_vfs(inv: inventory_pb2.HostInventory, rng: random.Random) -> None:
    """VFs enabled on a PF as its agent would report them, now and then slightly off."""
    pfs = [pf for pf in inv.sriov_pfs if pf.total_vfs and pf.vf_offset and not pf.num_vfs]
    if not pfs:
        return
    pf = rng.choice(pfs)
    by_address = {f.address: f for f in inv.pci_functions}
    parent = by_address.get(pf.address)
    count = rng.randint(1, min(pf.total_vfs, 8))
    pf.num_vfs = count
    next_group = max((g.number for g in inv.iommu_groups), default=0) + 1
    for index in range(count):
        address = _vf_address(pf.address, pf.vf_offset, pf.vf_stride, index)
        group = next_group + index
        vf = inv.pci_functions.add(
            address=address,
            vendor_id=parent.vendor_id if parent else 0x8086,
            device_id=pf.vf_device_id,
            class_code=parent.class_code if parent else 0x020000,
            numa_node=parent.numa_node if parent else -1,
            physfn=pf.address,
            role=inventory_pb2.PCI_ROLE_ENDPOINT,
            root_bus=parent.root_bus if parent else "",
        )
        if inv.iommu_present:
            vf.iommu_group, vf.has_iommu_group = group, True
            inv.iommu_groups.add(number=group, members=[address])
        entry = pf.vfs.add(index=index, address=address, driver="iavf")
        if inv.iommu_present:
            entry.iommu_group, entry.has_iommu_group = group, True
    if rng.random() < 0.3:
        # Off by one: a VF index or address that the geometry does not give.
        entry = rng.choice(pf.vfs)
        if rng.random() < 0.5:
            entry.index += count
        else:
            entry.address = _vf_address(pf.address, pf.vf_offset + 1, pf.vf_stride, entry.index)


def enable_mig(inv: inventory_pb2.HostInventory, rng: random.Random) -> None:
    """MIG on and GPU instances at the profiles' placements (overlapping now and then)."""
    gpus = [g for g in inv.gpus if g.mig_profiles]
    if not gpus:
        return
    gpu = rng.choice(gpus)
    gpu.mig_mode_current = gpu.mig_mode_pending = inventory_pb2.MIG_MODE_ENABLED
    for gi_id in range(1, rng.randint(1, 3) + 1):
        profile = rng.choice(gpu.mig_profiles)
        if not profile.placements:
            continue
        where = rng.choice(profile.placements)
        gi = gpu.gpu_instances.add(id=gi_id, profile_id=profile.profile_id)
        gi.placement.CopyFrom(where)


def add_mdevs(inv: inventory_pb2.HostInventory, rng: random.Random) -> None:
    """Live mdevs of the parent's own types (or, now and then, of none)."""
    parents = [p for p in inv.mdev_parents if p.types]
    if not parents:
        return
    parent = rng.choice(parents)
    kind = rng.choice(parent.types)
    for _ in range(rng.randint(1, 3)):
        name = str(uuid.UUID(int=rng.getrandbits(128)))
        parent.instances.add(uuid=name, type_id=kind.id)
        kind.instances.append(name)
    if rng.random() < 0.2:
        parent.instances.add(uuid="not-a-uuid", type_id=kind.id)


def flip_bytes(inv: inventory_pb2.HostInventory, rng: random.Random) -> None:
    """Bytes of the serialized message flipped; the first variant that still parses is kept."""
    data = bytearray(inv.SerializeToString())
    if not data:
        return
    for _ in range(8):
        trial = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            trial[rng.randrange(len(trial))] = rng.randrange(256)
        if rng.random() < 0.3:
            del trial[rng.randrange(len(trial)) :]
        parsed = inventory_pb2.HostInventory()
        try:
            parsed.ParseFromString(bytes(trial))
        except DecodeError:
            continue
        inv.CopyFrom(parsed)
        return


#: The catalog, with weights: the generic mutations most, since they reach every field.
MUTATIONS: Mapping[str, tuple[Mutation, int]] = {
    "number": (mutate_number, 5),
    "string": (mutate_string, 5),
    "list": (mutate_list, 4),
    "references": (mutate_references, 4),
    "bytes": (flip_bytes, 2),
    "vfs": (enable_vfs, 2),
    "mig": (enable_mig, 2),
    "mdevs": (add_mdevs, 1),
}


def mutate(
    base: inventory_pb2.HostInventory, rng: random.Random, *, most: int = 3
) -> tuple[inventory_pb2.HostInventory, list[str]]:
    """A mutated copy of ``base``: one to ``most`` mutations drawn by weight.

    Returns:
        The copy and the names of the mutations applied, in order.
    """
    inv = inventory_pb2.HostInventory()
    inv.CopyFrom(base)
    names = list(MUTATIONS)
    weights = [MUTATIONS[n][1] for n in names]
    applied: list[str] = []
    for name in rng.choices(names, weights, k=rng.randint(1, most)):
        trial = inventory_pb2.HostInventory()
        trial.CopyFrom(inv)
        try:
            MUTATIONS[name][0](trial, rng)
        except (ValueError, TypeError, IndexError, KeyError):
            # An earlier mutation left nothing this one can work on (a PF
            # address that is no address, a group number at its maximum, so
            # protobuf refuses the next): it is skipped, the copy kept as is.
            continue
        inv = trial
        applied.append(name)
    return inv, applied


# -- the run -------------------------------------------------------------------


def open_channel(address: str) -> grpc.Channel:
    """The one place the fuzz connects: plaintext on loopback (see :func:`start`).

    A large receive limit: a refusal's details are short, but nothing here
    should fail on the client's side of the wire.
    """
    return grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 24)])


def start(workdir: Path) -> LocalCluster:
    """A Valkey and one scheduler serving plaintext on loopback."""
    cluster = LocalCluster(workdir, tls=False)
    try:
        cluster.start_valkey()
        cluster.start_scheduler()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def rss_mib(pid: int) -> float:
    """VmRSS of a process in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class FuzzResult:
    """What a run saw.

    Attributes:
        cases: Register calls sent.
        register_codes: status code name -> Register answers.
        query_codes: status code name -> ListHosts and Explain answers.
        refused_fields: top-level field of each refusal's first path -> count.
        by_mutation: mutation name -> {"accepted", "refused"} counts.
        problems: what broke a rule, a few samples with their case.
        problem_count: how many rule breaks in all.
        alive: the scheduler process still ran at the end.
        rss_before_mib, rss_after_mib, rss_peak_mib: the scheduler's VmRSS.
        rss_samples: (seconds into the run, VmRSS MiB) at each client's queries.
        store: the store check (hosts expected and found, mismatches).
        wall_s: seconds the calls took.
    """

    cases: int = 0
    register_codes: Counter[str] = field(default_factory=Counter)
    raw_codes: Counter[str] = field(default_factory=Counter)
    query_codes: Counter[str] = field(default_factory=Counter)
    refused_fields: Counter[str] = field(default_factory=Counter)
    by_mutation: dict[str, Counter[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    alive: bool = False
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_samples: list[tuple[float, float]] = field(default_factory=list)
    store: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def problem(self, text: str) -> None:
        """Record a broken rule (from any client thread)."""
        with self._lock:
            self.problem_count += 1
            if len(self.problems) < MAX_SAMPLES:
                self.problems.append(text[:400])

    @property
    def accepted(self) -> int:
        """Register calls answered OK."""
        return self.register_codes.get("OK", 0)

    @property
    def rss_growth_mib(self) -> float:
        """VmRSS after minus before."""
        return self.rss_after_mib - self.rss_before_mib

    def to_json(self) -> dict[str, Any]:
        """The figures, JSON-able."""
        return {
            "cases": self.cases,
            "accepted": self.accepted,
            "register_codes": dict(self.register_codes),
            "raw_codes": dict(self.raw_codes),
            "query_codes": dict(self.query_codes),
            "refused_fields": dict(self.refused_fields.most_common(25)),
            "by_mutation": {k: dict(v) for k, v in sorted(self.by_mutation.items())},
            "problem_count": self.problem_count,
            "problems": self.problems,
            "alive": self.alive,
            "rss_before_mib": round(self.rss_before_mib, 1),
            "rss_after_mib": round(self.rss_after_mib, 1),
            "rss_peak_mib": round(self.rss_peak_mib, 1),
            "rss_growth_mib": round(self.rss_growth_mib, 1),
            "rss_samples_s_mib": self.rss_samples,
            "store": self.store,
            "wall_s": round(self.wall_s, 1),
        }


#: Queries that make the scheduler parse what it accepted and run the engine on it.
QUERIES: tuple[placement_pb2.PlacementRequest, ...] = (
    placement_pb2.PlacementRequest(
        request_id="q-gpu",
        tenant="fuzz",
        claims=[placement_pb2.Claim(name="g", kind=placement_pb2.DEVICE_KIND_GPU, count=1)],
    ),
    placement_pb2.PlacementRequest(
        request_id="q-vf",
        tenant="fuzz",
        claims=[
            placement_pb2.Claim(
                name="v",
                kind=placement_pb2.DEVICE_KIND_NIC,
                count=4,
                forms=[placement_pb2.DEVICE_FORM_VF],
                min_isolation=placement_pb2.ISOLATION_SHARED,
            )
        ],
    ),
    placement_pb2.PlacementRequest(
        request_id="q-mig",
        tenant="fuzz",
        claims=[
            placement_pb2.Claim(
                name="m",
                kind=placement_pb2.DEVICE_KIND_GPU,
                count=2,
                forms=[placement_pb2.DEVICE_FORM_MIG],
                mig_profiles=["1g.10gb", "3g.40gb", "1g.5gb"],
                min_isolation=placement_pb2.ISOLATION_PARTITIONED,
            )
        ],
    ),
    placement_pb2.PlacementRequest(
        request_id="q-mdev",
        tenant="fuzz",
        claims=[
            placement_pb2.Claim(
                name="d",
                kind=placement_pb2.DEVICE_KIND_GPU,
                count=1,
                forms=[placement_pb2.DEVICE_FORM_MDEV],
                mdev_types=["nvidia-63", "nvidia-259"],
                min_isolation=placement_pb2.ISOLATION_SHARED,
            )
        ],
    ),
)


@dataclass
class _Stored:
    """What the store must hold for one host id: the inventory last taken."""

    inventory: inventory_pb2.HostInventory
    boot_id: str
    generation: int


class _Client(threading.Thread):
    """One thread of calls on its own host ids."""

    def __init__(
        self,
        number: int,
        *,
        cases: int,
        seed: int,
        bases: Sequence[inventory_pb2.HostInventory],
        channel: grpc.Channel,
        result: FuzzResult,
        sample_rss: Callable[[], None],
        queries: bool = True,
    ) -> None:
        super().__init__(name=f"fuzz-{number}", daemon=True)
        self.number = number
        self.cases = cases
        self.rng = random.Random(f"{seed}/{number}")
        self.bases = bases
        self.registry = scheduler_pb2_grpc.RegistryStub(channel)
        # The same method without a serializer: raw bytes go out as they are.
        self.raw_register: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/tessera.v1.Registry/Register", request_serializer=None, response_deserializer=None
        )
        self.raw_codes: Counter[str] = Counter()
        self.scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
        self.result = result
        self.sample_rss = sample_rss
        self.queries = queries
        self.expected: dict[str, _Stored] = {}
        self.refused_only: set[str] = set()
        self.codes: Counter[str] = Counter()
        self.query_codes: Counter[str] = Counter()
        self.fields: Counter[str] = Counter()
        self.by_mutation: dict[str, Counter[str]] = {}

    def run(self) -> None:
        for case in range(self.cases):
            try:
                self.one(case)
            except Exception as err:  # a bug of the harness: counted, never silent
                self.result.problem(f"thread {self.number} case {case}: fuzz client error {err!r}")
            if (case + 1) % RAW_EVERY == 0:
                self.raw(case)
            if (case + 1) % QUERY_EVERY == 0:
                if self.queries:
                    self.query()
                self.sample_rss()
        if self.queries:
            self.query()

    def raw(self, case: int) -> None:
        """A Register body that does not decode: must be INVALID_ARGUMENT."""
        data = bytearray(self.rng.choice(self.bases).SerializeToString())
        body = b"\xff\xff\xff\xff"  # a field number of zero with a bad wire type
        for _ in range(16):
            trial = bytearray(data)
            for _ in range(self.rng.randint(1, 8)):
                trial[self.rng.randrange(len(trial))] = self.rng.randrange(256)
            try:
                inventory_pb2.HostInventory.FromString(bytes(trial))
            except DecodeError:
                envelope = scheduler_pb2.RegisterRequest(agent_address=AGENT_ADDRESS)
                # Field 1 (inventory), length-delimited: the bytes that do not decode.
                inventory = b"\x0a" + varint(len(trial)) + bytes(trial)
                body = envelope.SerializeToString() + inventory
                break
        try:
            self.raw_register(body, timeout=60)
        except grpc.RpcError as err:
            self.raw_codes[err.code().name] += 1
            if err.code() is not grpc.StatusCode.INVALID_ARGUMENT:
                self.result.problem(
                    f"thread {self.number} case {case}: an undecodable body answered "
                    f"{err.code().name}: {(err.details() or '')[:200]}"
                )
            return
        self.raw_codes["OK"] += 1
        self.result.problem(f"thread {self.number} case {case}: an undecodable body was accepted")

    def one(self, case: int) -> None:
        base = self.rng.choice(self.bases)
        seeded = inventory_pb2.HostInventory()
        seeded.CopyFrom(base)
        # Each thread's ids start with its own letter: even a mutated id
        # (cut, upper-cased) stays the thread's, so its calls on it are ordered.
        seeded.host_id = f"{_LETTERS[self.number]}fuzz-{self.rng.randrange(HOSTS_PER_THREAD)}"
        seeded.boot_id = f"boot-{self.number}-{case}"
        seeded.generation = case + 1
        inv, applied = mutate(seeded, self.rng)
        try:
            self.registry.Register(
                scheduler_pb2.RegisterRequest(inventory=inv, agent_address=AGENT_ADDRESS),
                timeout=60,
            )
        except grpc.RpcError as err:
            code = err.code()
            details = err.details() or ""
            self.codes[code.name] += 1
            for name in set(applied):
                self.by_mutation.setdefault(name, Counter())["refused"] += 1
            if code is not grpc.StatusCode.INVALID_ARGUMENT or not details.startswith("inventory."):
                self.result.problem(
                    f"thread {self.number} case {case} ({'+'.join(applied)}): Register answered "
                    f"{code.name}: {details[:300]}"
                )
            else:
                self.fields[details.split(":", 1)[0].split("[", 1)[0].split(".")[1]] += 1
            if inv.host_id not in self.expected:
                self.refused_only.add(inv.host_id)
            return
        self.codes["OK"] += 1
        for name in set(applied):
            self.by_mutation.setdefault(name, Counter())["accepted"] += 1
        self.refused_only.discard(inv.host_id)
        old = self.expected.get(inv.host_id)
        # The store's rule (its upsert script): a report of the same boot
        # with a lower generation than the stored one changes nothing.
        # The script compares generations as Lua numbers (doubles).
        stale = old is not None and float(old.generation) > float(inv.generation)
        if old is None or old.boot_id != inv.boot_id or not stale:
            self.expected[inv.host_id] = _Stored(inv, inv.boot_id, inv.generation)

    def query(self) -> None:
        calls: list[tuple[str, Callable[[], object]]] = [
            ("ListHosts", partial(self.scheduler.ListHosts, scheduler_pb2.ListHostsRequest()))
        ]
        calls += [
            (
                f"Explain {request.request_id}",
                partial(self.scheduler.Explain, scheduler_pb2.ExplainRequest(request=request)),
            )
            for request in QUERIES
        ]
        for name, call in calls:
            try:
                call()
                self.query_codes["OK"] += 1
            except grpc.RpcError as err:
                self.query_codes[err.code().name] += 1
                if err.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    self.result.problem(f"{name} answered {err.code().name}: {err.details()}")


def _check_store(url: str, clients: Sequence[_Client]) -> dict[str, Any]:
    """Compare the store with what the accepted calls must have left, and nothing else."""
    expected: dict[str, _Stored] = {}
    refused_only: set[str] = set()
    claimed: Counter[str] = Counter()
    for c in clients:
        expected.update(c.expected)
        refused_only |= c.refused_only
        claimed.update(c.expected.keys())
    # An id two threads both reached (a mutation made it up twice) was
    # written in an order nobody knows: present, but its content unchecked.
    shared = {h for h, n in claimed.items() if n > 1}
    mismatched: list[str] = []
    with redis.Redis.from_url(url) as client:
        members = {m.decode(errors="replace") for m in client.smembers(schema.HOSTS)}
        keys = {k.decode(errors="replace") for k in client.scan_iter(match="tessera:*")}
        for host_id, stored in sorted(expected.items()):
            raw = client.hget(schema.host(host_id), schema.F_INVENTORY)
            got = inventory_pb2.HostInventory.FromString(raw) if raw else None
            if got != stored.inventory and host_id not in shared:
                mismatched.append(host_id)
    # An accepted host brings its shard's change feed, and its guard versions
    # once a report of it changed.
    # The scheduler replicas keep their roster whatever they are sent.
    allowed = {
        schema.HOSTS,
        schema.LAYOUT,
        schema.REPLICAS,
        *(schema.host(h) for h in expected),
        *(schema.versions(h) for h in expected),
        *(key for h in expected for key in schema.feed_keys(h)),
    }
    # Background jobs keep their lease and fence under their own tag.
    unexpected = sorted(k for k in keys - allowed if not k.startswith("tessera:{job:"))
    leaked = sorted(
        h for h in refused_only - set(expected) if schema.host(h) in keys or h in members
    )
    return {
        "hosts_expected": len(expected),
        "hosts_in_index": len(members),
        "index_matches": members == set(expected),
        "inventories_mismatched": mismatched[:MAX_SAMPLES],
        "unexpected_keys": [k[:120] for k in unexpected[:MAX_SAMPLES]],
        "unexpected_key_count": len(unexpected),
        "refused_hosts_in_store": [h[:120] for h in leaked[:MAX_SAMPLES]],
    }


def run_fuzz(
    workdir: Path,
    cases: int = FULL_CASES,
    seed: int = 0,
    threads: int = THREADS,
    *,
    queries: bool = True,
) -> FuzzResult:
    """Start a cluster, send ``cases`` mutated inventories, check the outcome.

    Args:
        workdir: where Valkey and the scheduler keep data and logs.
        cases: Register calls in all (split over the threads).
        seed: makes the inventories reproducible (per thread).
        threads: client threads.
        queries: ask ListHosts and Explain every :data:`QUERY_EVERY` calls
            of each thread (and once at the end); without, only Register
            runs, which tells its memory apart from the engine's caches.
    """
    result = FuzzResult()
    bases = list(golden_inventories().values())
    with start(workdir) as cluster:
        proc = cluster.processes["scheduler"]
        channel = open_channel(cluster.scheduler_address)
        lock = threading.Lock()
        started = time.perf_counter()

        def sample_rss() -> None:
            now = rss_mib(proc.pid)
            with lock:
                result.rss_peak_mib = max(result.rss_peak_mib, now)
                result.rss_samples.append((round(time.perf_counter() - started, 1), round(now, 1)))

        try:
            # One warm-up call of each kind first, so that the baseline is a
            # scheduler that has imported and built what any call needs.
            warm = _Client(
                len(_LETTERS) - 1,
                cases=0,
                seed=seed,
                bases=bases,
                channel=channel,
                result=result,
                sample_rss=sample_rss,
            )
            warm.query()
            result.rss_before_mib = result.rss_peak_mib = rss_mib(proc.pid)
            shares = [cases // threads + (1 if t < cases % threads else 0) for t in range(threads)]
            clients = [
                _Client(
                    t,
                    cases=shares[t],
                    seed=seed,
                    bases=bases,
                    channel=channel,
                    result=result,
                    sample_rss=sample_rss,
                    queries=queries,
                )
                for t in range(threads)
            ]
            started = time.perf_counter()
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            result.wall_s = time.perf_counter() - started
            for c in (warm, *clients):
                result.register_codes.update(c.codes)
                result.raw_codes.update(c.raw_codes)
                result.query_codes.update(c.query_codes)
                result.refused_fields.update(c.fields)
                for name, counts in c.by_mutation.items():
                    result.by_mutation.setdefault(name, Counter()).update(counts)
            result.cases = sum(result.register_codes.values())
            result.alive = proc.poll() is None
            result.rss_after_mib = rss_mib(proc.pid)
            result.rss_peak_mib = max(result.rss_peak_mib, result.rss_after_mib)
            result.store = _check_store(cluster.redis_url, clients)
        finally:
            channel.close()
    return result


def violations(result: FuzzResult) -> list[str]:
    """Every rule the run broke, in words; empty when it is clean."""
    out: list[str] = []
    for code in ("INTERNAL", "UNKNOWN"):
        if result.register_codes.get(code) or result.query_codes.get(code):
            out.append(f"{code} answers: Register {result.register_codes.get(code, 0)}, "
                       f"queries {result.query_codes.get(code, 0)}")  # fmt: skip
    if result.problem_count:
        out.append(f"{result.problem_count} answers broke a rule, e.g. {result.problems[:3]}")
    if not result.alive:
        out.append("the scheduler process died")
    if result.rss_growth_mib > RSS_BOUND_MIB:
        out.append(f"scheduler RSS grew {result.rss_growth_mib:.0f} MiB (bound {RSS_BOUND_MIB})")
    store = result.store
    if not store.get("index_matches"):
        out.append(f"tessera:hosts does not list exactly the accepted hosts: {store}")
    for key in ("inventories_mismatched", "unexpected_keys", "refused_hosts_in_store"):
        if store.get(key):
            out.append(f"store: {key}: {store[key]}")
    return out


def report(result: FuzzResult) -> str:
    """A short human summary."""
    lines = [
        f"{result.cases:,} Register calls in {result.wall_s:.1f} s: "
        f"{result.accepted:,} accepted, answers {dict(result.register_codes.most_common())}",
        f"undecodable Register bodies: {dict(result.raw_codes.most_common())}",
        f"queries (ListHosts, Explain) after them: {dict(result.query_codes.most_common())}",
        "refusals by field: "
        + ", ".join(f"{k} {v:,}" for k, v in result.refused_fields.most_common(10)),
        "by mutation (accepted/refused): "
        + ", ".join(
            f"{k} {v.get('accepted', 0):,}/{v.get('refused', 0):,}"
            for k, v in sorted(result.by_mutation.items())
        ),
        f"scheduler alive: {result.alive}; RSS {result.rss_before_mib:.0f} -> "
        f"{result.rss_after_mib:.0f} MiB (peak {result.rss_peak_mib:.0f}, "
        f"growth {result.rss_growth_mib:+.0f}, bound {RSS_BOUND_MIB}); over the run: "
        + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in _spread(result.rss_samples, 6)),
        f"store: {result.store.get('hosts_expected', 0)} hosts expected, "
        f"{result.store.get('hosts_in_index', 0)} indexed, "
        f"{result.store.get('unexpected_key_count', 0)} unexpected keys, "
        f"mismatched {len(result.store.get('inventories_mismatched', []))}",
    ]
    broken = violations(result)
    lines.append("CLEAN" if not broken else "NOT CLEAN:\n  " + "\n  ".join(broken))
    return "\n".join(lines)


def _spread(samples: Sequence[tuple[float, float]], n: int) -> list[tuple[float, float]]:
    """About ``n`` samples spread over the run, the last one included."""
    if len(samples) <= n:
        return list(samples)
    step = len(samples) / n
    return [samples[int(i * step)] for i in range(n - 1)] + [samples[-1]]


def _machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the fuzz, write JSON, print the report; exit 1 when a rule broke."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--cases", type=int, default=FULL_CASES)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_CASES:,} cases (as CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--no-queries", action="store_true", help="Register only: no ListHosts/Explain")
    p.add_argument("--out", type=Path, default=OUT / "inventory_fuzz.json")
    opts = p.parse_args(argv)
    cases = QUICK_CASES if opts.quick else opts.cases
    with tempfile.TemporaryDirectory(prefix="tessera-fuzz-") as tmp:
        result = run_fuzz(Path(tmp), cases, opts.seed, opts.threads, queries=not opts.no_queries)
    figures = result.to_json()
    figures.update(
        seed=opts.seed, threads=opts.threads, queries=not opts.no_queries, machine=_machine()
    )
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(report(result))
    print(f"written {opts.out}")
    return 1 if violations(result) else 0


if __name__ == "__main__":
    sys.exit(main())
