"""tessera-agent: discovers this host and carries placements out.

Subcommands:
    run        register with the scheduler, heartbeat, serve the Agent service
    inventory  print what the agent would report (read-only)
    fakehost   build a named fake host tree (for demos and tests)

Concrete parts (the OS or emulated kernel writer, the NVML client) are wired
here and nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tessera.agent.allowlist import AllowList
from tessera.agent.checkpoint import Checkpoint
from tessera.agent.nvml import NullNvmlClient, NvmlClient, NvmlMigClient, open_nvml
from tessera.agent.registration import RegistrationLoop
from tessera.agent.reporter import HostReporter, read_boot_id
from tessera.agent.service import AgentServicer
from tessera.agent.sysfs import FAKE_HOST_MARKER, NotASysfsTreeError, Sysfs, SysfsWriter
from tessera.keepalive import KEEPALIVE
from tessera.logs import add_log_flags, configure
from tessera.security.audit import AuditLog
from tessera.security.identity import SCHEDULER_DNS_NAME, Role
from tessera.security.interceptor import AccessInterceptor
from tessera.security.policy import AccessPolicy
from tessera.security.tls import ChannelCache, TlsConfigError, TlsDir, check_listen
from tessera.v1 import agent_pb2, agent_pb2_grpc, inventory_pb2, placement_pb2

log = logging.getLogger("tessera.agent")


def _label(text: str) -> tuple[str, str]:
    """``--label KEY=VALUE``; argparse's one-line error and exit 2 for anything else.

    Checked while the line is parsed, before the agent logs or listens.
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text[:32]!r}: expected KEY=VALUE")
    return key, value


