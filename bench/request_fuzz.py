"""Request fuzzing: every Scheduler RPC with mutated, invalid, unplaceable and raw random bodies.

The outside tester's fuzzing as a benchmark anyone can rerun. A real cluster
(:class:`LocalCluster`: an embedded Valkey, a scheduler, agents on two fake
hosts) gets, for every method of the Scheduler service (read from the service
descriptor, so a method added later is fuzzed too), requests of four kinds:

* **mutated**: a valid request with one to three random changes anywhere in
  its message tree: strings huge (20 KB, 1 MB), empty or odd (NUL, braces
  that would move a Redis hash tag, right-to-left marks, emoji), integers at
  the ends of their range, enums unknown, lists cleared, duplicated or grown
  far past their bounds, odd map keys, submessages dropped or added empty.
  Valid or not by chance; a valid Place is carried out on a fake host, and
  Release and GetPlacement draw on the placements made so far.
* **invalid**: a valid request with one change that makes it invalid (a 20 KB
  id, a count of 0, a duplicated claim, 33 claims, an unknown enum, ...).
  Must be refused.
* **unplaceable**: Place, PlaceBatch and Explain with valid requests no host
  can take (64 GPUs, a vendor nobody has, a label nobody carries).
* **raw**: random bytes, truncated or corrupted encodings, strings that are not
  UTF-8, sent through a generic call without a serializer. An undecodable body
  must answer INVALID_ARGUMENT; those are counted apart (``raw/undecodable``)
  from the bodies that happen to decode (``raw/decodable``).

Before the fuzzing, on a fresh cluster holding one placement of each shape, a
**burst** of requests that must all be refused (invalid, undecodable,
unplaceable Place, Place reusing a held request id for another request) runs
between two snapshots of every key and value of the store, which must be equal
but for the hosts' heartbeat timestamps.

Acceptance (:func:`failures`): no INTERNAL or UNKNOWN answer; undecodable
bodies INVALID_ARGUMENT; no invalid request accepted; every status message
within the servicer's cap (no client-side "metadata size exceeds" error);
every call answered within its deadline; the burst refused and the store
unchanged by it; the scheduler process alive and answering at the end.

Writes ``bench/out/request_fuzz.json`` and prints a short report; exits 1 if a
check fails. ``run(quick)`` and ``section`` follow ``bench/run.py``'s parts.

    PYTHONPATH=. .venv/bin/python bench/request_fuzz.py [--quick] [--per-rpc N] [--seed S]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message

if __package__ in (None, ""):
    # Run as a script: make ``bench`` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.protowire import varint
from tessera.client.paging import all_placements
from tessera.scheduler.local_cluster import LocalCluster
from tessera.scheduler.service.servicers import MAX_DETAILS_BYTES
from tessera.scheduler.store import schema
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

OUT = Path(__file__).parent / "out"
SEED = 20261124

SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"]

#: Fake hosts: id -> (fixture, GPUs put in MIG mode). virt-2s has every form
#: (VFs, a vGPU parent, an A100 for MIG); the workstation's GPUs share their
#: groups with audio functions.
HOSTS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "virt": ("virt-2s", ("0000:4b:00.0",)),
    "ws": ("gpu-workstation", ()),
}

#: Requests per RPC, and in the refused burst.
FULL_PER_RPC, QUICK_PER_RPC = 20_000, 150
FULL_BURST, QUICK_BURST = 2_000, 120
#: Client threads: enough to keep one scheduler busy on two cores.
CLIENTS = 6
#: A call not answered by then counts as unanswered (a hang is a failure).
DEADLINE_S = 60.0
#: Bodies stay under the server's 4 MiB receive limit: past it gRPC refuses
#: the message before the scheduler sees it, which tests nothing of ours.
MAX_BODY = 3_500_000

#: Strings the mutations draw from. None of them is a registered host id, so
#: an admin method fuzzed generically never acts on a real host.
FUZZ_STRINGS: tuple[str, ...] = (
    "", " ", "a", "acme", "gpu", "nvidia-63", "1g.10gb", "7g.80gb", "r-1",
    "x" * 20_000, "m" * 1_000_000, "y" * 129, "z" * 128, "é" * 300, "ǅ" * 1000,
    "\x00", "a\x00b", "\n\r\t", "{tag}", "}{", "{", "pl-@", "pl-0@{virt}",
    "pl-deadbeefdeadbeef@nowhere", "@", "../../../etc/passwd", "%s%n%x", "%00",
    "' OR '1'='1", "\u202egnp.exe", "😀" * 50, "a b", "*", "tessera:hosts",
    "\\", '"', "\U0010ffff", "-lead",
)  # fmt: skip

#: Ids every lookup must refuse as INVALID_ARGUMENT: too long, or characters
#: no id may hold.
BAD_IDS: tuple[str, ...] = (
    "x" * 20_000, "y" * 300, "a b", "{virt}", "é", "\x00", "-lead", "pl-1@virt\n",
)  # fmt: skip

_INT32 = (0, 1, -1, 33, 64, 65, 2**31 - 1, -(2**31))
_UINT32 = (0, 1, 33, 64, 65, 0xFFFF, 0x10000, 2**32 - 1)
_INT64 = (0, 1, -1, 2**63 - 1, -(2**63))
_UINT64 = (0, 1, 2**64 - 1)
_FLOATS = (0.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e308)
_UNKNOWN_ENUMS = (99, -1, 2**31 - 1)

T = FieldDescriptor  # field type constants


# -- requests ---------------------------------------------------------------------------


def _claim(
    kind: placement_pb2.DeviceKind.ValueType, count: int = 1, **fields: Any
) -> placement_pb2.Claim:
    return placement_pb2.Claim(name="c0", kind=kind, count=count, **fields)


GPU, NIC = placement_pb2.DEVICE_KIND_GPU, placement_pb2.DEVICE_KIND_NIC
SHARED, PARTITIONED = placement_pb2.ISOLATION_SHARED, placement_pb2.ISOLATION_PARTITIONED

#: Requests some host can take (each a list of claims).
PLACEABLE: tuple[Callable[[], list[placement_pb2.Claim]], ...] = (
    lambda: [_claim(GPU)],
    lambda: [
        _claim(NIC, 2, forms=[placement_pb2.DEVICE_FORM_VF], min_isolation=SHARED),
    ],
    lambda: [
        _claim(
            GPU, forms=[placement_pb2.DEVICE_FORM_MDEV], mdev_types=["nvidia-63"],
            min_isolation=SHARED,
        )
    ],
    lambda: [
        _claim(
            GPU, forms=[placement_pb2.DEVICE_FORM_MIG], mig_profiles=["1g.10gb"],
            min_isolation=PARTITIONED,
        )
    ],
    lambda: [
        _claim(GPU),
        placement_pb2.Claim(
            name="c1", kind=NIC, count=1, forms=[placement_pb2.DEVICE_FORM_VF],
            min_isolation=SHARED,
        ),
    ],
)  # fmt: skip

#: Valid requests no host can take.
UNPLACEABLE: tuple[Callable[[], list[placement_pb2.Claim]], ...] = (
    lambda: [_claim(GPU, 64)],
    lambda: [_claim(GPU, selector=placement_pb2.DeviceSelector(vendor_id=0x1234))],
    lambda: [_claim(GPU, selector=placement_pb2.DeviceSelector(models=["No Such GPU"]))],
    lambda: [
        _claim(
            GPU, 8, forms=[placement_pb2.DEVICE_FORM_MIG], mig_profiles=["7g.80gb"],
            min_isolation=PARTITIONED,
        )
    ],
    lambda: [
        _claim(
            GPU, forms=[placement_pb2.DEVICE_FORM_MDEV], mdev_types=["nvidia-999"],
            min_isolation=SHARED,
        )
    ],
    lambda: [_claim(placement_pb2.DEVICE_KIND_ACCELERATOR, 40)],
)  # fmt: skip


def _request(
    rng: random.Random, rid: str, shapes: Sequence[Callable[[], list[placement_pb2.Claim]]]
) -> placement_pb2.PlacementRequest:
    msg = placement_pb2.PlacementRequest(
        request_id=rid, tenant=rng.choice(("acme", "globex")), claims=rng.choice(shapes)()
    )
    if rng.random() < 0.2:
        msg.numa_policy = placement_pb2.NUMA_POLICY_PREFERRED
    if shapes is UNPLACEABLE and rng.random() < 0.2:
        msg.host_selector["zone"] = "nowhere"  # no host carries it
    return msg


def _invalidate(msg: placement_pb2.PlacementRequest, rng: random.Random) -> None:
    """Make a valid request invalid in one way (each is a rule of validation)."""
    c = msg.claims[0]
    how = rng.randrange(22)
    if how == 0:
        msg.request_id = rng.choice(BAD_IDS)
    elif how == 1:
        msg.tenant = rng.choice(("", *BAD_IDS))
    elif how == 2:
        del msg.claims[:]
    elif how == 3:
        c.count = rng.choice((0, 65, 2**32 - 1))
    elif how == 4:
        c.kind = rng.choice((0, 99))  # type: ignore[assignment]
    elif how == 5:
        c.forms.append(rng.choice((0, 99)))  # type: ignore[arg-type]
    elif how == 6:
        c.min_isolation = 77  # type: ignore[assignment]
    elif how == 7:
        msg.claims.add().CopyFrom(c)  # a second claim of the same name
    elif how == 8:
        for i in range(33):
            msg.claims.add(name=f"extra{i}", kind=GPU, count=1)
    elif how == 9:
        c.name = rng.choice(("x" * 20_000, "", "a b"))
    elif how == 10:
        c.forms[:] = [placement_pb2.DEVICE_FORM_MIG]
        c.min_isolation = PARTITIONED
        c.mig_profiles[:] = ["9g.1tb"]
    elif how == 11:
        msg.numa_policy = 99  # type: ignore[assignment]
    elif how == 12:
        msg.exclusivity = -5  # type: ignore[assignment]
    elif how == 13:
        msg.affinities.add(claim_a=c.name, claim_b="ghost", scope=1)
    elif how == 14:
        msg.affinities.add(claim_a=c.name, claim_b=c.name, scope=0)
    elif how == 15:
        msg.host_selector[""] = "x"
    elif how == 16:
        msg.host_selector["zone"] = "v" * 20_000
    elif how == 17:
        msg.gang = "g" * 20_000
    elif how == 18:
        c.selector.vendor_id = 0x10000
    elif how == 19:
        c.mdev_types.extend(f"t{i}" for i in range(17))
    elif how == 20:
        c.forms.extend([placement_pb2.DEVICE_FORM_WHOLE_DEVICE] * 1000)
    else:
        c.selector.models.extend(["A100"] * 17)


# -- the generic mutator ------------------------------------------------------------------


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.type == T.TYPE_MESSAGE and bool(fd.message_type.GetOptions().map_entry)


def _scalar(rng: random.Random, fd: FieldDescriptor) -> Any:
    """A value at an edge of the field's type."""
    kind = fd.type
    if kind == T.TYPE_STRING:
        return rng.choice(FUZZ_STRINGS)
    if kind == T.TYPE_BYTES:
        return rng.randbytes(rng.randrange(64))
    if kind == T.TYPE_BOOL:
        return rng.random() < 0.5
    if kind == T.TYPE_ENUM:
        return rng.choice([v.number for v in fd.enum_type.values] + list(_UNKNOWN_ENUMS))
    if kind in (T.TYPE_INT32, T.TYPE_SINT32, T.TYPE_SFIXED32):
        return rng.choice(_INT32)
    if kind in (T.TYPE_UINT32, T.TYPE_FIXED32):
        return rng.choice(_UINT32)
    if kind in (T.TYPE_INT64, T.TYPE_SINT64, T.TYPE_SFIXED64):
        return rng.choice(_INT64)
    if kind in (T.TYPE_UINT64, T.TYPE_FIXED64):
        return rng.choice(_UINT64)
    return rng.choice(_FLOATS)


