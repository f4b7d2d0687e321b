"""The dashboard in a real browser, over the scheduler's own HTTPS, with real processes.

One scheduler serves the dashboard (``--http-listen``) under mutual TLS; two
fake hosts register through their agents:

* ``virt``: a two-socket virtualization host (SR-IOV NICs, QAT, an A100 in
  MIG mode, a P4 for vGPU), labelled ``name=virt``;
* ``nic``: a host of SR-IOV NICs, labelled ``name=nic``.

Pages are opened in headless Chromium (Debian's, driven by Playwright) that
presents a client certificate of the cluster's CA, as an operator's browser
would: ``admin/alice`` may act, ``viewer/vera`` may look, ``tenant/acme``
may do neither. Placements are made over gRPC, as a cloud frontend would.
Screenshots of each view land in ``test-artifacts/dashboard/`` (what
``docs/dashboard/`` holds was copied from there).
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright
from prometheus_client.parser import text_string_to_metric_families

from tessera.scheduler.local_cluster import LocalCluster
from tessera.v1 import placement_pb2, scheduler_pb2

VIRT, NIC = "virt", "nic"
A100 = "0000:4b:00.0"
CHROMIUM = os.environ.get("TESSERA_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("TESSERA_ARTIFACTS", "test-artifacts")) / "dashboard"
# How long a live page may take to show a change. The dashboard polls the
# change feed every 0.5 s; the rest is slack for a loaded CI machine.
LIVE_MS = 3000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("dashboard")) as c:
        c.start_valkey()
        c.start_scheduler("scheduler", "--heartbeat-interval", "1", "--http-listen", "127.0.0.1:0")
        c.start_agent(VIRT, c.build_fake_host("virt-2s", VIRT, mig=(A100,)), {"name": VIRT})
        c.start_agent(NIC, c.build_fake_host("sriov-nic", NIC), {"name": NIC})
        c.wait_for_hosts({VIRT, NIC})
        yield c


@pytest.fixture(scope="module")
def url(cluster: LocalCluster) -> str:
    return cluster.dashboards["scheduler"]


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: the browser tests need Debian's chromium "
            "(scripts/test_deps.sh installs it; TESSERA_CHROMIUM names another)"
        )
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )
    yield browser
    browser.close()


def page_as(browser: Browser, cluster: LocalCluster, url: str, role: str, name: str) -> Page:
    """A new browser page presenting ``role/name``'s certificate to the dashboard."""
    tls = cluster.tls_dir(role, name)
    context = browser.new_context(
        # The scheduler's certificate names scheduler.tessera, not 127.0.0.1;
        # what is tested is the client's identity.
        ignore_https_errors=True,
        client_certificates=[
            {
                "origin": url.rstrip("/"),
                "certPath": str(tls / "cert.pem"),
                "keyPath": str(tls / "key.pem"),
            }
        ],
        viewport={"width": 1400, "height": 1000},
    )
    return context.new_page()


def call(
    cluster: LocalCluster,
    url: str,
    method: str,
    path: str,
    *,
    role: str | None = "admin",
    name: str = "admin",
    headers: dict[str, str] | None = None,
    body: str = "",
) -> tuple[int, str]:
    """One HTTPS request as ``role/name`` (None: no client certificate)."""
    ctx = ssl.create_default_context(cafile=str(cluster.ca_dir / "ca.pem"))
    ctx.check_hostname = False
    if role is not None:
        tls = cluster.tls_dir(role, name)
        ctx.load_cert_chain(tls / "cert.pem", tls / "key.pem")
    where = urlsplit(url)
    conn = http.client.HTTPSConnection(where.hostname or "", where.port, context=ctx, timeout=30)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


#: The headers htmx sends with a button's POST from the dashboard's own page.
HTMX = {"HX-Request": "true", "Sec-Fetch-Site": "same-origin"}


def place(
    cluster: LocalCluster, request_id: str, tenant: str, host: str, **claim: Any
) -> placement_pb2.Placement:
    """Place over gRPC, as a frontend would, on the host labelled ``name=host``."""
    request = placement_pb2.PlacementRequest(
        request_id=request_id,
        tenant=tenant,
        host_selector={"name": host},
        claims=[placement_pb2.Claim(name="dev", **claim)],
    )
    return cluster.stub().Place(scheduler_pb2.PlaceRequest(request=request)).placement


