"""A whole Tessera cluster as real processes on this machine.

Starts an embedded Valkey, a scheduler and agents on fake host trees, each a
separate process talking real gRPC and the Redis protocol, exactly as they
would across machines. The demo and the end-to-end tests use it. Fake hosts
are built by ``tessera-agent fakehost`` in a subprocess: the scheduler package
never imports the agent's code.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc

from tessera.client.paging import all_hosts
from tessera.security.certs import CA_KEY, CERT, create_ca, issue
from tessera.security.identity import SCHEDULER_DNS_NAME
from tessera.security.tls import TlsDir, sync_channel
from tessera.v1 import scheduler_pb2_grpc


class ClusterError(RuntimeError):
    """A process of the local cluster failed to start or answer."""


def _pump(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """The stdout lines of a process, read by a thread as they come."""
    lines: queue.Queue[str] = queue.Queue()
    stream = proc.stdout
    assert stream is not None

    def pump(out: IO[str]) -> None:
        for line in out:
            lines.put(line)

    threading.Thread(target=pump, args=(stream,), daemon=True).start()
    return lines


def _first_line(
    proc: subprocess.Popen[str],
    timeout_s: float,
    what: str,
    log: Path,
    lines: queue.Queue[str] | None = None,
) -> str:
    """The next stdout line of a process (the first: its announced address)."""
    lines = lines if lines is not None else _pump(proc)
    deadline = time.monotonic() + timeout_s
    # Poll, so a process that died at start-up is reported at once.
    while time.monotonic() < deadline:
        try:
            return lines.get(timeout=0.1).strip()
        except queue.Empty:
            if proc.poll() is not None and lines.empty():
                break
    if proc.poll() is None:
        proc.kill()
    tail = log.read_text()[-2000:] if log.exists() else ""
    raise ClusterError(f"{what} did not start (exit {proc.poll()}); log:\n{tail}")


@dataclass
class LocalCluster:
    """Processes of one local cluster, stopped together.

    With ``tls`` (the default) the cluster has its own CA under
    ``workdir/tls/ca``; every scheduler and agent gets a certificate for its
    identity and serves mutual TLS, and :meth:`channel` calls as any identity
    (an admin by default). Each scheduler writes its audit log to
    ``workdir/logs/<name>.audit.jsonl``.

    Args:
        workdir: where data, fake hosts, checkpoints and logs go.
        tls: mutual TLS everywhere; False runs plaintext on loopback.
    """

    workdir: Path
    tls: bool = True
    redis_url: str = ""
    scheduler_address: str = ""
    agents: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    #: Scheduler name -> the dashboard URL it announced (``--http-listen``).
    dashboards: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    _procs: list[subprocess.Popen[str]] = field(default_factory=list)
    _valkey_args: list[str] = field(default_factory=list)
    _channel: grpc.Channel | None = None

    @property
    def ca_dir(self) -> Path:
        """The cluster's CA (created on first use)."""
        ca = self.workdir / "tls" / "ca"
        if not (ca / CA_KEY).exists():
            create_ca(ca, common_name=f"Tessera local cluster CA ({self.workdir.name})")
        return ca

    def tls_dir(self, role: str, name: str) -> Path:
        """A TLS directory for one identity, issued by the cluster's CA on first use."""
        out = self.workdir / "tls" / f"{role}-{name}"
        if not (out / CERT).exists():
            issue(self.ca_dir, role, name, out)
        return out

    def channel(self, address: str = "", role: str = "admin", name: str = "admin") -> grpc.Channel:
        """A blocking channel to a scheduler (default: the first) as ``role/name``."""
        tls = TlsDir(self.tls_dir(role, name)) if self.tls else None
        return sync_channel(address or self.scheduler_address, tls, SCHEDULER_DNS_NAME)

    def _tls_args(self, role: str, name: str) -> list[str]:
        return ["--tls-dir", str(self.tls_dir(role, name))] if self.tls else []

    def _spawn(
        self, name: str, args: list[str], env_extra: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[str], Path]:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
        with log.open("a") as err:
            proc = subprocess.Popen(
                [sys.executable, *args],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                start_new_session=True,  # a Ctrl-C of the demo reaches us, not them
            )
        self._procs.append(proc)
        self.processes[name] = proc
        return proc, log

    def start_valkey(self, appendfsync: str | None = None, port: int | None = None) -> str:
        """Start the embedded Valkey (AOF in workdir/valkey); returns its URL.

        Args:
            appendfsync: the AOF fsync policy (``always``, ``everysec``, ``no``);
                None keeps the embedded server's default.
            port: TCP port; None picks a free one.
        """
        args = [
            "-m",
            "tessera.scheduler.store.embedded",
            "--data-dir",
            str(self.workdir / "valkey"),
        ]
        if appendfsync is not None:
            args += ["--appendfsync", appendfsync]
        self._valkey_args = list(args)
        if port is not None:
            args += ["--port", str(port)]
        proc, log = self._spawn("valkey", args)
        self.redis_url = _first_line(proc, 30, "Valkey", log)
        return self.redis_url

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send a signal (default SIGKILL) to a process of the cluster and reap it.

        Args:
            name: the process's name: ``valkey``, a scheduler's name,
                ``agent-<host id>``.
            sig: the signal.
        """
        proc = self.processes[name]
        if proc.poll() is None:
            proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(timeout=30)

    def valkey_server_pid(self) -> int:
        """The pid of the valkey-server process (a child of the ``valkey`` wrapper)."""
        wrapper = self.processes["valkey"].pid
        children = Path(f"/proc/{wrapper}/task/{wrapper}/children").read_text().split()
        if not children:
            raise ClusterError("the embedded Valkey wrapper has no valkey-server child")
        return int(children[0])

    def kill_valkey(self) -> None:
        """SIGKILL the valkey-server itself (a crash: no AOF flush, no shutdown).

        Its wrapper (``python -m tessera.scheduler.store.embedded``) sees it die and
        exits; both are reaped before this returns.
        """
        os.kill(self.valkey_server_pid(), signal.SIGKILL)
        self.processes["valkey"].wait(timeout=30)

    def restart_valkey(self) -> str:
        """Start the embedded Valkey again on the same data dir, port and fsync policy.

        Returns:
            Its URL (the same as before).
        """
        if not self.redis_url:
            raise ClusterError("Valkey was never started")
        port = int(self.redis_url.rsplit(":", 1)[1].split("/", 1)[0])
        old = self.processes.get("valkey")
        if old is not None and old.poll() is None:
            raise ClusterError("Valkey is still running; kill or stop it first")
        proc, log = self._spawn("valkey", [*self._valkey_args, "--port", str(port)])
        url = _first_line(proc, 60, "Valkey", log)
        if url != self.redis_url:
            raise ClusterError(f"Valkey came back at {url}, not {self.redis_url}")
        return url

    def start_scheduler(self, name: str = "scheduler", *extra: str) -> str:
        """Start a scheduler on a free port; returns its address.

        With ``--http-listen`` among ``extra``, the dashboard's URL it
        announces next is kept in :attr:`dashboards` under ``name``.
        """
        audit = self.workdir / "logs" / f"{name}.audit.jsonl"
        proc, log = self._spawn(
            name,
            [
                "-m", "tessera.scheduler", "--listen", "127.0.0.1:0",
                "--audit-log", str(audit), *self._tls_args("scheduler", name), *extra,
            ],
            # In the environment, not on the command line: the URL carries the
            # embedded Valkey's password, and argv is world-readable in ps.
            env_extra={"REDIS_URL": self.redis_url},
        )  # fmt: skip
        lines = _pump(proc)
        line = _first_line(proc, 30, "scheduler", log, lines)
        address = line.rsplit(" ", 1)[-1]
        if "--http-listen" in extra:
            self.dashboards[name] = _first_line(proc, 30, "dashboard", log, lines).rsplit(" ", 1)[
                -1
            ]
        self.scheduler_address = self.scheduler_address or address
        return address

    def build_fake_host(self, fixture: str, host_id: str, mig: tuple[str, ...] = ()) -> Path:
        """Lay out a named fake host tree; returns its root.

        Args:
            fixture: the fake host's name (``tessera-agent fakehost list``).
            host_id: the directory name under ``workdir/hosts``.
            mig: GPUs to put in MIG mode, as an operator would before the
                agent starts.
        """
        root = self.workdir / "hosts" / host_id
        flags = [arg for address in mig for arg in ("--mig", address)]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tessera.agent",
                "fakehost",
                "build",
                fixture,
                str(root),
                *flags,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(f"building fake host {fixture}: {result.stderr.strip()}")
        return root

    def start_agent(self, host_id: str, root: Path, labels: dict[str, str] | None = None) -> str:
        """Start an agent driving a fake host tree; returns its address."""
        args = [
            "-m", "tessera.agent", "run", "--fake-kernel", "--sysfs-root", str(root),
            "--host-id", host_id, "--scheduler", self.scheduler_address,
            "--state-dir", str(self.workdir / "agent-state"),
            "--audit-log", str(self.workdir / "logs" / f"agent-{host_id}.audit.jsonl"),
            *self._tls_args("agent", host_id),
        ]  # fmt: skip
        for key, value in sorted((labels or {}).items()):
            args += ["--label", f"{key}={value}"]
        proc, log = self._spawn(f"agent-{host_id}", args)
        line = _first_line(proc, 30, f"agent {host_id}", log)
        self.agents[host_id] = proc
        return line.rsplit(" ", 1)[-1]

    def stub(self) -> scheduler_pb2_grpc.SchedulerStub:
        """A Scheduler client for the first scheduler as an admin (one shared channel)."""
        if self._channel is None:
            self._channel = self.channel()
        return scheduler_pb2_grpc.SchedulerStub(self._channel)

    def wait_for_hosts(self, host_ids: set[str], timeout_s: float = 30) -> None:
        """Block until every host is registered and schedulable."""
        stub = self.stub()
        deadline = time.monotonic() + timeout_s
        seen: set[str] = set()
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                seen = {h.host_id for h in all_hosts(stub, timeout=5) if h.schedulable}
                if host_ids <= seen:
                    return
            time.sleep(0.1)
        raise ClusterError(f"hosts {sorted(host_ids - seen)} did not register in {timeout_s}s")

    def stop(self) -> None:
        """SIGTERM everything (agents first, Valkey last), then SIGKILL stragglers."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._procs.clear()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