def _slots(msg: Message, depth: int = 0) -> list[tuple[Message, FieldDescriptor]]:
    """Every field of the message tree that a mutation may change."""
    out: list[tuple[Message, FieldDescriptor]] = []
    for fd in msg.DESCRIPTOR.fields:
        out.append((msg, fd))
        if depth >= 4 or fd.type != T.TYPE_MESSAGE or _is_map(fd):
            continue
        if fd.is_repeated:
            for child in list(getattr(msg, fd.name))[:4]:
                out += _slots(child, depth + 1)
        elif msg.HasField(fd.name):
            out += _slots(getattr(msg, fd.name), depth + 1)
    return out


def _mutate_field(rng: random.Random, msg: Message, fd: FieldDescriptor) -> None:
    value = getattr(msg, fd.name)
    many = rng.choice((17, 33, 100, 1000))
    if _is_map(fd):
        entry = fd.message_type.fields_by_name
        key_fd, value_fd = entry["key"], entry["value"]
        op = rng.randrange(3)
        if op == 0:
            value.clear()
        elif value_fd.type == T.TYPE_MESSAGE:
            value[_scalar(rng, key_fd)].SetInParent()
        elif op == 1:
            value[_scalar(rng, key_fd)] = _scalar(rng, value_fd)
        else:
            for i in range(many):
                value[f"k{i}" if key_fd.type == T.TYPE_STRING else i] = _scalar(rng, value_fd)
    elif fd.is_repeated:
        op = rng.randrange(4)
        if op == 0:
            del value[:]
        elif fd.type == T.TYPE_MESSAGE:
            if op == 1 and len(value):
                value.add().CopyFrom(value[rng.randrange(len(value))])  # a duplicate
            elif op == 2:
                first = value[0] if len(value) else None
                for _ in range(many):
                    added = value.add()
                    if first is not None:
                        added.CopyFrom(first)
            else:
                _mutate(rng, value.add(), 1)
        elif op == 1 and len(value):
            value.append(value[rng.randrange(len(value))])
        elif op == 2:
            value.extend([_scalar(rng, fd)] * many)
        else:
            value.append(_scalar(rng, fd))
    elif fd.type == T.TYPE_MESSAGE:
        if msg.HasField(fd.name) and rng.random() < 0.5:
            msg.ClearField(fd.name)
        else:
            value.SetInParent()
            _mutate(rng, value, rng.randint(0, 2))
    else:
        setattr(msg, fd.name, _scalar(rng, fd))