def _check_sysfs_root(root: Path) -> None:
    """Exit 2 with one line unless ``root`` holds a sysfs tree.

    Without this, a mistyped ``--sysfs-root`` would be discovered as a host
    without devices and registered as such.
    """
    try:
        Sysfs(root).check_tree()
    except NotASysfsTreeError as err:
        print(
            f"tessera-agent: --sysfs-root {root}: not a sysfs tree (no {err.missing})",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def _allow(opts: argparse.Namespace) -> AllowList:
    """The allow-list: ``--allow`` values, else ``TESSERA_AGENT_ALLOW``, else the default."""
    entries = opts.allow or [os.environ.get("TESSERA_AGENT_ALLOW", "")]
    try:
        return AllowList.parse(entries)
    except ValueError as err:
        raise SystemExit(f"tessera-agent: --allow: {err}") from err


def _sysfs(root: Path, fake_kernel: bool) -> Sysfs:
    writer: SysfsWriter | None = None
    if fake_kernel:
        # Only a fake tree may be driven by the emulator; never a real /sys.
        if not (root / FAKE_HOST_MARKER).exists():
            raise SystemExit(f"tessera-agent: --fake-kernel needs a fake host tree; {root} is not")
        from tessera.agent.testing.kernel import KernelEmulator

        writer = KernelEmulator(root)
    return Sysfs(root, writer)


def _nvml(root: Path) -> NvmlMigClient:
    """NVML for this host: the fake driver of a fake host tree, else the real one.

    A fake tree (it carries the fake-host marker) never reaches the real
    libnvidia-ml: it gets its own fake driver when the fixture wrote one, and
    no NVIDIA driver otherwise. Either way the production ``PynvmlClient``
    path is what runs.
    """
    if (root / FAKE_HOST_MARKER).exists():
        from tessera.agent.testing.nvml import STATE_FILE, FakeNvml

        if (root / STATE_FILE).exists():
            return open_nvml(FakeNvml.from_tree(root))
        return NullNvmlClient("this fake host has no fake NVIDIA driver")
    client = open_nvml()
    if isinstance(client, NullNvmlClient):
        log.info("no NVML: %s", client.reason)
    return client


def _reporter(
    opts: argparse.Namespace, sysfs: Sysfs, nvml: NvmlClient | None = None
) -> HostReporter:
    host_id = opts.host_id or socket.gethostname()
    return HostReporter(
        sysfs,
        nvml if nvml is not None else _nvml(opts.sysfs_root),
        host_id=host_id,
        boot_id=read_boot_id(opts.sysfs_root, host_id),
        labels=dict(opts.label),
        allow=_allow(opts),
    )


def _summary(inv: inventory_pb2.HostInventory) -> str:
    lines = [
        f"host {inv.host_id}  boot {inv.boot_id}  generation {inv.generation}",
        f"IOMMU: {'present' if inv.iommu_present else 'ABSENT (no passthrough possible)'}",
        f"NUMA nodes: {len(inv.numa_nodes)}  "
        + "  ".join(f"node{n.id}: cpus {n.cpulist}" for n in inv.numa_nodes),
        f"PCI functions: {len(inv.pci_functions)}  IOMMU groups: {len(inv.iommu_groups)}",
    ]
    for f in inv.pci_functions:
        group = str(f.iommu_group) if f.has_iommu_group else "-"
        lines.append(
            f"  {f.address}  {f.vendor_id:04x}:{f.device_id:04x}  class {f.class_code:06x}  "
            f"group {group:>3}  numa {f.numa_node:>2}  driver {f.driver or '(none)'}"
            + (f"  not offered: {f.host_use}" if f.host_use else "")
        )
    for pf in inv.sriov_pfs:
        lines.append(f"SR-IOV PF {pf.address}: {pf.num_vfs}/{pf.total_vfs} VFs")
    for parent in inv.mdev_parents:
        types = ", ".join(f"{t.id} ({t.available_instances} free)" for t in parent.types)
        lines.append(f"mdev parent {parent.address}: {types}")
    for gpu in inv.gpus:
        lines.append(f"GPU {gpu.address}: {gpu.model}")
    lines += [f"note: {n}" for n in inv.notes]
    return "\n".join(lines)


def cmd_inventory(opts: argparse.Namespace) -> int:
    """Print the inventory (read-only: the writer is never used)."""
    sysfs = Sysfs(opts.sysfs_root)
    inventory, _ = _reporter(opts, sysfs).report()
    if opts.json:
        # Zero values (NUMA node 0, group 0) are facts here, not absences.
        body = json_format.MessageToDict(inventory, always_print_fields_with_no_presence=True)
        text = json.dumps(body, indent=2, sort_keys=True)
    else:
        text = _summary(inventory)
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Piped into head or less: exit quietly when the reader goes away.
        # Not by restoring SIGPIPE's default: callers in the same process
        # (tests) would then die on any write to a closed socket.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_fakehost(opts: argparse.Namespace) -> int:
    """Build or list fake host trees."""
    from tessera.agent.testing.hosts import FIXTURES, build

    if opts.action == "list":
        for name in sorted(FIXTURES):
            print(f"{name:18} {FIXTURES[name].summary}")
        return 0
    if not opts.name or not opts.dir:
        print("tessera-agent: usage: tessera-agent fakehost build NAME DIR", file=sys.stderr)
        return 2
    try:
        build(opts.name, Path(opts.dir))
    except KeyError as err:
        print(f"tessera-agent: fakehost: {err.args[0]}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"tessera-agent: fakehost: {err}", file=sys.stderr)
        return 2
    if opts.mig:
        _enable_mig(Path(opts.dir), opts.mig)
    print(f"built fake host {opts.name} in {opts.dir}")
    return 0


def _enable_mig(root: Path, addresses: list[str]) -> None:
    """Turn MIG mode on, as an operator's ``nvidia-smi -i N -mig 1`` would.

    Goes through the fake driver's own nvmlDeviceSetMigMode, so a GPU that
    cannot do MIG is refused the way NVML refuses it.
    """
    import pynvml

    from tessera.agent.testing.nvml import FakeNvml, nvml_bus_id

    nvml = FakeNvml.from_tree(root)
    nvml.nvmlInit()
    wanted = {nvml_bus_id(a): a for a in addresses}
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        bus_id = nvml.nvmlDeviceGetPciInfo(handle).busId
        bus_id = bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id)
        if bus_id in wanted:
            nvml.nvmlDeviceSetMigMode(handle, pynvml.NVML_DEVICE_MIG_ENABLE)
            del wanted[bus_id]
    nvml.nvmlShutdown()
    if wanted:
        raise SystemExit(f"--mig: no GPU at {', '.join(sorted(wanted.values()))}")


async def _run(opts: argparse.Namespace) -> int:
    sysfs = _sysfs(opts.sysfs_root, opts.fake_kernel)
    # One NVML for discovery and MIG actuation: both see the same driver.
    nvml = _nvml(opts.sysfs_root)
    tls = _tls(opts)
    reporter = _reporter(opts, sysfs, nvml)
    state_dir: Path = opts.state_dir
    checkpoint = Checkpoint(state_dir / f"{reporter.host_id}.checkpoint.json")
    channels = ChannelCache(tls)
    audit = AuditLog(opts.audit_log or None, "agent")
    # Only a scheduler identity may drive this host (see tessera.security.policy).
    interceptor = AccessInterceptor(
        AccessPolicy(),
        tls=tls is not None,
        audit=audit,
        resources={
            f"/{agent_pb2.DESCRIPTOR.services_by_name['Agent'].full_name}/{name}": _audited
            for name in ("Prepare", "Unprepare", "GetState")
        },
    )
    server = grpc.aio.server(interceptors=[interceptor], options=KEEPALIVE.server_options())
    # Bind first: the registration loop advertises the bound port, and the
    # servicer pokes that loop whenever it changed the host.
    if tls is None:
        port = server.add_insecure_port(opts.listen)
    else:
        port = server.add_secure_port(opts.listen, tls.server_credentials())
    host = opts.listen.rsplit(":", 1)[0]
    address = f"{opts.advertise or host}:{port}"
    registration = RegistrationLoop(
        lambda: channels.get(opts.scheduler, SCHEDULER_DNS_NAME), reporter, address
    )
    servicer = AgentServicer(
        sysfs, reporter, checkpoint, on_change=registration.poke, nvml=nvml, allow=reporter.allow
    )
    registration.on_fence = servicer.learn_fence
    log.info("allow-list: %s", reporter.allow)
    await asyncio.to_thread(servicer.recover)
    agent_pb2_grpc.add_AgentServicer_to_server(servicer, server)
    # The asyncio servicer: the blocking one holds a worker thread for every
    # Watch stream, even a cancelled one, and this agent's host operations
    # run on those threads.
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_name = agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name
    await health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    await server.start()
    print(f"tessera-agent {reporter.host_id} listening on {address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await registration.run(stop)
    finally:
        await server.stop(grace=5)
        await channels.close()
        audit.close()
    return 0


def _audited(request: Any, response: Any) -> dict[str, object]:
    """What an audit record of an Agent call names: the placement and the job's term."""
    placement = getattr(request, "placement", None)
    if not isinstance(placement, placement_pb2.Placement):
        return {}
    return {
        "placement_id": placement.placement_id,
        "tenant": placement.tenant,
        "fencing_token": getattr(request, "fencing_token", 0),
    }


def _tls(opts: argparse.Namespace) -> TlsDir | None:
    """The agent's TLS directory, checked against its host id; exit 2 with one line if unusable.

    With TLS the host id is the name in the agent's certificate: ``--host-id``
    may be left out, and one that differs is refused (the scheduler would
    refuse every registration anyway).
    """
    try:
        tls = TlsDir(opts.tls_dir) if opts.tls_dir is not None else None
        if tls is not None:
            identity = tls.identity
            if identity.role is not Role.AGENT:
                raise TlsConfigError(
                    f"--tls-dir {opts.tls_dir}: the certificate is {identity}, not an agent"
                )
            if opts.host_id and opts.host_id != identity.name:
                raise TlsConfigError(
                    f"--host-id {opts.host_id[:64]!r}: the certificate in {opts.tls_dir} is for "
                    f"host {identity.name!r}"
                )
            opts.host_id = identity.name
        warning = check_listen(opts.listen, tls, opts.insecure, "tessera-agent")
    except TlsConfigError as err:
        print(f"tessera-agent: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if warning:
        log.warning("%s", warning)
    return tls


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of tessera-agent."""
    p = argparse.ArgumentParser(prog="tessera-agent", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def host_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--sysfs-root",
            type=Path,
            default=Path(os.environ.get("TESSERA_SYSFS_ROOT", "/")),
            help="directory holding sys/ and dev/ ('/' on a real host)",
        )
        sp.add_argument("--host-id", default="", help="name to register under (hostname)")
        sp.add_argument(
            "--label", type=_label, action="append", default=[], help="KEY=VALUE host label"
        )
        sp.add_argument(
            "--allow",
            action="append",
            default=[],
            metavar="SPEC",
            help="a device the agent may hand over: PCI address, VENDOR:DEVICE (15b3:*) or "
            "class=PREFIX (class=0302); repeatable [TESSERA_AGENT_ALLOW, comma-separated]; "
            "default: the classes the scheduler offers (display, network, accelerators)",
        )

    run = sub.add_parser("run", help="register, heartbeat and serve the Agent service")
    host_opts(run)
    run.add_argument(
        "--scheduler",
        default=os.environ.get("TESSERA_SCHEDULER", "127.0.0.1:50051"),
        help="scheduler address [TESSERA_SCHEDULER]",
    )
    run.add_argument("--listen", default="127.0.0.1:0", help="Agent service address")
    run.add_argument("--advertise", default="", help="host to advertise instead of --listen's")
    run.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("TESSERA_AGENT_STATE_DIR", "/var/lib/tessera-agent")),
        help="where the checkpoint lives [TESSERA_AGENT_STATE_DIR]",
    )
    run.add_argument(
        "--fake-kernel",
        action="store_true",
        help="drive a fake host tree through the kernel emulator (tests and demos)",
    )
    run.add_argument(
        "--tls-dir",
        type=Path,
        default=Path(os.environ["TESSERA_TLS_DIR"]) if os.environ.get("TESSERA_TLS_DIR") else None,
        help="mutual TLS: ca.pem, cert.pem (agent/<host-id>), key.pem; reloaded when they "
        "change [TESSERA_TLS_DIR]; without it, plaintext on loopback only",
    )
    run.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext on a non-loopback --listen (anyone who reaches it can drive "
        "this host's devices)",
    )
    run.add_argument(
        "--audit-log",
        default=os.environ.get("TESSERA_AUDIT_LOG", ""),
        help="audit records (JSON lines) to this file, or - for stdout [TESSERA_AUDIT_LOG]",
    )
    add_log_flags(run, os.environ)

    inv = sub.add_parser("inventory", help="print what the agent would report")
    host_opts(inv)
    inv.add_argument("--json", action="store_true", help="HostInventory in protobuf JSON")

    fake = sub.add_parser("fakehost", help="build a named fake host tree")
    fake.add_argument("action", choices=["build", "list"])
    fake.add_argument("name", nargs="?")
    fake.add_argument("dir", nargs="?")
    fake.add_argument(
        "--mig", action="append", default=[], metavar="ADDRESS", help="enable MIG on this GPU"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of tessera-agent."""
    opts = parse_args(argv)
    if opts.command in ("run", "inventory"):
        _check_sysfs_root(opts.sysfs_root)
    if opts.command == "inventory":
        return cmd_inventory(opts)
    if opts.command == "fakehost":
        return cmd_fakehost(opts)
    configure(opts.log_level, opts.log_format)
    return asyncio.run(_run(opts))


if __name__ == "__main__":
    sys.exit(main())