def mig_slice(cluster: LocalCluster, request_id: str, tenant: str) -> placement_pb2.Placement:
    return place(
        cluster,
        request_id,
        tenant,
        VIRT,
        kind=placement_pb2.DEVICE_KIND_GPU,
        count=1,
        forms=[placement_pb2.DEVICE_FORM_MIG],
        mig_profiles=["2g.20gb"],
        min_isolation=placement_pb2.ISOLATION_PARTITIONED,
    )


def vfs(
    cluster: LocalCluster, request_id: str, tenant: str, host: str = NIC
) -> placement_pb2.Placement:
    return place(
        cluster,
        request_id,
        tenant,
        host,
        kind=placement_pb2.DEVICE_KIND_NIC,
        count=2,
        forms=[placement_pb2.DEVICE_FORM_VF],
        min_isolation=placement_pb2.ISOLATION_SHARED,
    )


def release(cluster: LocalCluster, placement_id: str) -> None:
    cluster.stub().Release(scheduler_pb2.ReleaseRequest(placement_id=placement_id))


def shoot(page: Page, name: str) -> None:
    """Save a screenshot of the page as a test artifact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


# -- every view renders ---------------------------------------------------------


def test_every_view_renders_for_an_admin(browser: Browser, cluster: LocalCluster, url: str) -> None:
    mig = mig_slice(cluster, "views-mig", "acme")
    nic = vfs(cluster, "views-vf", "beta")
    page = page_as(browser, cluster, url, "admin", "alice")
    try:
        page.goto(url + "fleet")
        expect(page.locator(".tile")).to_have_count(2)
        expect(page.locator(f'.tile[data-host="{VIRT}"]')).to_contain_text("mig")
        expect(page.locator(".who")).to_have_text("spiffe://tessera/admin/alice")
        shoot(page, "fleet")

        page.goto(url + f"hosts/{VIRT}")
        a100 = page.locator(".function", has_text=A100).first
        expect(a100.locator(".status").first).to_have_text("partly")
        expect(a100.locator(".mig .cell.used")).to_contain_text("2g.20gb")
        expect(a100.locator(".mig .cell.used .holder")).to_have_text("acme")
        # Per profile, how many more fit: one 2g.20gb taken leaves room.
        expect(a100.locator(".fits tr", has_text="1g.10gb")).to_be_visible()
        expect(page.locator(".mdev").first).to_contain_text("nvidia-")
        shoot(page, "host-mig")

        page.goto(url + f"hosts/{NIC}")
        held = page.locator(".vf.held")
        expect(held).to_have_count(2)
        expect(held.first.locator(".holder")).to_have_text("beta")
        shoot(page, "host-sriov")

        page.goto(url + "placements")
        expect(page.locator(f'tr[data-placement="{mig.placement_id}"]')).to_contain_text("mig")
        expect(page.locator(f'tr[data-placement="{nic.placement_id}"]')).to_contain_text("vf")
        shoot(page, "placements")

        page.goto(url + f"placements/{mig.placement_id}")
        expect(page.locator("table.claims")).to_contain_text("2g.20gb")
        # Its history: reserved, then carried out by the agent.
        expect(page.locator("table.history td.state")).to_have_text(["pending", "ready"])
        shoot(page, "placement")

        page.goto(url + "tenants")
        expect(page.locator('tr[data-tenant="acme"]')).to_contain_text("1")
        expect(page.locator('tr[data-tenant="beta"] td').nth(3)).to_have_text("2")
        shoot(page, "tenants")

        page.goto(url + "explain")
        page.select_option("select[name=kind]", "gpu")
        page.select_option("select[name=form]", "mig")
        page.fill("input[name=profile]", "3g.40gb")
        page.click("form.explain button[type=submit]")
        expect(page.locator("#verdict .ok")).to_contain_text(f"fits on {VIRT}")
        shoot(page, "explain")
    finally:
        page.context.close()
        release(cluster, mig.placement_id)
        release(cluster, nic.placement_id)


# -- live ---------------------------------------------------------------------------


def test_a_placement_made_over_grpc_appears_without_a_reload(
    browser: Browser, cluster: LocalCluster, url: str
) -> None:
    table = page_as(browser, cluster, url, "viewer", "vera")
    tree = page_as(browser, cluster, url, "viewer", "vera")
    try:
        table.goto(url + "placements")
        tree.goto(url + f"hosts/{NIC}")
        # A reload would lose this mark: the change must come over the event stream.
        for page in (table, tree):
            page.evaluate("window.tesseraMark = 1")
            expect(page.locator("#live")).to_contain_text("revision")
        placed_at = time.monotonic()
        placement = vfs(cluster, "live-vf", "gamma")
        expect(table.locator(f'tr[data-placement="{placement.placement_id}"]')).to_be_visible(
            timeout=LIVE_MS
        )
        expect(tree.locator(".vf.held .holder", has_text="gamma").first).to_be_visible(
            timeout=LIVE_MS
        )
        print(f"placement shown after {time.monotonic() - placed_at:.2f} s")
        for page in (table, tree):
            assert page.evaluate("window.tesseraMark") == 1
    finally:
        table.context.close()
        tree.context.close()
    release(cluster, placement.placement_id)


# -- actions ---------------------------------------------------------------------------


def test_a_cordon_from_the_page_stops_placements_on_that_host(
    browser: Browser, cluster: LocalCluster, url: str
) -> None:
    page = page_as(browser, cluster, url, "admin", "alice")
    page.on("dialog", lambda dialog: dialog.accept())
    try:
        page.goto(url + f"hosts/{NIC}")
        page.fill("#reason", "firmware update")
        page.click("button:has-text('Cordon')")
        expect(page.locator("h1 .lease")).to_have_text("cordoned")
        expect(page.locator(".facts")).to_contain_text("firmware update")
        shoot(page, "host-cordoned")
        with pytest.raises(grpc.RpcError) as refused:
            vfs(cluster, "cordoned-vf", "acme")
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

        page.click("button:has-text('Uncordon')")
        expect(page.locator("h1 .lease")).to_have_text("live")
        release(cluster, vfs(cluster, "uncordoned-vf", "acme").placement_id)
    finally:
        page.context.close()
    audit = (cluster.workdir / "logs" / "scheduler.audit.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in audit]
    cordons = [r for r in records if r["action"] in ("dashboard cordon", "dashboard uncordon")]
    assert [(r["action"], r["outcome"], r["who"]) for r in cordons[-2:]] == [
        ("dashboard cordon", "OK", "spiffe://tessera/admin/alice"),
        ("dashboard uncordon", "OK", "spiffe://tessera/admin/alice"),
    ]


def test_a_release_from_the_table_frees_the_devices(
    browser: Browser, cluster: LocalCluster, url: str
) -> None:
    placement = vfs(cluster, "release-vf", "delta")
    page = page_as(browser, cluster, url, "admin", "alice")
    page.on("dialog", lambda dialog: dialog.accept())
    try:
        page.goto(url + "placements?tenant=delta")
        row = page.locator(f'tr[data-placement="{placement.placement_id}"]')
        row.locator("button:has-text('Release')").click()
        expect(page.locator(f'tr[data-placement="{placement.placement_id}"]')).to_have_count(
            0, timeout=LIVE_MS
        )
    finally:
        page.context.close()
    with pytest.raises(grpc.RpcError) as gone:
        cluster.stub().GetPlacement(
            scheduler_pb2.GetPlacementRequest(placement_id=placement.placement_id)
        )
    assert gone.value.code() is grpc.StatusCode.NOT_FOUND


# -- who may do what --------------------------------------------------------------------


def test_a_viewer_looks_but_has_no_buttons_and_is_refused_actions(
    browser: Browser, cluster: LocalCluster, url: str
) -> None:
    page = page_as(browser, cluster, url, "viewer", "vera")
    try:
        page.goto(url + f"hosts/{VIRT}")
        expect(page.locator(".who")).to_contain_text("read-only")
        expect(page.locator(".actions button")).to_have_count(0)
    finally:
        page.context.close()
    status, body = call(
        cluster, url, "POST", f"/hosts/{VIRT}/cordon", role="viewer", name="vera", headers=HTMX
    )
    assert status == 403
    assert "may look, not act" in body


def test_a_tenant_identity_is_refused_the_pages_and_the_actions(
    browser: Browser, cluster: LocalCluster, url: str
) -> None:
    page = page_as(browser, cluster, url, "tenant", "acme")
    try:
        response = page.goto(url + "fleet")
        assert response is not None and response.status == 403
        expect(page.locator(".error")).to_contain_text("admin or viewer only")
    finally:
        page.context.close()
    for action in ("cordon", "drain", "forget"):
        status, _ = call(
            cluster, url, "POST", f"/hosts/{VIRT}/{action}", role="tenant", name="acme",
            headers=HTMX,
        )  # fmt: skip
        assert status == 403
    hosts = cluster.stub().ListHosts(scheduler_pb2.ListHostsRequest()).hosts
    assert not any(h.cordoned for h in hosts)
    audit = (cluster.workdir / "logs" / "scheduler.audit.jsonl").read_text().splitlines()
    refused = [
        json.loads(line) for line in audit if '"tenant/acme"' in line or "tenant/acme" in line
    ]
    assert any(
        r["outcome"] == "PERMISSION_DENIED" and r["action"].endswith("/cordon") for r in refused
    )


def test_without_a_client_certificate_only_the_probes_answer(
    cluster: LocalCluster, url: str
) -> None:
    assert call(cluster, url, "GET", "/healthz", role=None) == (200, "ok\n")
    assert call(cluster, url, "GET", "/readyz", role=None) == (200, "ready\n")
    for path in ("/fleet", "/events", "/metrics", f"/hosts/{VIRT}"):
        status, body = call(cluster, url, "GET", path, role=None)
        assert status == 401, path
        assert "client certificate" in body


def test_an_action_that_did_not_come_from_the_dashboard_page_is_refused(
    cluster: LocalCluster, url: str
) -> None:
    # A form on another site: the browser sends the certificate but says where from.
    for headers in (
        {},
        {"HX-Request": "true", "Sec-Fetch-Site": "cross-site"},
        {"HX-Request": "true", "Origin": "https://evil.example"},
    ):
        status, _ = call(cluster, url, "POST", f"/hosts/{VIRT}/cordon", headers=headers)
        assert status == 403, headers
    hosts = cluster.stub().ListHosts(scheduler_pb2.ListHostsRequest()).hosts
    assert not any(h.cordoned for h in hosts)


# -- hostile input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/hosts/..%2Fetc", "host_id"),
        ("/fleet?lease=dead", "lease"),
        ("/fleet?search=" + "x" * 300, "search"),
        ("/fleet?page=-1", "page"),
        ("/fleet/tiles?page=99999999999", "page"),
        ("/placements?host=a%20b", "host"),
        ("/placements/not-a-placement", "placement"),
    ],
)
def test_a_bad_address_is_a_clear_error_naming_the_field(
    cluster: LocalCluster, url: str, path: str, field: str
) -> None:
    status, body = call(cluster, url, "GET", path)
    assert status in (400, 404), (status, body[:300])
    assert field in body


def test_a_hostile_explain_request_is_answered_with_the_field_not_a_trace(
    cluster: LocalCluster, url: str
) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded", **HTMX}
    for body, field in (
        ("kind=gpu&count=100000", "count"),
        ("kind=toaster", "kind"),
        ("json=%7B%22claims%22%3A%5B%7B%22count%22%3A%22many%22%7D%5D%7D", "count"),
        ("json=" + "%5B" * 5000, "json"),
    ):
        status, text = call(cluster, url, "POST", "/explain", headers=form, body=body)
        assert status == 200, text[:300]
        assert 'class="error"' in text and field.lower() in text.lower(), text[:300]
        assert "Traceback" not in text
    status, _ = call(cluster, url, "POST", "/explain", headers=form, body="json=" + "a" * 70_000)
    assert status == 413


# -- /metrics ------------------------------------------------------------------------------


def test_metrics_are_read_by_the_prometheus_parser(cluster: LocalCluster, url: str) -> None:
    placement = mig_slice(cluster, "metrics-mig", "acme")
    with pytest.raises(grpc.RpcError):
        vfs(cluster, "metrics-nowhere", "acme", host="no-such-host")
    status, text = call(cluster, url, "GET", "/metrics", role="viewer", name="prometheus")
    release(cluster, placement.placement_id)
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    documented = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in families:
        assert f"`{name}" in documented, f"{name} is not in the README's list of metrics"

    def value(family: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[family].samples
            if all(s.labels.get(k) == v for k, v in labels.items())
            and not s.name.endswith(("_created", "_bucket", "_sum"))
        )

    assert value("tessera_placements", outcome="OK", form="mig") >= 1
    assert value("tessera_placements", outcome="RESOURCE_EXHAUSTED") >= 1
    assert value("tessera_place_seconds", outcome="OK") >= 1  # the histogram's _count
    assert value("tessera_commits", outcome="COMMITTED") >= 1
    assert value("tessera_host_devices", host=VIRT) > 0
    # At least this one (an instance released just before may still be live on
    # the host until its agent reports again).
    assert value("tessera_host_units_held", host=VIRT, form="mig") >= 1
    assert value("tessera_host_schedulable", host=NIC, lease="live") == 1
    assert "tessera_feed_age_seconds" in families
    assert "tessera_agent_call_errors" in families


def test_list_hosts_and_the_dashboard_tell_the_same_truth(
    browser: Browser, cluster: LocalCluster, url: str
) -> None:
    mig = mig_slice(cluster, "truth-mig", "acme")
    nic = vfs(cluster, "truth-vf", "beta")
    page = page_as(browser, cluster, url, "viewer", "vera")
    try:
        listed = cluster.stub().ListHosts(scheduler_pb2.ListHostsRequest()).hosts
        _, text = call(cluster, url, "GET", "/metrics", role="viewer", name="prometheus")
        families = {f.name: f for f in text_string_to_metric_families(text)}

        def series(family: str, host_id: str) -> dict[str, float]:
            return {
                s.labels.get("form") or s.labels.get("lease") or "": s.value
                for s in families[family].samples
                if s.labels["host"] == host_id
            }

        for summary in listed:
            held = {
                form: n
                for form, n in series("tessera_host_units_held", summary.host_id).items()
                if n
            }
            in_use = {form: n for form, n in summary.used_by_form.items() if n}
            assert in_use == held, summary.host_id
            assert series("tessera_host_schedulable", summary.host_id) == {"live": 1.0}
            page.goto(url + f"hosts/{summary.host_id}")
            shown = page.locator(".facts dd", has_text="in use").inner_text()
            for form, word in (
                ("whole", "whole"),
                ("vf", "VFs"),
                ("mdev", "mdevs"),
                ("mig", "MIG"),
            ):
                assert f"{summary.used_by_form.get(form, 0)} {word}" in shown, (
                    summary.host_id,
                    shown,
                )
        used = {h.host_id: {f: n for f, n in h.used_by_form.items() if n} for h in listed}
        assert used[NIC] == {"vf": 2}
        # This test's instance, and any released just before that its agent
        # has not reported gone yet (live instances count too).
        assert set(used[VIRT]) == {"mig"} and used[VIRT]["mig"] >= 1
    finally:
        page.context.close()
        release(cluster, mig.placement_id)
        release(cluster, nic.placement_id)


def test_a_filter_stays_applied_when_the_page_is_redrawn_live(
    browser: Browser, cluster: LocalCluster, url: str
) -> None:
    zeta = vfs(cluster, "filter-zeta", "zeta")
    page = page_as(browser, cluster, url, "viewer", "vera")
    placed: list[placement_pb2.Placement] = []
    try:
        for view, field, kept in (
            ("fleet", "input[name=tenant]", f'.tile[data-host="{NIC}"]'),
            ("placements", "input[name=tenant]", f'tr[data-placement="{zeta.placement_id}"]'),
        ):
            page.goto(url + view)
            expect(page.locator("#live")).to_contain_text("revision")
            page.fill(field, "zeta")
            expect(page.locator(kept)).to_have_count(1)
            rows = ".tile" if view == "fleet" else "tr[data-placement]"
            expect(page.locator(rows)).to_have_count(1)
            # Mark what is shown: a redraw replaces it.
            page.evaluate(
                "s => document.querySelectorAll(s).forEach(e => e.dataset.old = '1')", rows
            )
            placed.append(vfs(cluster, f"filter-other-{view}", "other", host=VIRT))
            expect(page.locator(f"{rows}[data-old]")).to_have_count(0, timeout=LIVE_MS)
            # Redrawn, still narrowed to zeta's.
            expect(page.locator(rows)).to_have_count(1)
            expect(page.locator(kept)).to_have_count(1)
    finally:
        page.context.close()
        for p in (zeta, *placed):
            release(cluster, p.placement_id)