def _mutate(rng: random.Random, msg: Message, changes: int) -> None:
    """Apply ``changes`` random changes anywhere in the message tree."""
    for _ in range(changes):
        slots = _slots(msg)
        if slots:
            _mutate_field(rng, *rng.choice(slots))


# -- raw bodies -----------------------------------------------------------------------------


def _raw(rng: random.Random, valid: bytes, cls: type[Message]) -> bytes:
    """Bytes that may or may not decode as ``cls``: random, cut or corrupted."""
    op = rng.randrange(5)
    if op == 0 or not valid:
        return rng.randbytes(rng.choice((1, 2, 3, 8, 16, 64, 256, 4096)))
    if op == 1:
        return valid[: rng.randrange(len(valid))]  # truncated
    if op == 2:
        body = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        return bytes(body)
    if op == 3:
        # A string field whose bytes are not UTF-8 (proto3 requires it), or
        # a field number that does not exist, with a random wire type.
        strings = [f.number for f in cls.DESCRIPTOR.fields if f.type == T.TYPE_STRING]
        number = rng.choice(strings) if strings else rng.randint(1, 2**29 - 1)
        bad = bytes([0xFF, 0xFE, 0xC0, 0x80])[: rng.randint(1, 4)]
        return valid + varint(number << 3 | 2) + varint(len(bad)) + bad
    # Wire types 6 and 7 do not exist; a length past the end of the body.
    return valid + rng.choice((b"\x0e", b"\x0f", b"\x0a\xff\xff\xff\x0f", b"\x08\xff"))


