"""tessera: the operator and user command line.

tessera demo [--serve]             run a whole cluster on fake hosts, end to end
                                   (--serve: keep it running with the dashboard open)
tessera place --tenant T --gpu 1   place a request (or --file REQUEST.json|yaml)
tessera list | hosts               show placements, registered hosts
tessera get ID | release ID        one placement; tear it down
tessera explain --tenant T --gpu 1 where it would go, or why it cannot
tessera host cordon|uncordon|drain|forget ID
                                   take a host out of scheduling, back in, empty it, remove it
tessera plan --hosts DIR --requests FILE [--json] [--sequential]
                                   what-if: place a batch offline, no store, no agents
tessera certs ca DIR | issue --ca DIR --role R --name N OUT | show DIR
                                   a CA and certificates for mutual TLS
tessera certs p12 DIR OUT --password-file F
                                   a certificate as a browser imports it (the dashboard)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc
import yaml
from google.protobuf import json_format

from tessera.scheduler.core.validation import MAX_COUNT, MAX_CPU_MILLI, MAX_MEMORY_MIB
from tessera.scheduler.flags import seconds
from tessera.scheduler.presentation import describe_slot
from tessera.scheduler.service.convert import least_isolation
from tessera.security.certs import CertificateError, browser_bundle, create_ca, issue
from tessera.security.identity import SCHEDULER_DNS_NAME, Role
from tessera.security.tls import TlsConfigError, TlsDir, load_material, sync_channel
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

_STATES = {
    placement_pb2.PLACEMENT_STATE_UNSPECIFIED: "planned",
    placement_pb2.PLACEMENT_STATE_PENDING: "pending",
    placement_pb2.PLACEMENT_STATE_READY: "ready",
    placement_pb2.PLACEMENT_STATE_RELEASING: "releasing",
    placement_pb2.PLACEMENT_STATE_FAILED: "failed",
}
_NUMA = {
    "none": placement_pb2.NUMA_POLICY_NONE,
    "preferred": placement_pb2.NUMA_POLICY_PREFERRED,
    "single-numa-node": placement_pb2.NUMA_POLICY_SINGLE_NUMA_NODE,
    "socket": placement_pb2.NUMA_POLICY_SOCKET,
}


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def format_placements(placements: Sequence[placement_pb2.Placement]) -> str:
    """A readable table: one row per allocated unit."""
    rows: list[list[str]] = []
    for p in placements:
        for a in p.allocations:
            rows.append(
                [
                    p.placement_id,
                    p.tenant,
                    p.host_id,
                    a.claim,
                    describe_slot(a),
                    str(a.iommu_group) if a.vfio_path else "-",
                    a.vfio_path or a.mig.mig_uuid or "-",
                    str(a.numa_node),
                    _STATES.get(p.state, "?"),
                ]
            )
    headers = ["PLACEMENT", "TENANT", "HOST", "CLAIM", "SLOT", "GROUP", "HANDLE", "NUMA", "STATE"]
    return _table(headers, rows) if rows else "(no placements)"


def format_hosts(hosts: Sequence[scheduler_pb2.HostSummary]) -> str:
    """A readable table of registered hosts."""
    rows = [
        [
            h.host_id,
            h.agent_address,
            _schedulable(h),
            f"{h.cordon_reason or 'yes'} ({h.cordoned_by})" if h.cordoned else "-",
            f"{h.allocated_groups}/{h.assignable_groups}",
            _used(h),
            f"{h.heartbeat_age_ms / 1000:.1f}s",
            ",".join(f"{k}={v}" for k, v in sorted(h.labels.items())),
            " ".join(_mig_free(m) for m in h.mig) or "-",
        ]
        for h in hosts
    ]
    headers = [
        "HOST", "AGENT", "SCHEDULABLE", "CORDONED", "GROUPS USED", "USED", "HEARTBEAT",
        "LABELS", "MIG FREE",
    ]  # fmt: skip
    return _table(headers, rows)


#: The forms of ``HostSummary.used_by_form``, in the order shown.
_FORMS = ("whole", "vf", "mdev", "mig")


def _used(h: scheduler_pb2.HostSummary) -> str:
    """What a host has in use, by form (``whole 1, vf 3``), or "-"."""
    forms = [f for f in _FORMS if f in h.used_by_form]
    forms += sorted(f for f in h.used_by_form if f not in _FORMS)
    held = [f"{f} {h.used_by_form[f]}" for f in forms if h.used_by_form[f]]
    return ", ".join(held) or "-"


def _age(ms: int) -> str:
    """A duration for a person: ``42s``, ``17m``, ``3h``, ``5d``."""
    seconds = max(0, ms) // 1000
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _schedulable(h: scheduler_pb2.HostSummary) -> str:
    """Whether new placements may land on a host, and if not, why.

    The store keeps no time of a lease's expiry: how long the host has been
    silent is its last heartbeat's age.
    """
    if h.schedulable:
        return "yes"
    why = ["cordoned"] if h.cordoned else []
    if h.lease_expired or not h.cordoned:
        why.append(f"lease expired, no heartbeat for {_age(h.heartbeat_age_ms)}")
    return f"NO ({'; '.join(why)})"


def format_drain(response: scheduler_pb2.DrainHostResponse) -> str:
    """What a drain did: one row per placement, released or still there and why."""
    rows = [[p.placement_id, p.tenant, "released", p.message] for p in response.released]
    rows += [[f.placement_id, "", "NOT released", f.reason] for f in response.failed]
    table = _table(["PLACEMENT", "TENANT", "OUTCOME", "DETAIL"], rows) if rows else ""
    summary = (
        f"drained {response.host.host_id}: {len(response.released)} released, "
        f"{len(response.failed)} not released"
        + ("; drain again once they settle" if response.failed else "")
    )
    return f"{table}\n{summary}" if table else summary


def _mig_free(m: scheduler_pb2.MigCapacity) -> str:
    """What a MIG GPU can still take, largest profiles first, and its fragmentation."""
    # The media-extension variants (+me) mirror their base profile: left out.
    free = sorted(
        ((name, n) for name, n in m.free.items() if "+" not in name),
        key=lambda item: (-int(item[0].split("g", 1)[0]), item[0]),
    )
    if not free:
        # Handed over whole, in VF or mdev use, or its instances overlap.
        return f"{m.gpu_address}: none (taken whole, by VFs or mdevs, or unusable)"
    counts = " ".join(f"{name}={n}" for name, n in free)
    return f"{m.gpu_address}: {counts} (fragmentation {m.fragmentation:.2f})"


class RequestFileError(ValueError):
    """A ``--file`` that cannot be read or is not a PlacementRequest; the message says why."""


def _request_file(path: str) -> placement_pb2.PlacementRequest:
    """The PlacementRequest in a JSON or YAML file (protobuf's JSON mapping).

    Raises:
        RequestFileError: unreadable, not JSON or YAML, or not a PlacementRequest.
    """
    try:
        text = Path(path).read_text()
        data = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
    except (OSError, UnicodeDecodeError) as err:
        raise RequestFileError(f"--file {path}: {getattr(err, 'strerror', None) or err}") from None
    except (ValueError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RequestFileError(f"--file {path}: not JSON or YAML: {first}") from None
    if not isinstance(data, dict):
        raise RequestFileError(
            f"--file {path}: a PlacementRequest is a mapping, not {type(data).__name__}"
        )
    msg = placement_pb2.PlacementRequest()
    try:
        json_format.ParseDict(data, msg)
    except json_format.ParseError as err:
        # protobuf's message runs over lines (the fields it knows): one line.
        said = " ".join(str(err).split())
        raise RequestFileError(f"--file {path}: {said[:500]}") from None
    return msg


_ISOLATIONS = {
    "exclusive": placement_pb2.ISOLATION_EXCLUSIVE,
    "partitioned": placement_pb2.ISOLATION_PARTITIONED,
    "shared": placement_pb2.ISOLATION_SHARED,
}


def request_from_args(opts: argparse.Namespace) -> placement_pb2.PlacementRequest:
    """Build a PlacementRequest from --file or from the shorthand flags.

    Raises:
        RequestFileError: ``--file`` cannot be read as a PlacementRequest.
    """
    if opts.file:
        return _request_file(opts.file)
    msg = placement_pb2.PlacementRequest(
        request_id=opts.request_id or f"cli-{uuid.uuid4().hex[:12]}",
        tenant=opts.tenant,
        priority=opts.priority,
        numa_policy=_NUMA[opts.numa],
        cpu_milli=opts.cpus,
        memory_mib=opts.memory_mib,
    )
    selector = placement_pb2.DeviceSelector(vendor_id=opts.vendor, models=opts.model or [])

    def claim(
        name: str,
        kind: placement_pb2.DeviceKind.ValueType,
        count: int,
        form: placement_pb2.DeviceForm.ValueType,
        **choices: list[str],
    ) -> None:
        isolation = _ISOLATIONS[opts.isolation] if opts.isolation else least_isolation(form)
        msg.claims.append(
            placement_pb2.Claim(
                name=name,
                kind=kind,
                count=count,
                selector=selector,
                forms=[form],
                min_isolation=isolation,
                migratable=opts.migratable,
                **choices,
            )
        )

    whole = placement_pb2.DEVICE_FORM_WHOLE_DEVICE
    for kind, count in (
        (placement_pb2.DEVICE_KIND_GPU, opts.gpu),
        (placement_pb2.DEVICE_KIND_NIC, opts.nic),
        (placement_pb2.DEVICE_KIND_ACCELERATOR, opts.accelerator),
    ):
        if count:
            claim(
                placement_pb2.DeviceKind.Name(kind).removeprefix("DEVICE_KIND_").lower(),
                kind,
                count,
                whole,
            )
    if opts.vf:
        claim("vf", placement_pb2.DEVICE_KIND_NIC, opts.vf, placement_pb2.DEVICE_FORM_VF)
    for i, (type_id, count) in enumerate(opts.mdev):
        claim(
            f"mdev-{i}",
            placement_pb2.DEVICE_KIND_GPU,
            count,
            placement_pb2.DEVICE_FORM_MDEV,
            mdev_types=[type_id],
        )
    for i, (profile, count) in enumerate(opts.mig):
        claim(
            f"mig-{i}",
            placement_pb2.DEVICE_KIND_GPU,
            count,
            placement_pb2.DEVICE_FORM_MIG,
            mig_profiles=[profile],
        )
    for key, value in opts.selector:
        msg.host_selector[key] = value
    return msg


def _stub(opts: argparse.Namespace) -> scheduler_pb2_grpc.SchedulerStub:
    tls = TlsDir(opts.tls_dir) if opts.tls_dir is not None else None
    return scheduler_pb2_grpc.SchedulerStub(sync_channel(opts.scheduler, tls, SCHEDULER_DNS_NAME))


def _cmd_certs(opts: argparse.Namespace) -> int:
    """``tessera certs ca|issue|show``: one line of outcome, or one line of error and exit 2."""
    try:
        if opts.action == "ca":
            create_ca(opts.dir, days=opts.days)
            print(f"created a CA in {opts.dir} (keep {opts.dir / 'ca-key.pem'} offline)")
        elif opts.action == "issue":
            identity = issue(
                opts.ca,
                opts.role,
                opts.name,
                opts.out,
                days=opts.days,
                dns_names=opts.dns,
                ip_addresses=opts.ip,
            )
            print(f"issued {identity.uri} into {opts.out}")
        elif opts.action == "p12":
            password = _password(opts.password_file)
            identity = browser_bundle(opts.dir, opts.out, password)
            print(f"wrote {identity.uri} into {opts.out}")
        else:
            material = load_material(opts.dir)
            expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(material.not_after))
            print(f"{material.identity.uri} (expires {expires})")
    except (CertificateError, TlsConfigError, OSError) as err:
        print(f"tessera certs: {err}", file=sys.stderr)
        return 2
    return 0


def _fail(err: grpc.RpcError) -> int:
    print(f"tessera: {err.code().name}: {err.details()}", file=sys.stderr)
    return 1


def _cmd_host(stub: scheduler_pb2_grpc.SchedulerStub, opts: argparse.Namespace) -> int:
    """``tessera host ACTION ID``: one line of outcome (a table for a drain)."""
    if opts.action == "cordon":
        h = stub.CordonHost(
            scheduler_pb2.CordonHostRequest(host_id=opts.id, reason=opts.reason),
            timeout=opts.timeout,
        )
        print(f"cordoned {h.host_id}" + (f": {h.cordon_reason}" if h.cordon_reason else ""))
    elif opts.action == "uncordon":
        h = stub.UncordonHost(
            scheduler_pb2.UncordonHostRequest(host_id=opts.id), timeout=opts.timeout
        )
        print(f"uncordoned {h.host_id} (schedulable: {_schedulable(h)})")
    elif opts.action == "drain":
        # Each placement is torn down on the host first: allow for many.
        d = stub.DrainHost(
            scheduler_pb2.DrainHostRequest(host_id=opts.id, reason=opts.reason),
            timeout=max(opts.timeout, 600),
        )
        print(format_drain(d))
        # Non-zero while placements remain, so "drain && forget" stops there.
        return 1 if d.failed else 0
    elif opts.action == "forget":
        f = stub.ForgetHost(
            scheduler_pb2.ForgetHostRequest(host_id=opts.id, force=opts.force), timeout=opts.timeout
        )
        dropped = f.dropped_placement_ids
        print(
            f"forgot {f.host_id}"
            + (f"; dropped {len(dropped)} placement(s): {' '.join(dropped)}" if dropped else "")
        )
    return 0


def _cmd_rpc(opts: argparse.Namespace) -> int:
    try:
        stub = _stub(opts)
    except TlsConfigError as err:
        print(f"tessera: {err}", file=sys.stderr)
        return 2
    try:
        if opts.command == "place":
            r = stub.Place(
                scheduler_pb2.PlaceRequest(request=request_from_args(opts)), timeout=opts.timeout
            )
            print(format_placements([r.placement]))
        elif opts.command == "explain":
            e = stub.Explain(
                scheduler_pb2.ExplainRequest(request=request_from_args(opts)), timeout=opts.timeout
            )
            print(e.summary)
            if e.placeable:
                print(format_placements([e.placement]))
            for v in e.verdicts:
                print(f"  {v.plugin}: rejected {v.rejected} ({'; '.join(v.reasons)})")
            # As grep does: 0 it would be placed, 1 it would not.
            return 0 if e.placeable else 1
        elif opts.command == "list":
            lr = stub.ListPlacements(
                scheduler_pb2.ListPlacementsRequest(tenant=opts.tenant, host_id=opts.host),
                timeout=opts.timeout,
            )
            print(format_placements(lr.placements))
        elif opts.command == "hosts":
            listed = stub.ListHosts(scheduler_pb2.ListHostsRequest(), timeout=opts.timeout)
            print(format_hosts(listed.hosts))
        elif opts.command == "get":
            g = stub.GetPlacement(
                scheduler_pb2.GetPlacementRequest(placement_id=opts.id), timeout=opts.timeout
            )
            print(json.dumps(json_format.MessageToDict(g), indent=2))
        elif opts.command == "release":
            rel = stub.Release(
                scheduler_pb2.ReleaseRequest(placement_id=opts.id), timeout=opts.timeout
            )
            print(f"released {rel.placement.placement_id} on {rel.placement.host_id}")
        elif opts.command == "host":
            return _cmd_host(stub, opts)
    except grpc.RpcError as err:
        return _fail(err)
    except RequestFileError as err:
        print(f"tessera: {err}", file=sys.stderr)
        return 2
    return 0


def _request_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", help="PlacementRequest in protobuf JSON mapping (.json/.yaml)")
    p.add_argument("--request-id", default="", help="idempotency key (random if omitted)")
    p.add_argument("--tenant", default="")
    p.add_argument("--priority", type=_priority, default=0)
    p.add_argument("--gpu", type=_count, default=0, help="whole GPUs (passthrough)")
    p.add_argument("--nic", type=_count, default=0, help="whole NICs (passthrough)")
    p.add_argument("--accelerator", type=_count, default=0, help="whole accelerators")
    p.add_argument("--vf", type=_count, default=0, help="SR-IOV VFs of NICs")
    p.add_argument(
        "--mdev",
        type=_choice_count,
        action="append",
        default=[],
        metavar="TYPE[:N]",
        help="vGPU mdevs of a type, e.g. nvidia-63 (repeatable)",
    )
    p.add_argument(
        "--mig",
        type=_choice_count,
        action="append",
        default=[],
        metavar="PROFILE[:N]",
        help="MIG instances of a profile, e.g. 3g.40gb or 1g.10gb:2 (repeatable)",
    )
    p.add_argument(
        "--isolation",
        choices=sorted(_ISOLATIONS),
        default="",
        help="least isolation accepted (default: what each form gives: whole exclusive, "
        "MIG partitioned, VF and mdev shared)",
    )
    p.add_argument("--vendor", type=_vendor, default=0, help="PCI vendor id, e.g. 0x10de")
    p.add_argument("--model", action="append", help="accepted model name (repeatable)")
    p.add_argument("--numa", choices=sorted(_NUMA), default="none", help="NUMA policy")
    p.add_argument(
        "--selector", type=_label, action="append", default=[], help="host label KEY=VALUE"
    )
    p.add_argument("--migratable", action="store_true", help="must be live-migratable")
    p.add_argument(
        "--cpus", type=_cpus, default=0, help="host CPUs beside the devices (e.g. 8 or 0.5)"
    )
    p.add_argument(
        "--memory-mib", type=_memory_mib, default=0, help="host memory beside the devices, MiB"
    )


def _count(text: str) -> int:
    """A device count flag: 0 to the most one claim may ask."""
    if not text.isdigit() or int(text) > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: a count from 0 to {MAX_COUNT}")
    return int(text)


def _choice_count(text: str) -> tuple[str, int]:
    """``NAME[:N]``: a MIG profile or mdev type and how many (1 when left out)."""
    name, sep, count = text.partition(":")
    if not name or len(name) > 64:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: NAME or NAME:COUNT")
    if not sep:
        return name, 1
    if not count.isdigit() or not 1 <= int(count) <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: a count from 1 to {MAX_COUNT}")
    return name, int(count)


def _vendor(text: str) -> int:
    """A PCI vendor id, ``0x10de`` or decimal."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: a PCI vendor id, e.g. 0x10de") from None
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: a PCI vendor id is 0x0000 to 0xffff")
    return value


