"""Single-request placement latency against fleet size: every policy in process, Tessera end to end.

In process: on the same seeded fleets (bench/fleet.py; 100, 1,000, 5,000 and
12,500 hosts, quick: 100 and 1,000) every policy of ``bench/policies.py``
places the same request shapes (bench/engine.py's ``SHAPES``: 1 GPU, 2 GPUs
on one NUMA node, GPU+NIC under one switch, MIG 1g.10gb, 2 VFs, 1 mdev),
interleaved, each plan committed to the snapshot (``with_reservation``,
untimed) before the next call: the steady state of a live scheduler. Each
policy starts from the same empty snapshot with a fresh memo; its first call
(which builds the host indexes it needs) is reported apart. Best fit scores
up to ``nodes_to_score`` feasible hosts per call, seconds each at scale: its
samples are capped (``BEST_FIT_BUDGET_S`` per fleet size, at least
``BEST_FIT_MIN_ROUNDS`` rounds of shapes), and the result says how many it got.

End to end (Tessera only: the baselines are not wired into the scheduler
service): one scheduler process on an embedded Valkey, the fleet registered
through the real Registry.Register RPC with its fake inventories, and one
stub agent process answering Prepare/Unprepare for every host (no sysfs, no
actuation: what is measured is gRPC, the store's snapshot read, the engine,
the Lua commit and the READY transition). Place calls, sequential, the same
shapes (the mdev one naming GRID P4-1Q: the service wants a type), placements
kept (steady state). 100 and 1,000 hosts (quick: 100).

The end-to-end cluster runs mutual TLS, as production does (``E2eCluster(tls=True)``,
the default): every host registers as its own ``agent/<host>`` identity, the
clients call as an admin, and the stub agent serves one certificate valid for
every host's agent name. ``E2eCluster(tls=False)`` runs it all plaintext on
loopback; bench/tls_cost.py sets the two side by side.

    PYTHONPATH=. .venv/bin/python bench/latency.py [--quick] [--out bench/out/latency.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

if __package__ in (None, ""):
    # Run as a script: make ``bench`` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.engine import SHAPES, TENANTS, commit
from bench.fleet import build_fleet, describe, snapshot
from bench.policies import POLICIES
from tessera.scheduler.core.plan import Plan
from tessera.scheduler.core.request import (
    AffinityScope,
    DeviceForm,
    DeviceKind,
    ExclusivityDomain,
    Isolation,
    NumaPolicy,
    PlacementRequest,
)
from tessera.scheduler.core.snapshot import ClusterSnapshot
from tessera.scheduler.local_cluster import LocalCluster
from tessera.scheduler.service.agent_connections import WarmSettings, warm_budget
from tessera.security.certs import CA_CERT, CERT, KEY, issue
from tessera.security.identity import TRUST_DOMAIN, Role
from tessera.security.tls import TlsDir, channel_limit
from tessera.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    inventory_pb2,
    placement_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

OUT = Path(__file__).parent / "out"
SEED = 20261124

#: Wall-clock budget of best fit's timed calls per fleet size, and its floor.
BEST_FIT_BUDGET_S = 60.0
BEST_FIT_MIN_ROUNDS = 3

# ---------------------------------------------------------------- wire requests

_KIND = {
    DeviceKind.GPU: placement_pb2.DEVICE_KIND_GPU,
    DeviceKind.NIC: placement_pb2.DEVICE_KIND_NIC,
}
_FORM = {
    DeviceForm.WHOLE_DEVICE: placement_pb2.DEVICE_FORM_WHOLE_DEVICE,
    DeviceForm.VF: placement_pb2.DEVICE_FORM_VF,
    DeviceForm.MDEV: placement_pb2.DEVICE_FORM_MDEV,
    DeviceForm.MIG: placement_pb2.DEVICE_FORM_MIG,
}
_ISOLATION = {
    Isolation.EXCLUSIVE: placement_pb2.ISOLATION_EXCLUSIVE,
    Isolation.PARTITIONED: placement_pb2.ISOLATION_PARTITIONED,
    Isolation.SHARED: placement_pb2.ISOLATION_SHARED,
}
_NUMA = {
    NumaPolicy.NONE: placement_pb2.NUMA_POLICY_NONE,
    NumaPolicy.PREFERRED: placement_pb2.NUMA_POLICY_PREFERRED,
    NumaPolicy.SINGLE_NUMA_NODE: placement_pb2.NUMA_POLICY_SINGLE_NUMA_NODE,
    NumaPolicy.SOCKET: placement_pb2.NUMA_POLICY_SOCKET,
}
_SCOPE = {
    AffinityScope.SAME_SWITCH: placement_pb2.AFFINITY_SCOPE_SAME_SWITCH,
    AffinityScope.SAME_ROOT_PORT: placement_pb2.AFFINITY_SCOPE_SAME_ROOT_PORT,
    AffinityScope.SAME_NUMA_NODE: placement_pb2.AFFINITY_SCOPE_SAME_NUMA_NODE,
}
_EXCLUSIVITY = {
    ExclusivityDomain.NONE: placement_pb2.EXCLUSIVITY_DOMAIN_NONE,
    ExclusivityDomain.DEVICE: placement_pb2.EXCLUSIVITY_DOMAIN_DEVICE,
    ExclusivityDomain.PCIE_SWITCH: placement_pb2.EXCLUSIVITY_DOMAIN_PCIE_SWITCH,
    ExclusivityDomain.NUMA_NODE: placement_pb2.EXCLUSIVITY_DOMAIN_NUMA_NODE,
    ExclusivityDomain.HOST: placement_pb2.EXCLUSIVITY_DOMAIN_HOST,
}


#: The mdev type a wire request names when the core shape names none: the
#: service requires one per MDEV claim (the engine does not). GRID P4-1Q is
#: offered by every vGPU parent of the default fleet (virt-2s, vgpu).
WIRE_MDEV_TYPE = "nvidia-63"


def to_wire(request: PlacementRequest) -> placement_pb2.PlacementRequest:
    """A core request as a client sends it (the inverse of ``request_from_proto``).

    Covers what the benchmark shapes use: kinds GPU/NIC, forms, MIG profiles,
    mdev types, isolation, NUMA policy, affinities, exclusivity, selectors.
    An MDEV claim without types gets :data:`WIRE_MDEV_TYPE`; a ``+`` in the
    request id (shape names) becomes ``-``, as the service allows no ``+``.
    """
    return placement_pb2.PlacementRequest(
        request_id=request.request_id.replace("+", "-"),
        tenant=request.tenant,
        priority=request.priority,
        cpu_milli=request.cpu_milli,
        memory_mib=request.memory_mib,
        claims=[
            placement_pb2.Claim(
                name=c.name,
                kind=_KIND[c.kind],
                count=c.count,
                forms=sorted(_FORM[f] for f in c.forms),
                mdev_types=sorted(c.mdev_types)
                or ([WIRE_MDEV_TYPE] if DeviceForm.MDEV in c.forms else []),
                mig_profiles=sorted(c.mig_profiles),
                min_isolation=_ISOLATION[c.min_isolation],
                migratable=c.migratable,
            )
            for c in request.claims
        ],
        numa_policy=_NUMA[request.numa_policy],
        affinities=[
            placement_pb2.Affinity(
                claim_a=a.claim_a, claim_b=a.claim_b, scope=_SCOPE[a.scope], required=a.required
            )
            for a in request.affinities
        ],
        exclusivity=_EXCLUSIVITY[request.exclusivity],
        host_selector=dict(request.host_selector),
    )


# ---------------------------------------------------------------- stub agent


class StubAgent(agent_pb2_grpc.AgentServicer):
    """An Agent service for every fake host at once: Prepare and Unprepare succeed at once.

    Nothing is actuated, so end-to-end figures are the scheduler's own:
    gRPC, store reads, engine, commit and the READY transition. GetState
    answers nothing held; the benchmark's schedulers run their housekeeper
    too rarely to ask.
    """

    def Prepare(  # noqa: N802 (gRPC method name)
        self, request: agent_pb2.PrepareRequest, context: grpc.ServicerContext
    ) -> agent_pb2.PrepareResponse:
        """Answer the placement as carried out (handles left as the scheduler sent them)."""
        return agent_pb2.PrepareResponse(placement=request.placement)

    def Unprepare(  # noqa: N802
        self, request: agent_pb2.UnprepareRequest, context: grpc.ServicerContext
    ) -> agent_pb2.UnprepareResponse:
        """Nothing to undo."""
        return agent_pb2.UnprepareResponse()

    def GetState(  # noqa: N802
        self, request: agent_pb2.GetStateRequest, context: grpc.ServicerContext
    ) -> agent_pb2.GetStateResponse:
        """Holds nothing (see the class doc)."""
        return agent_pb2.GetStateResponse()


#: The stub agent's identity name (its URI SAN); it answers for every host.
STUB_AGENT_NAME = "stub"

#: The DNS SAN that makes the stub agent's certificate valid for every host's
#: agent name (``<host>.agent.tessera``): a wildcard covers one DNS label, so
#: host ids with a dot are not covered (:meth:`E2eCluster.register` refuses them).
STUB_AGENT_WILDCARD = f"*.{Role.AGENT.value}.{TRUST_DOMAIN}"

#: Who the benchmark clients are: the requests name many tenants, and an admin
#: acts for all of them (a tenant identity acts for itself only).
CLIENT_ROLE = "admin"
CLIENT_NAME = "bench"


def serve_stub_agent(tls_dir: Path | None = None) -> int:
    """Run a :class:`StubAgent` on a free port; the first stdout line names it.

    Args:
        tls_dir: ``ca.pem``, ``cert.pem``, ``key.pem``: serve mutual TLS,
            requiring a client certificate from that CA, as a real agent
            does; None serves plaintext.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    agent_pb2_grpc.add_AgentServicer_to_server(StubAgent(), server)
    if tls_dir is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        # Static credentials: the certificate outlives any benchmark run, so
        # the rotation a real agent supports (TlsDir) buys nothing here.
        credentials = grpc.ssl_server_credentials(
            [((tls_dir / KEY).read_bytes(), (tls_dir / CERT).read_bytes())],
            root_certificates=(tls_dir / CA_CERT).read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    print(f"stub agent listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()
    return 0


#: Open files the cluster's processes are given where this process may
#: (root): what the README asks of an operator for 20,000 hosts (a
#: connection per agent, 3 x hosts + 1,024), so that every replica can keep
#: each host's agent connected and the stub agent can take them all.
OPEN_FILES = 3 * 20_000 + 1_024


def _raise_open_files(wanted: int) -> None:
    """Raise this process's open-files limits to ``wanted`` where allowed (children inherit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: Longest ``agent_warm_interval`` :meth:`E2eCluster.register` waits out:
#: a longer one leaves the agents' connections to the Places themselves.
WARM_WAIT_MAX_S = 10.0


@dataclass
class E2eCluster:
    """A Valkey, scheduler replicas and one stub agent serving a registered fleet.

    Hosts are registered with the real Register RPC; the schedulers run with a
    day-long lease and housekeeping interval, so no heartbeats are needed and
    no background job competes with the clients during a run.

    With ``tls`` every process serves mutual TLS from the cluster's own CA
    (:class:`LocalCluster`): each host registers as its own ``agent/<host>``
    identity (the access policy lets an agent speak for its own host only),
    the clients call as ``admin/bench``, and the stub agent's certificate
    carries :data:`STUB_AGENT_WILDCARD`, so the scheduler's check that it
    reached ``<host>.agent.tessera`` passes for every host.

    Args:
        workdir: data, certificates and logs.
        replicas: scheduler processes.
        policy: the schedulers' ``--policy``.
        tls: mutual TLS everywhere (production's way); False: plaintext on loopback.
        log_level: the schedulers' ``--log-level`` (INFO: they log their
            commit outcomes when stopped, see :meth:`commit_outcomes`).
    """

    workdir: Path
    replicas: int = 1
    policy: str = "tessera"
    tls: bool = True
    log_level: str = "WARNING"
    #: The schedulers' ``--agent-warm-interval``: short, so that they open
    #: their connections to the hosts' agents as the hosts register (0: off).
    agent_warm_interval: float = 5.0
    #: More flags for every scheduler (``--http-listen 127.0.0.1:0``).
    scheduler_args: tuple[str, ...] = ()
    addresses: list[str] = field(default_factory=list)
    agent_address: str = ""
    #: Seconds spent issuing the hosts' agent certificates (TLS only), kept
    #: out of :meth:`register`'s time: an operator issues them beforehand.
    certs_s: float = 0.0
    _cluster: LocalCluster | None = None
    _agent: subprocess.Popen[str] | None = None

    def __enter__(self) -> E2eCluster:
        _raise_open_files(OPEN_FILES)
        self._cluster = LocalCluster(self.workdir, tls=self.tls)
        try:
            self._cluster.start_valkey()
            quiet = (
                "--lease",
                "86400",
                "--housekeeping-interval",
                "86400",
                "--log-level",
                self.log_level,
                "--policy",
                self.policy,
                "--agent-warm-interval",
                str(self.agent_warm_interval),
            )
            self.addresses = [
                self._cluster.start_scheduler(f"scheduler-{i}", *quiet, *self.scheduler_args)
                for i in range(self.replicas)
            ]
            command = [sys.executable, str(Path(__file__).resolve()), "--stub-agent"]
            if self.tls:
                stub_dir = self.workdir / "tls" / "stub-agent"
                issue(
                    self._cluster.ca_dir,
                    Role.AGENT.value,
                    STUB_AGENT_NAME,
                    stub_dir,
                    dns_names=[STUB_AGENT_WILDCARD],
                )
                command += ["--tls-dir", str(stub_dir)]
            self._agent = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            assert self._agent.stdout is not None
            self.agent_address = self._agent.stdout.readline().strip().rsplit(" ", 1)[-1]
            if not self.agent_address:
                raise RuntimeError("the stub agent did not start")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._agent is not None:
            self._agent.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._agent.wait(timeout=10)
            if self._agent.poll() is None:
                self._agent.kill()
                self._agent.wait()
            self._agent = None
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None

    def commit_outcomes(self) -> dict[str, int]:
        """Every replica's commit outcomes, summed, as they logged them when stopped.

        Read after the cluster is stopped, with ``log_level`` INFO; empty otherwise.
        """
        total: dict[str, int] = {}
        for log in (self.workdir / "logs").glob("scheduler-*.log"):
            for line in log.read_text(errors="replace").splitlines():
                _, found, counts = line.partition("commit outcomes this run: ")
                if found:
                    for outcome, n in json.loads(counts).items():
                        total[outcome] = total.get(outcome, 0) + int(n)
        return total

    @property
    def local(self) -> LocalCluster:
        """The processes (only while the cluster is up)."""
        if self._cluster is None:
            raise RuntimeError("the E2eCluster is not started: use it as a context manager")
        return self._cluster

    def register(self, fleet: Sequence[inventory_pb2.HostInventory]) -> float:
        """Register every host through the first replica; returns the seconds it took.

        Then waits (untimed) until the replicas can have connected to every
        host's agent.

        Each host registers on a channel of its own, as its agent would (with
        TLS, as its ``agent/<host>`` identity). With TLS the hosts'
        certificates are issued first, timed apart in :attr:`certs_s`.

        Raises:
            ValueError: with TLS, a host id holding a dot: the stub agent's
                wildcard certificate would not cover its agent name.
        """
        cluster = self.local
        if self.tls:
            dotted = [inv.host_id for inv in fleet if "." in inv.host_id]
            if dotted:
                raise ValueError(
                    f"host ids with a dot ({dotted[:3]}) are not covered by the stub agent's "
                    f"{STUB_AGENT_WILDCARD} certificate"
                )
            started = time.perf_counter()
            for inventory in fleet:
                cluster.tls_dir(Role.AGENT.value, inventory.host_id)
            self.certs_s += time.perf_counter() - started
        started = time.perf_counter()
        for inventory in fleet:
            with cluster.channel(self.addresses[0], Role.AGENT.value, inventory.host_id) as channel:
                scheduler_pb2_grpc.RegistryStub(channel).Register(
                    scheduler_pb2.RegisterRequest(
                        inventory=inventory, agent_address=self.agent_address
                    ),
                    timeout=60,
                )
        took = time.perf_counter() - started
        # The replicas open their connections to the hosts' agents as hosts
        # register, at their warming rate and up to their budget (this
        # process's open-files limit, which they inherit): Places measured
        # after this do not wait for a TLS handshake, as on a replica that
        # has run a while.
        if 0 < self.agent_warm_interval <= WARM_WAIT_MAX_S:
            warming = min(len(fleet), self.warm_budget) / WarmSettings().rate_per_s
            time.sleep(max(0.0, warming - took) + 3 * self.agent_warm_interval)
        return took

    @property
    def warm_budget(self) -> int:
        """Hosts each replica keeps connected at most, at this process's open-files limit."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return warm_budget(channel_limit(soft))

    def client_tls(self) -> TlsDir | None:
        """The clients' TLS directory (``admin/bench``), loaded; None in plaintext."""
        if not self.tls:
            return None
        return TlsDir(self.local.tls_dir(CLIENT_ROLE, CLIENT_NAME))

    @contextlib.contextmanager
    def stubs(self) -> Iterator[list[scheduler_pb2_grpc.SchedulerStub]]:
        """One Scheduler client per replica (as ``admin/bench``), channels closed after."""
        channels = [self.local.channel(a, CLIENT_ROLE, CLIENT_NAME) for a in self.addresses]
        try:
            yield [scheduler_pb2_grpc.SchedulerStub(c) for c in channels]
        finally:
            for channel in channels:
                channel.close()


# ---------------------------------------------------------------- in process


def _rounds(
    policy_name: str, snap: ClusterSnapshot, per_shape: int, budget_s: float
) -> dict[str, Any]:
    """First call, then interleaved rounds of every shape, plans committed."""
    policy = POLICIES[policy_name]()
    capped = policy_name == "best-fit"
    first_request = SHAPES["1-gpu"]("first", "tenant-first")
    started = time.perf_counter()
    first = policy.place(snap, first_request)
    first_s = time.perf_counter() - started
    if isinstance(first, Plan):
        snap = commit(snap, first_request, first)
    samples: dict[str, list[float]] = {name: [] for name in SHAPES}
    placed = dict.fromkeys(SHAPES, 0)
    spent = 0.0
    rounds = 0
    for rep in range(per_shape):
        if capped and rep >= BEST_FIT_MIN_ROUNDS and spent >= budget_s:
            break
        for name, shape in SHAPES.items():
            request = shape(f"{name}-{rep:04d}", f"tenant-{rep % TENANTS:02d}")
            t0 = time.perf_counter()
            result = policy.place(snap, request)
            took = time.perf_counter() - t0
            spent += took
            samples[name].append(took)
            if isinstance(result, Plan):
                placed[name] += 1
                snap = commit(snap, request, result)
        rounds += 1
    every = [s for values in samples.values() for s in values]
    return {
        "first_call_ms": round(first_s * 1000, 3),
        "rounds": rounds,
        "capped": capped and rounds < per_shape,
        "all": report.summary_ms(every),
        "shapes": {
            name: {**report.summary_ms(samples[name]), "placed": placed[name]} for name in SHAPES
        },
    }


def in_process(sizes: Sequence[int], per_shape: int, seed: int) -> dict[str, Any]:
    """Every policy on every fleet size; same fleet and empty snapshot for all."""
    out: dict[str, Any] = {}
    for n in sizes:
        t0 = time.perf_counter()
        fleet = build_fleet(n, seed)
        snap = snapshot(fleet)
        # Long-lived host views out of the cyclic collector's way, as the
        # scheduler does after parsing inventories (PlacementCoordinator).
        gc.collect()
        gc.freeze()
        entry: dict[str, Any] = {
            "fleet": describe(fleet),
            "setup_s": round(time.perf_counter() - t0, 3),
        }
        policies: dict[str, Any] = {}
        for name in POLICIES:
            policies[name] = _rounds(name, snap, per_shape, BEST_FIT_BUDGET_S)
            print(f"    {n} hosts {name}: {policies[name]['all']}", flush=True)
        entry["policies"] = policies
        out[str(n)] = entry
        del fleet, snap
        gc.unfreeze()
        gc.collect()
    return out


# ---------------------------------------------------------------- end to end


def end_to_end(
    sizes: Sequence[int], per_shape: int, seed: int, policies: Sequence[str] = tuple(POLICIES)
) -> dict[str, Any]:
    """Place over gRPC, sequential, on registered fleets of ``sizes``, per policy.

    Each policy runs in the scheduler service itself (``--policy``), so every
    one pays the same RPC, snapshot read, commit and Prepare path.
    """
    out: dict[str, Any] = {}
    for n in sizes:
        fleet = build_fleet(n, seed)
        out[str(n)] = {}
        for policy in policies:
            out[str(n)][policy] = _end_to_end_one(fleet, policy, per_shape)
            print(f"    e2e {n} hosts {policy}: {out[str(n)][policy]['all']}", flush=True)
    return out


@dataclass
class SequentialRun:
    """What one sequential client saw: Place (and Release) durations, failed calls.

    Attributes:
        place_s: seconds per successful Place, by shape.
        release_s: seconds per successful Release (none when placements are kept).
        errors: failed calls by status code (``release-<CODE>`` for Release).
    """

    place_s: dict[str, list[float]]
    release_s: list[float]
    errors: dict[str, int]

    @property
    def every_place_s(self) -> list[float]:
        """Every Place duration, all shapes together."""
        return [s for values in self.place_s.values() for s in values]


def first_place(stub: scheduler_pb2_grpc.SchedulerStub, request_id: str) -> float:
    """The seconds of a first Place (1 GPU), kept: it parses every inventory.

    The first Place after registration builds the engine's indexes: it is
    reported apart, like the in-process first call.
    """
    first = to_wire(SHAPES["1-gpu"](request_id, "tenant-first"))
    t0 = time.perf_counter()
    stub.Place(scheduler_pb2.PlaceRequest(request=first), timeout=600)
    return time.perf_counter() - t0


def sequential(
    stub: scheduler_pb2_grpc.SchedulerStub, per_shape: int, prefix: str, *, release: bool = False
) -> SequentialRun:
    """``per_shape`` rounds of every shape, one call at a time, through ``stub``.

    Args:
        stub: the client.
        per_shape: rounds; each places every shape of ``SHAPES`` once.
        prefix: of the request ids, unique per call of this function: a
            request id seen before answers the first call's placement.
        release: release each placement right after it is placed (timed
            apart), so repeated runs see the same state; else keep them.
    """
    run = SequentialRun({name: [] for name in SHAPES}, [], {})

    def failed(code: str) -> None:
        run.errors[code] = run.errors.get(code, 0) + 1

    for rep in range(per_shape):
        for name, shape in SHAPES.items():
            msg = to_wire(shape(f"{prefix}-{name}-{rep:04d}", f"tenant-{rep % TENANTS:02d}"))
            t1 = time.perf_counter()
            try:
                placed = stub.Place(scheduler_pb2.PlaceRequest(request=msg), timeout=120)
            except grpc.RpcError as err:
                failed(err.code().name if isinstance(err, grpc.Call) else "UNKNOWN")
                continue
            run.place_s[name].append(time.perf_counter() - t1)
            if not release:
                continue
            t2 = time.perf_counter()
            try:
                stub.Release(
                    scheduler_pb2.ReleaseRequest(placement_id=placed.placement.placement_id),
                    timeout=120,
                )
            except grpc.RpcError as err:
                code = err.code().name if isinstance(err, grpc.Call) else "UNKNOWN"
                failed(f"release-{code}")
                continue
            run.release_s.append(time.perf_counter() - t2)
    return run


def warm_against_cold(size: int, per_shape: int, seed: int, rounds: int = 2) -> dict[str, Any]:
    """Tessera over gRPC with the agents' connections warmed, and with warming off.

    Each ``rounds`` times, alternating, on one seeded fleet of ``size``:
    what a Place costs when its Prepare may have to open the connection to
    the host's agent first (``--agent-warm-interval 0``).
    """
    fleet = build_fleet(size, seed)
    out: dict[str, list[dict[str, Any]]] = {"warm": [], "cold": []}
    for _ in range(rounds):
        for name, interval in (("warm", 5.0), ("cold", 0.0)):
            result = _end_to_end_one(fleet, "tessera", per_shape, agent_warm_interval=interval)
            out[name].append(result)
            print(f"    e2e {size} hosts, agents {name}: {result['all']}", flush=True)
    return {"hosts": size, "per_shape": per_shape, "runs": out}


def _end_to_end_one(
    fleet: Sequence[inventory_pb2.HostInventory],
    policy: str,
    per_shape: int,
    *,
    agent_warm_interval: float = 5.0,
) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="tessera-latency-") as tmp,
        E2eCluster(Path(tmp), policy=policy, agent_warm_interval=agent_warm_interval) as cluster,
        cluster.stubs() as stubs,
    ):
        register_s = cluster.register(fleet)
        first_s = first_place(stubs[0], "e2e-first")
        run = sequential(stubs[0], per_shape, "e2e")
    return {
        "hosts": len(fleet),
        "policy": policy,
        "tls": cluster.tls,
        "certs_s": round(cluster.certs_s, 3),
        "register_s": round(register_s, 3),
        "first_place_ms": round(first_s * 1000, 3),
        "all": report.summary_ms(run.every_place_s),
        "shapes": {name: report.summary_ms(run.place_s[name]) for name in SHAPES},
        "errors": run.errors,
    }