def decodes(cls: type[Message], body: bytes) -> bool:
    """Whether the server can decode ``body`` as ``cls`` (same protobuf runtime)."""
    try:
        cls.FromString(body)
    except DecodeError:
        return False
    return True


# -- probes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One request to send: the method, what kind it is, its body."""

    rpc: str
    kind: str
    body: bytes
    #: Must be refused (any status but OK).
    must_refuse: bool


@dataclass
class Placements:
    """Placement ids the fuzzing made (thread-safe), for Release and GetPlacement to use."""

    ids: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ids: Sequence[str]) -> None:
        """Remember new placement ids (the most recent 1,000)."""
        with self._lock:
            self.ids.extend(i for i in ids if i)
            del self.ids[:-1000]

    def pick(self, rng: random.Random) -> str:
        """A placement id made so far, or a well-formed one that names nothing."""
        with self._lock:
            if self.ids and rng.random() < 0.6:
                return rng.choice(self.ids)
        return f"pl-{rng.randbytes(8).hex()}@{rng.choice(sorted(HOSTS))}"


def input_class(method: MethodDescriptor) -> type[Message]:
    """The message class of a method's request."""
    return message_factory.GetMessageClass(method.input_type)


def _wrap(name: str, request: placement_pb2.PlacementRequest | None) -> Message:
    """A Place or Explain request around a PlacementRequest (or none)."""
    if name == "Place":
        return scheduler_pb2.PlaceRequest(request=request)
    return scheduler_pb2.ExplainRequest(request=request)


def _lookup(name: str, placement_id: str = "", request_id: str = "") -> Message:
    """A Release or GetPlacement request."""
    if name == "Release":
        return scheduler_pb2.ReleaseRequest(placement_id=placement_id, request_id=request_id)
    return scheduler_pb2.GetPlacementRequest(placement_id=placement_id, request_id=request_id)


def _base(
    method: MethodDescriptor, rng: random.Random, rid: str, placements: Placements
) -> Message:
    """A valid request of the method (valid as far as the method can tell without state)."""
    name = method.name
    if name in ("Place", "Explain"):
        return _wrap(name, _request(rng, rid, PLACEABLE))
    if name == "PlaceBatch":
        return scheduler_pb2.PlaceBatchRequest(
            requests=[_request(rng, f"{rid}.{i}", PLACEABLE) for i in range(rng.randint(1, 3))],
            all_or_nothing=rng.random() < 0.3,
        )
    if name in ("Release", "GetPlacement"):
        if rng.random() < 0.8:
            return _lookup(name, placement_id=placements.pick(rng))
        return _lookup(name, request_id=f"{rid}-unknown")
    if name == "ListPlacements":
        return scheduler_pb2.ListPlacementsRequest(
            tenant=rng.choice(("", "acme")), host_id=rng.choice(("", *HOSTS))
        )
    return input_class(method)()  # ListHosts, and any method added later: no fields set


def _invalid(method: MethodDescriptor, rng: random.Random, rid: str) -> Message | None:
    """A request the method must refuse, or None when it has nothing to get wrong."""
    name = method.name
    if name in ("Place", "Explain"):
        request = _request(rng, rid, PLACEABLE)
        _invalidate(request, rng)
        return _wrap(name, request if rng.random() < 0.95 else None)  # or no request at all
    if name == "PlaceBatch":
        requests = [_request(rng, f"{rid}.{i}", PLACEABLE) for i in range(rng.randint(1, 3))]
        op = rng.randrange(3)
        if op == 0:
            _invalidate(requests[-1], rng)
        elif op == 1:
            requests.append(requests[0])  # one request id twice
        else:
            requests = []
        return scheduler_pb2.PlaceBatchRequest(requests=requests)
    if name in ("Release", "GetPlacement"):
        op = rng.randrange(3)
        if op == 0:
            return _lookup(name, placement_id=rng.choice(BAD_IDS))
        if op == 1:
            return _lookup(name, request_id=rng.choice(BAD_IDS))
        return _lookup(name)  # neither id
    if name == "ListPlacements":
        if rng.random() < 0.5:
            return scheduler_pb2.ListPlacementsRequest(tenant=rng.choice(BAD_IDS))
        return scheduler_pb2.ListPlacementsRequest(host_id=rng.choice(BAD_IDS))
    # A method added later: every top-level string (its ids) set to a bad id.
    msg = input_class(method)()
    strings = [f for f in msg.DESCRIPTOR.fields if f.type == T.TYPE_STRING and not f.is_repeated]
    if not strings:
        return None
    for f in strings:
        setattr(msg, f.name, rng.choice(BAD_IDS))
    return msg