def _priority(text: str) -> int:
    """A request's priority: a 32-bit signed number."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: a whole number") from None
    if not -(2**31) <= value < 2**31:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: out of range")
    return value


def _label(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of a host label; a bare key is refused, not read as an empty value."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: KEY=VALUE")
    return key, value


def _port(text: str) -> int:
    """A TCP port flag: 0 to 65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a port (0-65535): {text[:32]!r}")
    return int(text)


def _password(source: Path) -> bytes:
    """The first line of a password file (``-``: standard input), without its newline."""
    try:
        text = sys.stdin.readline() if str(source) == "-" else source.read_text().splitlines()[0]
    except IndexError:
        text = ""
    return text.rstrip("\r\n").encode()


def _cpus(text: str) -> int:
    """``--cpus`` as thousandths of a CPU; argparse's one-line error for a bad value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of CPUs") from None
    if not 0 <= value <= MAX_CPU_MILLI / 1000:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_CPU_MILLI // 1000:,} CPUs")
    return round(value * 1000)


def _memory_mib(text: str) -> int:
    """``--memory-mib``, checked; argparse's one-line error for a bad value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB") from None
    if not 0 <= value <= MAX_MEMORY_MIB:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_MEMORY_MIB:,} MiB")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of tessera."""
    p = argparse.ArgumentParser(prog="tessera", description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--scheduler",
        default=os.environ.get("TESSERA_SCHEDULER", "127.0.0.1:50051"),
        help="scheduler address [TESSERA_SCHEDULER]",
    )
    p.add_argument(
        "--tls-dir",
        type=Path,
        default=Path(os.environ["TESSERA_TLS_DIR"]) if os.environ.get("TESSERA_TLS_DIR") else None,
        help="mutual TLS: ca.pem, cert.pem (a tenant, frontend or admin identity), key.pem "
        "[TESSERA_TLS_DIR]; without it, plaintext (a scheduler on loopback)",
    )
    p.add_argument(
        "--timeout",
        type=seconds,
        default=60.0,
        help="seconds each call to the scheduler may take (a drain: at least 600) [60]",
    )
    sub = p.add_subparsers(dest="command", required=True)
    certs = sub.add_parser("certs", help="create a CA, issue certificates, show one")
    certs_sub = certs.add_subparsers(dest="action", required=True)
    ca = certs_sub.add_parser("ca", help="create a CA in DIR (ca.pem, ca-key.pem)")
    ca.add_argument("dir", type=Path)
    ca.add_argument("--days", type=int, default=3650)
    iss = certs_sub.add_parser("issue", help="issue a key and certificate for one identity")
    iss.add_argument("--ca", type=Path, required=True, help="the CA directory")
    iss.add_argument("--role", required=True, choices=[r.value for r in Role])
    iss.add_argument("--name", required=True, help="host id (agent), tenant name, ...")
    iss.add_argument("--days", type=int, default=365)
    iss.add_argument("--dns", action="append", default=[], help="extra DNS SAN (repeatable)")
    iss.add_argument("--ip", action="append", default=[], help="extra IP SAN (repeatable)")
    iss.add_argument("out", type=Path, help="directory for ca.pem, cert.pem, key.pem")
    show = certs_sub.add_parser("show", help="the identity and expiry of a TLS directory")
    show.add_argument("dir", type=Path)
    demo = sub.add_parser("demo", help="run a scheduler and three agents on fake hosts")
    demo.add_argument("--workdir", type=Path, help="keep the cluster's files here")
    demo.add_argument(
        "--serve",
        action="store_true",
        help="keep the cluster and its placements running with the dashboard until Ctrl-C",
    )
    demo.add_argument(
        "--http-port", type=_port, default=0, help="the dashboard's port (default: a free one)"
    )
    p12 = certs_sub.add_parser(
        "p12", help="a TLS directory as one PKCS#12 file, to import into a browser"
    )
    p12.add_argument("dir", type=Path, help="the TLS directory (cert.pem, key.pem)")
    p12.add_argument("out", type=Path, help="the .p12 file to write (0600)")
    p12.add_argument(
        "--password-file",
        type=Path,
        required=True,
        help="file whose first line is the bundle's password (- for standard input)",
    )
    _request_flags(sub.add_parser("place", help="place a request"))
    _request_flags(sub.add_parser("explain", help="dry run a request"))
    lst = sub.add_parser("list", help="list placements")
    lst.add_argument("--tenant", default="")
    lst.add_argument("--host", default="")
    sub.add_parser("hosts", help="list registered hosts")
    get = sub.add_parser("get", help="show one placement")
    get.add_argument("id")
    rel = sub.add_parser("release", help="release a placement")
    rel.add_argument("id")
    host = sub.add_parser("host", help="cordon, uncordon, drain or forget a host (admin)")
    actions = host.add_subparsers(dest="action", required=True)
    cordon = actions.add_parser("cordon", help="no new placements on the host; its own stay")
    cordon.add_argument("id", help="host id")
    cordon.add_argument("--reason", default="", help="why (shown by tessera hosts)")
    actions.add_parser("uncordon", help="let new placements land again").add_argument(
        "id", help="host id"
    )
    drain = actions.add_parser("drain", help="cordon, then release every placement on the host")
    drain.add_argument("id", help="host id")
    drain.add_argument("--reason", default="", help="the cordon's reason (default: drained)")
    forget = actions.add_parser("forget", help="remove a host without placements from the store")
    forget.add_argument("id", help="host id")
    forget.add_argument(
        "--force",
        action="store_true",
        help="drop its placements too (not torn down: the agent's reconciler does that "
        "if it registers again)",
    )
    plan = sub.add_parser("plan", help="place a batch offline (what-if), no store or agents")
    plan.add_argument("--hosts", type=Path, required=True, help="directory of inventory JSON files")
    plan.add_argument(
        "--requests", type=Path, required=True, help="YAML/JSON list of PlacementRequest"
    )
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument(
        "--sequential", action="store_true", help="place in priority order, no joint solve"
    )
    plan.add_argument("--time-limit", type=float, default=10.0, help="solver seconds")
    plan.add_argument("--workers", type=int, default=1, help="solver workers (1: deterministic)")
    plan.add_argument("--seed", type=int, default=0, help="solver random seed")
    return p.parse_args(argv)