# ---------------------------------------------------------------- part API


#: The largest fleet measured end to end, by Tessera alone.
E2E_FLEET = 10_000


def run(quick: bool) -> dict[str, Any]:
    """Measure; a JSON-able result (see the module doc)."""
    if quick:
        sizes, per_shape, e2e_sizes, e2e_per_shape = [100, 1_000], 10, [100], 5
    else:
        sizes, per_shape, e2e_sizes, e2e_per_shape = (
            [100, 1_000, 5_000, 12_500],
            30,
            [100, 1_000],
            20,
        )
    started = time.perf_counter()
    result: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "seed": SEED,
        "shapes": list(SHAPES),
        "per_shape": per_shape,
        "best_fit_budget_s": BEST_FIT_BUDGET_S,
        "in_process": in_process(sizes, per_shape, SEED),
        "end_to_end": end_to_end(e2e_sizes, e2e_per_shape, SEED),
    }
    if not quick:
        # The fleet size the live model is for (issue 12), Tessera alone:
        # registering 10,000 hosts over RPC once per baseline adds nothing.
        result["end_to_end"].update(
            end_to_end([E2E_FLEET], e2e_per_shape, SEED, policies=("tessera",))
        )
    result["wall_s"] = round(time.perf_counter() - started, 3)
    return result