def make_probe(
    method: MethodDescriptor, kind: str, rng: random.Random, rid: str, placements: Placements
) -> Probe:
    """One request of a kind ("mutated", "invalid", "unplaceable", "raw") for a method.

    Falls back to "mutated" where the kind does not apply to the method.
    """
    name = method.name
    if kind == "invalid":
        bad = _invalid(method, rng, rid)
        if bad is not None:
            return Probe(name, kind, bad.SerializeToString(), must_refuse=True)
        kind = "raw"
    if kind == "unplaceable" and name in ("Place", "Explain", "PlaceBatch"):
        request = _request(rng, rid, UNPLACEABLE)
        if name == "PlaceBatch":
            body = scheduler_pb2.PlaceBatchRequest(requests=[request]).SerializeToString()
        elif name == "Place":
            body = scheduler_pb2.PlaceRequest(request=request).SerializeToString()
        else:
            body = scheduler_pb2.ExplainRequest(request=request).SerializeToString()
        # Place must refuse; Explain and PlaceBatch answer OK with the reasons.
        return Probe(name, kind, body, must_refuse=name == "Place")
    if kind == "raw":
        valid = _base(method, rng, rid, placements).SerializeToString()
        body = _raw(rng, valid, input_class(method))
        sub = "raw/decodable" if decodes(input_class(method), body) else "raw/undecodable"
        return Probe(name, sub, body, must_refuse=sub == "raw/undecodable")
    for _ in range(8):
        msg = _base(method, rng, rid, placements)
        _mutate(rng, msg, rng.randint(1, 3))
        body = msg.SerializeToString()
        if len(body) <= MAX_BODY:
            return Probe(name, "mutated", body, must_refuse=False)
    return Probe(name, "mutated", _base(method, rng, rid, placements).SerializeToString(), False)


# -- sending and counting ---------------------------------------------------------------------


def _metadata_refused(code: grpc.StatusCode, details: str) -> bool:
    """Whether the client refused the answer's metadata (a status message too large)."""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata" in details.lower()


@dataclass
class Tally:
    """Answers by method, kind and status code; what went wrong, with samples."""

    codes: dict[str, dict[str, Counter[str]]] = field(default_factory=dict)
    max_details_bytes: int = 0
    accepted_invalid: int = 0
    metadata_refused: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, probe: Probe, code: grpc.StatusCode, details: str) -> None:
        """Count one answer; keep a few samples of the answers that matter."""
        size = len(details.encode(errors="replace"))
        bad = code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        bad |= code == grpc.StatusCode.DEADLINE_EXCEEDED
        bad |= probe.must_refuse and code == grpc.StatusCode.OK
        bad |= probe.kind == "raw/undecodable" and code != grpc.StatusCode.INVALID_ARGUMENT
        too_big = _metadata_refused(code, details)
        bad |= size > MAX_DETAILS_BYTES or too_big
        with self._lock:
            by_kind = self.codes.setdefault(probe.rpc, {})
            by_kind.setdefault(probe.kind, Counter())[code.name] += 1
            self.max_details_bytes = max(self.max_details_bytes, size)
            if probe.must_refuse and code == grpc.StatusCode.OK:
                self.accepted_invalid += 1
            self.metadata_refused += too_big
            if bad and len(self.samples) < 40:
                self.samples.append(
                    {
                        "rpc": probe.rpc,
                        "kind": probe.kind,
                        "code": code.name,
                        "details": details[:300],
                        "body_bytes": len(probe.body),
                        "body_head_hex": probe.body[:64].hex(),
                    }
                )

    def total(self) -> int:
        """Requests answered (every code)."""
        return sum(sum(c.values()) for kinds in self.codes.values() for c in kinds.values())

    def by_code(self, kinds: Callable[[str], bool] = lambda _: True) -> Counter[str]:
        """Answers by status code over the kinds selected."""
        out: Counter[str] = Counter()
        for by_kind in self.codes.values():
            for kind, counts in by_kind.items():
                if kinds(kind):
                    out.update(counts)
        return out


def open_channel(cluster: LocalCluster) -> grpc.Channel:
    """The fuzzer's channel to the first scheduler: the cluster's own, as an admin.

    The one place the fuzzer connects: mutual TLS and identities are the
    cluster's business (an admin may call every method, so no answer is a
    PERMISSION_DENIED that would hide what the method itself does).
    """
    return cluster.channel()


def send(
    channel: grpc.Channel,
    probes: Callable[[int], Probe],
    count: int,
    *,
    tally: Tally,
    placements: Placements,
    clients: int = CLIENTS,
) -> None:
    """Send ``count`` probes (``probes(i)`` builds the i-th) from ``clients`` threads."""
    calls: dict[str, grpc.UnaryUnaryMultiCallable[bytes, bytes]] = {
        m.name: channel.unary_unary(
            f"/{SERVICE.full_name}/{m.name}", request_serializer=None, response_deserializer=None
        )
        for m in SERVICE.methods
    }

    def one(i: int) -> None:
        probe = probes(i)
        try:
            answer: bytes = calls[probe.rpc](probe.body, timeout=DEADLINE_S)
        except grpc.RpcError as err:
            tally.record(probe, err.code(), err.details() or "")
            return
        tally.record(probe, grpc.StatusCode.OK, "")
        if probe.rpc == "Place":
            placements.add([scheduler_pb2.PlaceResponse.FromString(answer).placement.placement_id])
        elif probe.rpc == "PlaceBatch":
            batch = scheduler_pb2.PlaceBatchResponse.FromString(answer)
            placements.add([p.placement_id for p in batch.placements])

    with ThreadPoolExecutor(max_workers=clients) as pool:
        # Consume the results so an exception of the harness itself surfaces.
        for _ in pool.map(one, range(count)):
            pass