def _cmd_plan(opts: argparse.Namespace) -> int:
    from tessera.scheduler.core.engine.batch import BatchSettings
    from tessera.scheduler.core.validation import InvalidRequestError
    from tessera.scheduler.planning import (
        PlanningInputError,
        load_inventories,
        load_requests,
        plan_offline,
    )

    try:
        report = plan_offline(
            load_inventories(opts.hosts),
            load_requests(opts.requests),
            sequential=opts.sequential,
            settings=BatchSettings(
                time_limit_s=opts.time_limit, workers=opts.workers, seed=opts.seed
            ),
        )
    except (PlanningInputError, InvalidRequestError) as err:
        print(f"tessera plan: {err}", file=sys.stderr)
        return 2
    if opts.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(format_placements(report.placements))
    for rid, reasons in report.unplaced:
        print(f"unplaced {rid}: {reasons[0]}")
        for reason in reasons[1:]:
            print(f"  {reason}")
    r = report.result
    print(
        f"{len(report.placements)} placed, {len(report.unplaced)} unplaced; solver {r.status}, "
        f"objective {r.objective} (bound {r.bound}, greedy {r.greedy_objective}), "
        f"{r.columns} columns{'' if r.solved else ' (no model)'}, {r.wall_s:.2f}s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of tessera."""
    opts = parse_args(argv)
    if opts.command == "plan":
        return _cmd_plan(opts)
    if opts.command == "certs":
        return _cmd_certs(opts)
    if opts.command == "demo":
        from tessera.scheduler.demo import run_demo

        return run_demo(opts.workdir, serve=opts.serve, http_port=opts.http_port)
    return _cmd_rpc(opts)


if __name__ == "__main__":
    sys.exit(main())