def section(result: Mapping[str, Any], plots: Path) -> str:
    """The Markdown section: tables per size and policy, plots against fleet size."""
    inproc: Mapping[str, Any] = result["in_process"]
    sizes = sorted(inproc, key=int)
    policies = list(next(iter(inproc.values()))["policies"]) if inproc else []
    rows: list[list[object]] = []
    for n in sizes:
        for name in policies:
            p = inproc[n]["policies"][name]
            rows.append(
                [
                    int(n),
                    name,
                    p["all"]["n"],
                    p["all"]["p50_ms"],
                    p["all"]["p99_ms"],
                    p["first_call_ms"],
                    "yes" if p["capped"] else "",
                ]
            )
    series = {
        name: [(float(n), float(inproc[n]["policies"][name]["all"]["p50_ms"])) for n in sizes]
        for name in policies
    }
    series99 = {
        f"{name} p99": [
            (float(n), float(inproc[n]["policies"][name]["all"]["p99_ms"])) for n in sizes
        ]
        for name in policies
    }
    p50_plot = report.line_plot(
        plots / "latency_p50.png",
        "Single-request latency p50 (in process)",
        "hosts",
        "ms",
        series,
        logx=True,
        logy=True,
    )
    p99_plot = report.line_plot(
        plots / "latency_p99.png",
        "Single-request latency p99 (in process)",
        "hosts",
        "ms",
        series99,
        logx=True,
        logy=True,
    )
    shape_rows: list[list[object]] = []
    largest = sizes[-1] if sizes else ""
    for shape in result["shapes"]:
        row: list[object] = [shape]
        for name in policies:
            s = inproc[largest]["policies"][name]["shapes"][shape]
            row += [s["p50_ms"], f"{s['placed']}/{s['n']}"]
        shape_rows.append(row)
    e2e: Mapping[str, Any] = result["end_to_end"]
    e2e_rows = [
        [
            e["hosts"],
            e["policy"],
            e["all"]["n"],
            e["all"]["p50_ms"],
            e["all"]["p99_ms"],
            e["first_place_ms"],
            e["register_s"],
            ", ".join(f"{k} {v}" for k, v in e["errors"].items()) or "none",
        ]
        for size in sorted(e2e, key=int)
        for e in e2e[size].values()
    ]
    return "\n\n".join(
        [
            "## Single-request latency",
            "Every policy of `bench/policies.py` on the same seeded fleets (bench/fleet.py), "
            "in process, the six request shapes of bench/engine.py interleaved, each plan "
            "committed to the snapshot before the next call (steady state). The first call "
            "(index build for the hosts it touches) is reported apart. Best fit is capped at "
            f"{result['best_fit_budget_s']:.0f} s of timed calls per fleet size (at least "
            f"{BEST_FIT_MIN_ROUNDS} rounds): `capped` marks where it got fewer samples than the "
            f"others ({result['per_shape']} rounds of {len(result['shapes'])} shapes).",
            report.table(
                ["hosts", "policy", "samples", "p50 ms", "p99 ms", "first call ms", "capped"],
                rows,
            ),
            p50_plot,
            p99_plot,
            f"Per shape at {int(largest) if largest else 0:,} hosts (p50 ms, placed/asked):",
            report.table(
                ["shape", *[h for name in policies for h in (f"{name} p50", f"{name} placed")]],
                shape_rows,
            ),
            "### End to end",
            "Place over gRPC: one scheduler process running the policy (`tessera-scheduler "
            "--policy NAME`), an embedded Valkey, the fleet registered with the real Register "
            "RPC, one stub agent answering Prepare for every host (no actuation), mutual TLS "
            "between every process as in production (part (f) sets it beside plaintext). "
            "The scheduler opens its connections to the hosts' agents as they register "
            "(`--agent-warm-interval 5`, open files raised to 61,024 as the README asks for "
            "20,000 hosts; the run waits until it can have opened them all), as a replica that "
            "has run a while has them; that round also parses every inventory. "
            "Sequential calls, the same shapes, placements kept. The first Place builds the "
            "engine's indexes.",
            report.table(
                [
                    "hosts",
                    "policy",
                    "samples",
                    "p50 ms",
                    "p99 ms",
                    "first Place ms",
                    "register s",
                    "errors",
                ],
                e2e_rows,
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run, write JSON, print a summary."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, for CI")
    p.add_argument("--out", type=Path, default=OUT / "latency.json")
    p.add_argument("--stub-agent", action="store_true", help=argparse.SUPPRESS)
    # With --stub-agent: serve mutual TLS from this directory (else plaintext).
    p.add_argument("--tls-dir", type=Path, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.stub_agent:
        return serve_stub_agent(opts.tls_dir)
    result = run(opts.quick)
    report.write_result(result, opts.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