# -- the store ----------------------------------------------------------------------------


def store_contents(url: str) -> dict[bytes, Any]:
    """Every key of the store with its value, read per type.

    The hosts' ``last_heartbeat_ms`` is left out: heartbeats go on during the
    burst and are no request's doing; so are the ``fence:<job>`` fields, which
    the reaper raises on every host in its first round as leader, whenever
    that falls; and the replica roster's scores, each replica's membership
    deadline, renewed every few seconds. TTLs are left out too (the reaper's
    lease is renewed with the same value).
    """
    client = redis.Redis.from_url(url)
    out: dict[bytes, Any] = {}
    try:
        for key in sorted(client.scan_iter(count=1000)):
            kind = client.type(key)
            value: Any
            if kind == b"string":
                value = client.get(key)
            elif kind == b"hash":
                value = client.hgetall(key)
                if key.endswith(b":host"):
                    value.pop(b"last_heartbeat_ms", None)
                    for field in [f for f in value if f.startswith(b"fence:")]:
                        del value[field]
            elif kind == b"set":
                value = sorted(client.smembers(key))
            elif kind == b"list":
                value = client.lrange(key, 0, -1)
            elif kind == b"zset" and key == schema.REPLICAS.encode():
                value = client.zrange(key, 0, -1)  # who, not until when
            elif kind == b"zset":
                value = client.zrange(key, 0, -1, withscores=True)
            else:
                value = client.dump(key)
            out[key] = (kind, value)
    finally:
        client.close()
    return out


def changed_keys(before: Mapping[bytes, Any], after: Mapping[bytes, Any]) -> list[str]:
    """Keys added, removed or changed between two snapshots; a hash's changed fields named."""
    out: list[str] = []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        name = key.decode(errors="replace")
        if old is not None and new is not None and old[0] == new[0] == b"hash":
            fields = {f for f in old[1].keys() | new[1].keys() if old[1].get(f) != new[1].get(f)}
            name += "[" + ",".join(sorted(f.decode(errors="replace") for f in fields)) + "]"
        elif old is None or new is None:
            name += " (added)" if old is None else " (removed)"
        out.append(name)
    return out


# -- the run ----------------------------------------------------------------------------


def start_cluster(workdir: Path) -> LocalCluster:
    """Valkey, a scheduler and an agent per fake host of :data:`HOSTS`, all registered."""
    cluster = LocalCluster(workdir)
    try:
        cluster.start_valkey()
        cluster.start_scheduler()
        for host_id, (fixture, mig) in HOSTS.items():
            cluster.start_agent(host_id, cluster.build_fake_host(fixture, host_id, mig=mig))
        cluster.wait_for_hosts(set(HOSTS))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _hold_placements(channel: grpc.Channel, seed: int) -> list[str]:
    """Place one request of each placeable shape; the request ids that were placed."""
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    held: list[str] = []
    for i, shape in enumerate(PLACEABLE):
        rid = f"held-{seed}-{i}"
        request = placement_pb2.PlacementRequest(request_id=rid, tenant="acme", claims=shape())
        try:
            stub.Place(scheduler_pb2.PlaceRequest(request=request), timeout=DEADLINE_S)
        except grpc.RpcError:
            continue  # no room for this shape: the others still fill the store
        held.append(rid)
    return held


def _settled_contents(url: str, timeout_s: float = 60) -> dict[bytes, Any]:
    """The store's contents once three reads a second apart agree.

    A placement changes its host (drivers, VFs, mdevs), and the agent reports
    the new inventory soon after: the burst starts once those reports are in
    (an agent's heartbeat interval is 5 s; the change is reported at once).
    """
    previous, stable = store_contents(url), 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and stable < 2:
        time.sleep(1.0)
        current = store_contents(url)
        stable = stable + 1 if current == previous else 0
        previous = current
    return previous


def _wait_for_housekeeper(url: str, timeout_s: float = 30) -> None:
    """Block until the reaper's lease exists: its first acquisition writes the store."""
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if client.exists("tessera:{job:reaper}:fence"):
                return
            time.sleep(0.1)
    finally:
        client.close()


def _kind(rng: random.Random) -> str:
    """The kind of a fuzzing request: mostly mutations, then invalid, unplaceable, raw."""
    roll = rng.random()
    if roll < 0.40:
        return "mutated"
    if roll < 0.60:
        return "invalid"
    if roll < 0.75:
        return "unplaceable"
    return "raw"


