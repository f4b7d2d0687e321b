"""Attacks on the dashboard, over the scheduler's real HTTPS, with real processes and Chromium.

Each test is one sentence the dashboard must keep whatever an attacker tries:
an outsider who only reaches the port, a holder of a certificate of the
cluster's CA with the wrong role (tenant, frontend, agent, viewer), an agent
that reports hostile strings in its inventory, or another site's page that an
admin opens. Some of these attacks worked when the tests were written (a
connection held open without a certificate, DNS rebinding of the plaintext
dashboard, audit records flooded by outsiders, refused actions unaudited, the
server's version told, event streams opened by other sites or held by one
identity or by closed pages, the store's address on /readyz); every test
passes now and keeps its attack refused.

The cluster::

    scheduler (mutual TLS, --http-listen, --lease 600) on an embedded Valkey
      host "evil": registered over gRPC with agent/evil's certificate; its labels,
                   GPU models and a function's host use are HTML and htmx markup
      host "calm": an ordinary gpu-workstation, the target of every action

No agent process runs: a cordon only writes the store, and registering over
gRPC is exactly what a hostile agent does.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import grpc
import pytest
from google.protobuf import json_format
from playwright.sync_api import Dialog, expect, sync_playwright

from tessera.scheduler.dashboard.live import MAX_LISTENERS
from tessera.scheduler.local_cluster import LocalCluster
from tessera.v1 import inventory_pb2, scheduler_pb2, scheduler_pb2_grpc

GOLDEN = Path(__file__).resolve().parents[1] / "agent" / "golden"
CHROMIUM = os.environ.get("TESSERA_CHROMIUM", "/usr/bin/chromium")
EVIL, CALM = "evil", "calm"
#: Markup an agent reports as a label value, a GPU model and a host use (at most
#: 96 characters, NVML's bound on a model name). Were it ever parsed as HTML,
#: htmx would cordon ``calm`` on load, whatever the Content-Security-Policy says.
PAYLOAD = (
    '<b data-pwned hx-post="/hosts/calm/cordon" hx-trigger="load">x</b><script>pwned=1</script>'
)
#: What htmx sends with a button's POST from the dashboard's own page.
HTMX = {"HX-Request": "true", "Sec-Fetch-Site": "same-origin"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


# -- the cluster ------------------------------------------------------------------


def inventory(host_id: str, *, hostile: bool) -> inventory_pb2.HostInventory:
    """A gpu-workstation's inventory; ``hostile``: markup in every free text it has."""
    data = json.loads((GOLDEN / "gpu-workstation.json").read_text())
    data.update(hostId=host_id, bootId=f"boot-{host_id}", generation="1")
    if hostile:
        data["labels"] = {"xss": PAYLOAD, "quote": '" onmouseover="pwned=1'}
        for gpu in data["gpus"]:
            gpu["model"] = PAYLOAD
        for fn in data["pciFunctions"]:
            if fn["role"] == "PCI_ROLE_RCIEP":
                fn["hostUse"] = PAYLOAD
    return json_format.ParseDict(data, inventory_pb2.HostInventory())


def register(channel: grpc.Channel, host_id: str, *, hostile: bool = False) -> None:
    request = scheduler_pb2.RegisterRequest(
        inventory=inventory(host_id, hostile=hostile), agent_address="127.0.0.1:9"
    )
    scheduler_pb2_grpc.RegistryStub(channel).Register(request, timeout=15)


@dataclass(frozen=True)
class Target:
    """The running cluster and its dashboard's port."""

    cluster: LocalCluster
    url: str
    port: int


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with LocalCluster(tmp_path_factory.mktemp("dashboard-attacks")) as c:
        c.start_valkey()
        c.start_scheduler("scheduler", "--lease", "600", "--http-listen", "127.0.0.1:0")
        for host, hostile in ((EVIL, True), (CALM, False)):
            with c.channel(role="agent", name=host) as channel:
                register(channel, host, hostile=hostile)
        c.wait_for_hosts({EVIL, CALM})
        url = c.dashboards["scheduler"]
        yield Target(c, url, urlsplit(url).port or 0)


