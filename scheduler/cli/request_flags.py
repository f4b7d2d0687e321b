"""A PlacementRequest from the command line: ``--file``, or flags for every form.

``--gpu/--nic/--accelerator`` ask for whole devices, ``--vf``, ``--mdev`` and
``--mig`` for the split forms, each a claim of its own with the least isolation
its form gives unless ``--isolation`` asks for more.
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

import yaml
from google.protobuf import json_format

from tessera.scheduler.cli import values
from tessera.scheduler.service.convert import least_isolation
from tessera.v1 import placement_pb2

NUMA_POLICIES = {
    "none": placement_pb2.NUMA_POLICY_NONE,
    "preferred": placement_pb2.NUMA_POLICY_PREFERRED,
    "single-numa-node": placement_pb2.NUMA_POLICY_SINGLE_NUMA_NODE,
    "socket": placement_pb2.NUMA_POLICY_SOCKET,
}
ISOLATIONS = {
    "exclusive": placement_pb2.ISOLATION_EXCLUSIVE,
    "partitioned": placement_pb2.ISOLATION_PARTITIONED,
    "shared": placement_pb2.ISOLATION_SHARED,
}


class RequestFileError(ValueError):
    """A ``--file`` that cannot be read or is not a PlacementRequest; the message says why."""


def add_request_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``tessera place`` and ``tessera explain``."""
    p.add_argument("--file", help="PlacementRequest in protobuf JSON mapping (.json/.yaml)")
    p.add_argument("--request-id", default="", help="idempotency key (random if omitted)")
    p.add_argument("--tenant", default="")
    p.add_argument("--priority", type=values.priority, default=0)
    p.add_argument("--gpu", type=values.count, default=0, help="whole GPUs (passthrough)")
    p.add_argument("--nic", type=values.count, default=0, help="whole NICs (passthrough)")
    p.add_argument("--accelerator", type=values.count, default=0, help="whole accelerators")
    p.add_argument("--vf", type=values.count, default=0, help="SR-IOV VFs of NICs")
    p.add_argument(
        "--mdev",
        type=values.choice_count,
        action="append",
        default=[],
        metavar="TYPE[:N]",
        help="vGPU mdevs of a type, e.g. nvidia-63 (repeatable)",
    )
    p.add_argument(
        "--mig",
        type=values.choice_count,
        action="append",
        default=[],
        metavar="PROFILE[:N]",
        help="MIG instances of a profile, e.g. 3g.40gb or 1g.10gb:2 (repeatable)",
    )
    p.add_argument(
        "--isolation",
        choices=sorted(ISOLATIONS),
        default="",
        help="least isolation accepted (default: what each form gives: whole exclusive, "
        "MIG partitioned, VF and mdev shared)",
    )
    p.add_argument("--vendor", type=values.vendor, default=0, help="PCI vendor id, e.g. 0x10de")
    p.add_argument("--model", action="append", help="accepted model name (repeatable)")
    p.add_argument("--numa", choices=sorted(NUMA_POLICIES), default="none", help="NUMA policy")
    p.add_argument(
        "--selector", type=values.label, action="append", default=[], help="host label KEY=VALUE"
    )
    p.add_argument("--migratable", action="store_true", help="must be live-migratable")
    p.add_argument(
        "--cpus", type=values.cpus, default=0, help="host CPUs beside the devices (e.g. 8 or 0.5)"
    )
    p.add_argument(
        "--memory-mib",
        type=values.memory_mib,
        default=0,
        help="host memory beside the devices, MiB",
    )


def request_file(path: str) -> placement_pb2.PlacementRequest:
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


def request_from_args(opts: argparse.Namespace) -> placement_pb2.PlacementRequest:
    """Build a PlacementRequest from --file or from the shorthand flags.

    Raises:
        RequestFileError: ``--file`` cannot be read as a PlacementRequest.
    """
    if opts.file:
        return request_file(opts.file)
    msg = placement_pb2.PlacementRequest(
        request_id=opts.request_id or f"cli-{uuid.uuid4().hex[:12]}",
        tenant=opts.tenant,
        priority=opts.priority,
        numa_policy=NUMA_POLICIES[opts.numa],
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
        isolation = ISOLATIONS[opts.isolation] if opts.isolation else least_isolation(form)
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