def fuzz(cluster: LocalCluster, per_rpc: int, burst: int, seed: int = SEED) -> dict[str, Any]:
    """The burst, then ``per_rpc`` requests to every Scheduler method; the figures.

    Args:
        cluster: a started cluster (see :func:`start_cluster`), fresh: the
            burst's store comparison needs a store nothing else writes to.
        per_rpc: requests to each method in the fuzzing phase.
        burst: requests in the refused burst (spread over the methods).
        seed: every request is drawn from ``(seed, phase, method, index)``.
    """
    methods = list(SERVICE.methods)
    placements = Placements()
    started = time.perf_counter()
    channel = open_channel(cluster)
    try:
        # 1. The refused burst, on a fresh cluster holding a few placements
        # (so that slots, placements and request records are in the store to
        # be left alone), once the hosts have reported what those changed.
        _wait_for_housekeeper(cluster.redis_url)
        held = _hold_placements(channel, seed)
        settled = _settled_contents(cluster.redis_url)
        burst_tally = Tally()

        def burst_probe(i: int) -> Probe:
            method = methods[i % len(methods)]
            rng = random.Random(f"{seed}:burst:{method.name}:{i}")
            rid = f"bz-{i}"
            if method.name == "Place" and rng.random() < 0.3:
                return make_probe(method, "unplaceable", rng, rid, placements)
            if method.name == "Place" and held and rng.random() < 0.2:
                # A request id already used, for another request: ALREADY_EXISTS.
                other = _request(rng, rng.choice(held), UNPLACEABLE)
                body = scheduler_pb2.PlaceRequest(request=other).SerializeToString()
                return Probe(method.name, "reused-id", body, must_refuse=True)
            if rng.random() < 0.6:
                probe = make_probe(method, "invalid", rng, rid, placements)
                if probe.must_refuse:
                    return probe
            while True:  # an undecodable body (most random bodies are)
                probe = make_probe(method, "raw", rng, rid, placements)
                if probe.must_refuse:
                    return probe

        before = settled
        send(channel, burst_probe, burst, tally=burst_tally, placements=placements)
        after = store_contents(cluster.redis_url)
        burst_wall = time.perf_counter() - started

        # 2. The fuzzing proper.
        tally = Tally()

        def fuzz_probe(i: int) -> Probe:
            method = methods[i % len(methods)]  # interleaved: every method under load
            rng = random.Random(f"{seed}:fuzz:{method.name}:{i}")
            return make_probe(method, _kind(rng), rng, f"fz-{seed}-{i}", placements)

        fuzz_started = time.perf_counter()
        send(channel, fuzz_probe, per_rpc * len(methods), tally=tally, placements=placements)
        fuzz_wall = time.perf_counter() - fuzz_started

        # 3. Still alive and answering; then give everything back.
        alive = cluster.processes["scheduler"].poll() is None
        logged = _logged_errors(cluster.workdir / "logs" / "scheduler.log")
        answering, released, release_errors = _release_all(channel)
    finally:
        channel.close()
    return {
        "seed": seed,
        "clients": CLIENTS,
        "per_rpc": per_rpc,
        "methods": [m.name for m in methods],
        "requests": tally.total(),
        "wall_s": round(time.perf_counter() - started, 1),
        "fuzz_wall_s": round(fuzz_wall, 1),
        "requests_per_s": round(tally.total() / fuzz_wall, 1) if fuzz_wall else 0.0,
        "codes": dict(tally.by_code(lambda k: k != "raw/undecodable")),
        "undecodable": dict(tally.by_code(lambda k: k == "raw/undecodable")),
        "by_rpc": {
            m.name: {kind: dict(counts) for kind, counts in sorted(tally.codes[m.name].items())}
            for m in methods  # in the service's order
            if m.name in tally.codes
        },
        "accepted_invalid": tally.accepted_invalid,
        "metadata_refused": tally.metadata_refused + burst_tally.metadata_refused,
        "max_details_bytes": max(tally.max_details_bytes, burst_tally.max_details_bytes),
        "details_cap_bytes": MAX_DETAILS_BYTES,
        "burst": {
            "requests": burst_tally.total(),
            "wall_s": round(burst_wall, 1),
            "codes": dict(burst_tally.by_code()),
            "accepted": burst_tally.accepted_invalid,
            "keys": len(before),
            "held_placements": len(held),
            "changed_keys": changed_keys(before, after),
        },
        "alive": alive,
        "scheduler_log_errors": logged,
        "answering": answering,
        "released_after": released,
        "release_errors_after": dict(release_errors),
        "samples": burst_tally.samples + tally.samples,
    }


def _logged_errors(log: Path) -> dict[str, Any]:
    """ERROR lines and tracebacks in a log: how many, and the first few.

    Reported, not judged: the background jobs log their own failures there,
    which no request caused.
    """
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    bad = [line for line in lines if " ERROR " in line or line.startswith("Traceback")]
    return {"count": len(bad), "first": [line[:300] for line in bad[:5]]}


def _release_all(channel: grpc.Channel) -> tuple[bool, int, Counter[str]]:
    """Whether the scheduler answers; then release what the fuzzing placed.

    Returns:
        Whether ListHosts answered, how many placements were released, and
        the status codes of the releases that failed.
    """
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    released, errors = 0, Counter[str]()
    try:
        stub.ListHosts(scheduler_pb2.ListHostsRequest(), timeout=30)
        # Every page: the fuzzing may have placed more than one page holds.
        placed = list(all_placements(stub, timeout=60))
    except grpc.RpcError:
        return False, 0, errors
    for p in placed:
        try:
            stub.Release(scheduler_pb2.ReleaseRequest(placement_id=p.placement_id), timeout=60)
            released += 1
        except grpc.RpcError as err:
            errors[err.code().name] += 1
    return True, released, errors