@pytest.fixture
def plaintext(target: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """A plaintext cluster (development mode): its own scheduler, on database 1 of the Valkey."""
    with LocalCluster(tmp_path_factory.mktemp("dashboard-plaintext"), tls=False) as c:
        c.redis_url = target.cluster.redis_url.rsplit("/", 1)[0] + "/1"
        c.start_scheduler("plain", "--lease", "600", "--http-listen", "127.0.0.1:0")
        with c.channel() as channel:
            register(channel, CALM)
        c.wait_for_hosts({CALM})
        url = c.dashboards["plain"]
        yield Target(c, url, urlsplit(url).port or 0)


def cordoned(cluster: LocalCluster) -> dict[str, bool]:
    """Each registered host and whether it is cordoned, as gRPC's ListHosts says."""
    with cluster.channel() as channel:
        hosts = scheduler_pb2_grpc.SchedulerStub(channel).ListHosts(
            scheduler_pb2.ListHostsRequest(), timeout=15
        )
    return {h.host_id: h.cordoned for h in hosts.hosts}


def audit(target: Target) -> list[dict[str, Any]]:
    lines = (target.cluster.workdir / "logs" / "scheduler.audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# -- talking to the dashboard ---------------------------------------------------------


def tls_context(target: Target, role: str | None, name: str = "") -> ssl.SSLContext:
    """A client context trusting the cluster's CA, presenting ``role/name`` (None: none)."""
    ctx = ssl.create_default_context(cafile=str(target.cluster.ca_dir / "ca.pem"))
    # The scheduler's certificate names scheduler.tessera; what is tested is the client.
    ctx.check_hostname = False
    if role is not None:
        tls = target.cluster.tls_dir(role, name or role)
        ctx.load_cert_chain(tls / "cert.pem", tls / "key.pem")
    return ctx


def connect(target: Target, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", target.port), timeout=10)
    return ctx.wrap_socket(sock, server_hostname="scheduler.tessera")


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: str


def request(
    target: Target,
    method: str,
    path: str,
    *,
    role: str | None = "admin",
    name: str = "",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> Answer:
    """One request written byte for byte (any method, any path), answered and closed."""
    head = {"Host": f"127.0.0.1:{target.port}", "Connection": "close", **(headers or {})}
    if body:
        head["Content-Length"] = str(len(body))
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    sock = connect(target, tls_context(target, role, name))
    data = b""
    try:
        # It may answer (413) before reading the whole body: read what it said.
        with contextlib.suppress(OSError):
            sock.sendall("\r\n".join(lines).encode() + body)
        while chunk := sock.recv(65536):
            data += chunk
    except (ssl.SSLError, OSError):
        pass
    finally:
        sock.close()
    raw_head, _, raw_body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
    found: dict[str, str] = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        found[key.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), found, raw_body.decode(errors="replace"))


def open_stream(
    target: Target, ctx: ssl.SSLContext, headers: dict[str, str] | None = None
) -> tuple[int, ssl.SSLSocket]:
    """GET /events: the status, and the connection, left open (the caller closes it)."""
    sock = connect(target, ctx)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\n{extra}\r\n".encode())
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return int(head.split()[1]), sock


def open_streams(target: Target, ctx: ssl.SSLContext) -> list[ssl.SSLSocket]:
    """As many event streams as the dashboard grants one identity, up to MAX_LISTENERS."""
    held: list[ssl.SSLSocket] = []
    for _ in range(MAX_LISTENERS):
        status, sock = open_stream(target, ctx)
        held.append(sock)
        if status != 200:
            break
    return held


# -- attacks that are refused (kept refused) ----------------------------------------------


#: Paths that try to reach a page or a file past the access check or the static root.
PATH_TRICKS = (
    "/static/../fleet",
    "/static/%2e%2e/fleet",
    "/static%2f..%2ffleet",
    "/static/..%2ffleet",
    "/static/..%5cfleet",
    "/healthz/../fleet",
    "/healthz%2f..%2ffleet",
    "//fleet",
    "/%66leet",
    "/FLEET",
    "/fleet/",
    f"/hosts/{EVIL}/",
    "/events/",
    "/metrics;x",
    "/static/",
    "/static/../app.py",
    "/static/%2e%2e/app.py",
    "/static/..%2fapp.py",
    "/static/..%5c..%5capp.py",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/dashboard.css%00",
)


def test_no_path_trick_shows_a_page_or_a_file_to_a_caller_without_a_certificate(
    target: Target,
) -> None:
    for method in ("GET", "HEAD"):
        for path in PATH_TRICKS:
            answer = request(target, method, path, role=None)
            assert answer.status in (400, 401, 403, 404), (method, path, answer.status)
            for secret in (EVIL, "import ", "root:", "tessera_"):
                assert secret not in answer.body, (method, path, secret)
    # The assets themselves stay open: a browser fetches them before it is asked for a certificate.
    assert request(target, "GET", "/static/htmx.min.js", role=None).status == 200


def test_no_method_or_role_lets_anyone_but_an_admin_act(target: Target) -> None:
    actions = [f"/hosts/{CALM}/{a}" for a in ("cordon", "drain", "forget")]
    actions.append("/placements/pl-x@calm/release")
    for role, name in (("viewer", "vera"), ("admin", "admin")):
        for method in ("GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE", "TRACE", "post", "Post"):
            for path in actions:
                answer = request(target, method, path, role=role, name=name, headers=HTMX)
                assert not 200 <= answer.status < 300, (role, method, path, answer.status)
    for role, name in (
        ("tenant", "acme"),
        ("frontend", "portal"),
        ("agent", CALM),
        ("scheduler", "s"),
    ):
        for path in actions:
            answer = request(
                target, "POST", path, role=role, name=name, headers={**HTMX, **FORM}, body=b"r=x"
            )
            assert answer.status == 403, (role, path, answer.status)
    assert request(target, "GET", "/metrics", role="frontend", name="portal").status == 403
    assert cordoned(target.cluster) == {EVIL: False, CALM: False}


def test_an_action_sent_from_any_page_but_the_dashboards_own_is_refused_and_audited(
    target: Target,
) -> None:
    own = f"https://127.0.0.1:{target.port}"
    variants: list[dict[str, str]] = [
        {},
        {"Sec-Fetch-Site": "same-origin"},
        {"HX-Request": "1", "Sec-Fetch-Site": "same-origin"},
        {"HX-Request": "true", "Sec-Fetch-Site": "same-site"},
        {"HX-Request": "true", "Sec-Fetch-Site": "none"},
        {"HX-Request": "true", "Sec-Fetch-Site": "cross-site", "Origin": own},
        {"HX-Request": "true", "Origin": "null"},
        {"HX-Request": "true", "Origin": f"{own}.evil.example"},
        {"HX-Request": "true", "Origin": f"http://127.0.0.1:{target.port}"},
    ]
    before = len(audit(target))
    for headers in variants:
        answer = request(
            target,
            "POST",
            f"/hosts/{CALM}/cordon",
            headers={**headers, **FORM},
            body=b"reason=csrf",
        )
        assert answer.status == 403, headers
    refused = [
        r
        for r in audit(target)[before:]
        if r["outcome"] == "PERMISSION_DENIED" and r["action"].endswith(f"/{CALM}/cordon")
    ]
    assert len(refused) == len(variants)
    assert cordoned(target.cluster)[CALM] is False


def test_every_kind_of_answer_carries_the_security_headers(target: Target) -> None:
    for method, path, role in (
        ("GET", "/healthz", None),
        ("GET", "/fleet", None),
        ("GET", "/fleet", "tenant"),
        ("GET", "/nowhere", "admin"),
        ("PUT", "/fleet", "admin"),
        ("GET", "/static/dashboard.css", None),
        ("GET", "/fleet", "admin"),
        ("GET", f"/hosts/{EVIL}", "admin"),
        ("GET", "/hosts/bad!", "admin"),
    ):
        answer = request(target, method, path, role=role)
        csp = answer.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp, (method, path)
        assert "script-src 'self'" in csp and "unsafe" not in csp, (method, path)
        assert answer.headers.get("x-content-type-options") == "nosniff", (method, path)


def test_strings_an_agent_or_a_link_controls_are_shown_as_text_and_run_nothing(
    target: Target,
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM} (scripts/test_deps.sh installs it)")
    # Escaped, in the page as sent: no tag of the payload survives.
    for path in (f"/hosts/{EVIL}", "/fleet"):
        body = request(target, "GET", path).body
        assert "&lt;b data-pwned" in body and "<b data-pwned" not in body, path
    tls = target.cluster.tls_dir("admin", "alice")
    link = quote(PAYLOAD, safe="")
    dialogs: list[str] = []

    def dismiss(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            context = browser.new_context(
                ignore_https_errors=True,
                client_certificates=[
                    {
                        "origin": target.url.rstrip("/"),
                        "certPath": str(tls / "cert.pem"),
                        "keyPath": str(tls / "key.pem"),
                    }
                ],
            )
            page = context.new_page()
            page.on("dialog", dismiss)
            page.goto(target.url + f"hosts/{EVIL}")
            expect(page.locator(".facts")).to_contain_text(PAYLOAD)
            expect(page.locator(".tree")).to_contain_text(f"used by the host: {PAYLOAD}")
            for path in (
                "fleet",
                f"fleet?label={link}&model={link}&search={link}&tenant={link}",
                f"placements?tenant={link}",
                f"placements?host={link}",
                f"placements?state={link}",
                f"placements/{link}",
                f"hosts/{link}",
            ):
                page.goto(target.url + path)
                page.wait_for_timeout(200)  # htmx has processed the page: a load trigger fired
                assert page.locator("[data-pwned]").count() == 0, path
                assert page.evaluate("typeof window.pwned") == "undefined", path
            page.goto(target.url + f"fleet?label={link}")
            expect(page.locator("input[name=label]")).to_have_value(PAYLOAD)
        finally:
            browser.close()
    assert dialogs == []
    assert cordoned(target.cluster)[CALM] is False


# -- what must hold and does not yet ------------------------------------------------------


def test_a_connection_that_sends_no_whole_request_is_closed_within_10_seconds(
    target: Target,
) -> None:
    # Without a certificate, as any outsider: each held connection is a file
    # descriptor of the scheduler process, which its gRPC server and its store
    # connections share.
    ctx = tls_context(target, None)
    starts = (b"", b"GET /healthz HTT", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")
    socks: list[ssl.SSLSocket] = []
    for start in starts * 3:
        sock = connect(target, ctx)
        if start:
            sock.sendall(start)
        sock.setblocking(False)
        socks.append(sock)
    still_open = set(socks)
    deadline = time.monotonic() + 12  # 10 s and slack for a loaded machine
    try:
        while still_open and time.monotonic() < deadline:
            readable, _, _ = select.select(list(still_open), [], [], 0.5)
            for sock in readable:
                try:
                    if sock.recv(4096) == b"":
                        still_open.discard(sock)
                except ssl.SSLWantReadError:
                    pass
                except OSError:  # reset, or a TLS close
                    still_open.discard(sock)
    finally:
        for sock in socks:
            sock.close()
    assert not still_open, f"{len(still_open)} of {len(socks)} connections still open after 12 s"


def test_a_plaintext_dashboard_refuses_a_request_for_another_host_name(
    plaintext: Target,
) -> None:
    # DNS rebinding: a page of rebound.attacker.example, opened in a browser on
    # the scheduler's machine, has its name resolve to 127.0.0.1. To the
    # browser its requests are same-origin, so it sends HX-Request and
    # Sec-Fetch-Site: same-origin; only the Host header tells them apart.
    evil = f"rebound.attacker.example:{plaintext.port}"
    statuses: list[int] = []
    for method, path, body in (
        ("GET", "/fleet", None),
        ("POST", f"/hosts/{CALM}/cordon", "reason=rebound"),
    ):
        conn = http.client.HTTPConnection("127.0.0.1", plaintext.port, timeout=10)
        try:
            headers = {"Host": evil, "Origin": f"http://{evil}", **HTMX, **FORM}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
        finally:
            conn.close()
    assert cordoned(plaintext.cluster)[CALM] is False, f"cordoned by a rebound page ({statuses})"
    assert all(400 <= s < 500 for s in statuses), statuses


def test_callers_without_a_certificate_cannot_write_one_audit_record_per_request(
    target: Target,
) -> None:
    before = len(audit(target))
    conn = http.client.HTTPSConnection(
        "127.0.0.1", target.port, context=tls_context(target, None), timeout=10
    )
    try:
        for i in range(200):
            conn.request("GET", f"/fleet?n={i}")
            response = conn.getresponse()
            response.read()
            assert response.status == 401
    finally:
        conn.close()
    added = len(audit(target)) - before
    assert added <= 20, f"200 requests without a certificate wrote {added} audit records"


def test_a_refused_action_is_audited_even_when_its_host_id_or_its_body_is_bad(
    target: Target,
) -> None:
    before = len(audit(target))
    bad_id = request(
        target, "POST", "/hosts/bad!id/cordon", headers={**HTMX, **FORM}, body=b"reason=x"
    )
    too_big = request(
        target,
        "POST",
        f"/hosts/{CALM}/cordon",
        headers={**HTMX, **FORM},
        body=b"reason=" + b"x" * 70_000,
    )
    assert (bad_id.status, too_big.status) == (400, 413)
    assert cordoned(target.cluster)[CALM] is False
    records = [r for r in audit(target)[before:] if r["action"] == "dashboard cordon"]
    assert [r["outcome"] != "OK" for r in records] == [True, True], (
        f"audit records of the two refused cordons (400, 413): {records}"
    )


def test_no_answer_names_the_server_software_or_its_version(target: Target) -> None:
    for path, role in (("/healthz", None), ("/fleet", None), ("/fleet", "admin")):
        server = request(target, "GET", path, role=role).headers.get("server", "")
        assert "aiohttp" not in server.lower() and "python" not in server.lower(), server


def test_an_event_stream_asked_for_by_another_sites_page_is_refused(target: Target) -> None:
    # new EventSource("https://dashboard/events", {withCredentials: true}) on
    # evil.example: the admin's browser presents the certificate; CORS keeps
    # the page from reading the stream, but the stream is opened, and holds a
    # slot of MAX_LISTENERS, before the browser drops it.
    status, sock = open_stream(
        target,
        tls_context(target, "admin", "alice"),
        {
            "Sec-Fetch-Site": "cross-site",
            "Sec-Fetch-Mode": "cors",
            "Origin": "https://evil.example",
        },
    )
    sock.close()
    assert status == 403


def test_one_identity_cannot_take_every_live_slot_from_the_others(target: Target) -> None:
    # viewer/prometheus: a certificate handed to a metrics scraper, not a person.
    held = open_streams(target, tls_context(target, "viewer", "prometheus"))
    try:
        status, sock = open_stream(target, tls_context(target, "admin", "alice"))
        sock.close()
    finally:
        for s in held:
            s.close()
    assert status == 200, f"an admin's page got {status} after a viewer opened {len(held)} streams"


def test_a_closed_event_stream_gives_its_slot_back_within_2_seconds(target: Target) -> None:
    ctx = tls_context(target, "admin", "alice")
    for sock in open_streams(target, ctx):
        sock.close()
    deadline = time.monotonic() + 2
    while True:
        status, sock = open_stream(target, ctx)
        sock.close()
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200, "every slot is still held by streams whose pages are gone"


def test_readyz_tells_an_outsider_the_store_is_down_but_not_where_it_is(target: Target) -> None:
    # Last: the store goes down (and comes back for the teardown).
    store = urlsplit(target.cluster.redis_url)
    target.cluster.kill_valkey()
    try:
        bodies: list[str] = []
        deadline = time.monotonic() + 10
        # Every answer for a few of the health watcher's probes (one each 2 s).
        while time.monotonic() < deadline and len(bodies) < 20:
            answer = request(target, "GET", "/readyz", role=None)
            if answer.status == 503:
                bodies.append(answer.body)
                if str(store.port) in answer.body:
                    break
            time.sleep(0.25)
    finally:
        target.cluster.restart_valkey()
    assert bodies, "/readyz never said the store was down"
    leaks = [b for b in bodies if str(store.port) in b or f"{store.hostname}:" in b]
    assert leaks == [], leaks[0] if leaks else ""