def failures(result: Mapping[str, Any]) -> list[str]:
    """What the acceptance criteria found wrong; empty when clean."""
    out: list[str] = []
    codes: Mapping[str, int] = result["codes"]
    for code in ("INTERNAL", "UNKNOWN"):
        if codes.get(code):
            out.append(f"{codes[code]:,} {code} answers")
    if codes.get("DEADLINE_EXCEEDED"):
        out.append(f"{codes['DEADLINE_EXCEEDED']:,} calls unanswered within {DEADLINE_S:.0f} s")
    wrong = {c: n for c, n in result["undecodable"].items() if c != "INVALID_ARGUMENT"}
    if wrong:
        out.append(f"undecodable bodies not answered INVALID_ARGUMENT: {wrong}")
    if result["accepted_invalid"]:
        out.append(f"{result['accepted_invalid']:,} invalid requests accepted")
    if result["max_details_bytes"] > result["details_cap_bytes"]:
        out.append(f"a status message of {result['max_details_bytes']:,} bytes")
    if result["metadata_refused"]:
        out.append(
            f"{result['metadata_refused']:,} answers refused by the client for their "
            "metadata size (status message too large)"
        )
    burst = result["burst"]
    if burst["accepted"]:
        out.append(f"the burst: {burst['accepted']:,} requests that must be refused were not")
    if burst["changed_keys"]:
        out.append(f"the burst changed the store: {burst['changed_keys'][:10]}")
    if not (result["alive"] and result["answering"]):
        out.append("the scheduler is not alive and answering at the end")
    return out


# -- the bench/run.py interface -------------------------------------------------------------


def _run_on_own_cluster(per_rpc: int, burst: int, seed: int, quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tessera-fuzz-") as tmp:
        cluster = start_cluster(Path(tmp))
        with cluster:
            result = fuzz(cluster, per_rpc, burst, seed)
    result["failures"] = failures(result)
    result["meta"] = {"quick": quick, "machine": report.machine(), "git": report.git_state()}
    return result


def run(quick: bool) -> dict[str, Any]:
    """A whole run on a cluster of its own: full (20,000 per method) or quick."""
    if quick:
        return _run_on_own_cluster(QUICK_PER_RPC, QUICK_BURST, SEED, quick)
    return _run_on_own_cluster(FULL_PER_RPC, FULL_BURST, SEED, quick)


def section(result: Mapping[str, Any], plots: Path) -> str:
    """The Markdown section of a result (``plots`` unused: no figure)."""
    codes = sorted({c for kinds in result["by_rpc"].values() for k in kinds.values() for c in k})
    rows: list[list[object]] = []
    for rpc, kinds in result["by_rpc"].items():
        for kind, counts in kinds.items():
            rows.append([rpc, kind, *(counts.get(c, 0) for c in codes)])
    burst = result["burst"]
    verdict = result.get("failures", failures(result))
    lines = [
        "## Request fuzzing",
        "",
        f"{result['requests']:,} requests ({result['per_rpc']:,} per method) in "
        f"{result['fuzz_wall_s']} s ({result['requests_per_s']:,} per second, "
        f"{result['clients']} clients); largest status message {result['max_details_bytes']:,} "
        f"bytes (cap {result['details_cap_bytes']:,}). Refused burst: {burst['requests']:,} "
        f"requests, {burst['accepted']} accepted, {len(burst['changed_keys'])} of "
        f"{burst['keys']} store keys changed.",
        "",
        report.table(["method", "kind", *codes], rows),
        "",
        "Verdict: " + ("clean." if not verdict else "; ".join(verdict)),
    ]
    return "\n".join(lines)


def summary(result: Mapping[str, Any]) -> str:
    """The short report printed at the end."""
    lines = [
        f"{result['requests']:,} requests to {len(result['methods'])} methods "
        f"in {result['fuzz_wall_s']} s ({result['requests_per_s']:,}/s)",
        "answers: " + ", ".join(f"{c} {n:,}" for c, n in sorted(result["codes"].items())),
        "undecodable bodies: "
        + ", ".join(f"{c} {n:,}" for c, n in sorted(result["undecodable"].items())),
        f"largest status message: {result['max_details_bytes']:,} bytes "
        f"(cap {result['details_cap_bytes']:,})",
        f"refused burst: {result['burst']['requests']:,} requests, "
        f"{result['burst']['accepted']} accepted, {result['burst']['held_placements']} "
        f"placements held, store keys changed: "
        f"{result['burst']['changed_keys'] or 'none'} of {result['burst']['keys']}",
        f"scheduler log: {result['scheduler_log_errors']['count']} ERROR lines or tracebacks",
        f"scheduler alive: {result['alive']}, answering: {result['answering']}; "
        f"placements released after: {result['released_after']}",
    ]
    problems = result.get("failures", failures(result))
    lines.append("verdict: " + ("CLEAN" if not problems else "NOT CLEAN: " + "; ".join(problems)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run, write JSON, print the report; exit 1 unless clean."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_PER_RPC} requests per method")
    p.add_argument("--per-rpc", type=int, help=f"requests per method (default {FULL_PER_RPC:,})")
    p.add_argument("--burst", type=int, help=f"refused burst size (default {FULL_BURST:,})")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", type=Path, default=OUT / "request_fuzz.json")
    opts = p.parse_args(argv)
    per_rpc = opts.per_rpc or (QUICK_PER_RPC if opts.quick else FULL_PER_RPC)
    burst = opts.burst or (QUICK_BURST if opts.quick else FULL_BURST)
    result = _run_on_own_cluster(per_rpc, burst, opts.seed, opts.quick)
    report.write_result(result, opts.out)
    print(summary(result))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
