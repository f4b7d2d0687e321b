"""The dashboard's HTTP handlers: read the cluster, render a page, or carry out an admin's action.

Thin, as the gRPC servicers are: validate what the browser sent, call the
cluster view or the coordinator, render, translate domain errors. Who may do
what is the access policy's (:data:`tessera.security.policy.READERS` look,
:data:`~tessera.security.policy.DASHBOARD_ACTORS` act); the caller is the
identity in its client certificate, as on gRPC. Every action, and every
refused request, is an audit record.

A browser sends its client certificate with any request, a forged
cross-site form's included, so an action is also refused unless the browser
says it came from this origin (``Sec-Fetch-Site``, else ``Origin``) and
htmx sent it (``HX-Request``: a header no cross-site form can set without
a CORS preflight this server never grants).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import grpc
import jinja2
import markupsafe
import redis.exceptions
from aiohttp import web
from google.protobuf import json_format

from tessera.scheduler.core.validation import InvalidRequestError, validate_identifier
from tessera.scheduler.dashboard.cluster_view import ClusterView
from tessera.scheduler.dashboard.fleet import FleetFilter, page_of, totals
from tessera.scheduler.dashboard.live import ChangeFeed, TooManyListenersError
from tessera.scheduler.presentation import describe_slot, form_of, state_label, state_name
from tessera.scheduler.service.convert import explain_response, least_isolation, parsed_request
from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.errors import SchedulerError, status_of
from tessera.security.audit import AuditLog
from tessera.security.identity import IdentityError
from tessera.security.policy import DASHBOARD_ACTORS, AccessDeniedError, Principal
from tessera.security.tls import identity_of_pem
from tessera.v1 import placement_pb2

log = logging.getLogger(__name__)

#: Placements one table shows at most: narrow the filter for the rest.
MAX_ROWS = 500

#: The largest request body accepted (an Explain request pasted as JSON).
MAX_BODY = 64 * 1024

#: Seconds between keep-alive comments on a quiet event stream.
KEEPALIVE_S = 15.0

#: Audit records a minute of requests refused for want of a certificate.
UNAUTHENTICATED_RECORDS_PER_MINUTE = 10

#: How the gRPC status of a domain error reads over HTTP.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
}

#: Pages may load only this server's own scripts and styles, and be framed by nobody.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

#: Paths anyone who reaches the port may read: probes and the page's own assets.
_OPEN_PATHS = ("/healthz", "/readyz")

_PRINCIPAL = web.RequestKey("principal", Principal)

Readiness = Callable[[], str | None]


def _when(unix_ms: int) -> str:
    if not unix_ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_ms / 1000))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tessera.scheduler.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.globals.update(
        form_of=form_of,
        state_name=state_name,
        state_label=state_label,
        when=_when,
        describe_slot=describe_slot,
    )
    return env


def _static_dir() -> Path:
    return Path(str(resources.files("tessera.scheduler.dashboard") / "static"))


class Dashboard:
    """The dashboard's handlers over one replica.

    Args:
        view: reads the cluster.
        coordinator: carries actions out (cordon, drain, release, forget).
        feed: news of changed hosts for live pages.
        audit: where actions and refusals are recorded.
        tls: whether the server asks for client certificates (False:
            plaintext on loopback, every caller trusted as on gRPC).
        ready: None when the replica can serve, else why not (``/readyz``).
        metrics: renders ``/metrics`` (Prometheus text), None for no metrics.
    """

    def __init__(
        self,
        view: ClusterView,
        coordinator: PlacementCoordinator,
        feed: ChangeFeed,
        *,
        audit: AuditLog,
        tls: bool,
        ready: Readiness,
        metrics: Callable[[], Awaitable[tuple[bytes, str]]] | None = None,
    ) -> None:
        self._view = view
        self._c = coordinator
        self._feed = feed
        self._audit = audit
        self._tls = tls
        self._ready = ready
        self._metrics = metrics
        self._env = _environment()
        self._unauthenticated = _RecordBudget(UNAUTHENTICATED_RECORDS_PER_MINUTE, 60.0)

    def application(self) -> web.Application:
        """The aiohttp application: routes, access checks, security headers."""
        app = web.Application(middlewares=[self._errors, self._access], client_max_size=MAX_BODY)
        app.router.add_get("/", self._root)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/events", self._events)
        app.router.add_get("/fleet", self._fleet)
        app.router.add_get("/fleet/tiles", self._fleet_tiles)
        app.router.add_get("/hosts/{host_id}", self._host)
        app.router.add_get("/hosts/{host_id}/detail", self._host_detail)
        app.router.add_get("/placements", self._placements)
        app.router.add_get("/placements/rows", self._placement_rows)
        app.router.add_get("/placements/{placement_id}", self._placement)
        app.router.add_get("/tenants", self._tenants)
        app.router.add_get("/tenants/rows", self._tenant_rows)
        app.router.add_get("/explain", self._explain_page)
        app.router.add_post("/explain", self._explain)
        for action in ("cordon", "uncordon", "drain", "forget"):
            app.router.add_post(f"/hosts/{{host_id}}/{action}", self._host_action)
        app.router.add_post("/placements/{placement_id}/release", self._release)
        app.router.add_static("/static", _static_dir(), append_version=False)
        app.on_response_prepare.append(self._secure_headers)
        return app

    # -- access ---------------------------------------------------------------

    def _principal(self, request: web.Request) -> Principal | None:
        """The caller: the identity in its client certificate; None without a valid one."""
        if not self._tls:
            return Principal.plaintext()
        transport = request.transport
        sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der:
            return None
        try:
            return Principal(identity_of_pem(ssl.DER_cert_to_PEM_cert(der).encode()))
        except (IdentityError, ValueError):
            return None

    def _refuse(self, request: web.Request, who: str, status: int, reason: str) -> web.Response:
        # Anyone who reaches the port can be refused: without a certificate,
        # a few records a minute and a count of the rest, not one a request.
        if who == "unauthenticated":
            held = self._unauthenticated.admit(time.monotonic())
            if held is None:
                return self._error_page(request, status, reason)
            if held:
                reason = f"{reason} ({held} more refused without a certificate, not recorded)"
        self._audit.record(
            who=who,
            action=f"dashboard {request.method} {request.path}"[:200],
            outcome="PERMISSION_DENIED" if status == 403 else "UNAUTHENTICATED",
            peer=request.remote or "",
            detail=reason,
        )
        return self._error_page(request, status, reason)

    @web.middleware
    async def _access(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not self._tls and not _loopback_name(request.host):
            # Plaintext trusts every local caller: a page of another site whose
            # name resolves to this machine (DNS rebinding) must not be one.
            return self._error_page(
                request, 421, "this plaintext dashboard answers only to a loopback address"
            )
        if request.path in _OPEN_PATHS or request.path.startswith("/static/"):
            return await handler(request)
        principal = self._principal(request)
        if principal is None:
            return self._refuse(
                request,
                "unauthenticated",
                401,
                "this dashboard needs a client certificate from the cluster's CA "
                "(an admin or viewer identity: tessera certs issue --role viewer)",
            )
        if not principal.reads_everything:
            return self._refuse(
                request,
                principal.who,
                403,
                f"{principal.identity} may not look at the dashboard: admin or viewer only",
            )
        acting = request.method == "POST" and request.path != "/explain"
        if acting and not principal.has_role(DASHBOARD_ACTORS):
            return self._refuse(
                request, principal.who, 403, f"{principal.identity} may look, not act"
            )
        if request.method == "POST" or request.path == "/events":
            # An event stream holds a slot: another site's page may not open one.
            problem = _cross_site(request, htmx=request.method == "POST")
            if problem:
                return self._refuse(request, principal.who, 403, problem)
        request[_PRINCIPAL] = principal
        return await handler(request)

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except (SchedulerError, AccessDeniedError, ValueError) as err:
            code = status_of(err)
            return self._error_page(request, _HTTP_STATUS.get(code, 400), str(err))
        except redis.exceptions.RedisError as err:
            if status_of(err) is grpc.StatusCode.UNAVAILABLE:
                return self._error_page(
                    request, 503, f"the state store is unavailable ({err}); retry"
                )
            log.exception("dashboard: store error on %s", request.path)
            return self._error_page(request, 500, "internal error; see the scheduler log")
        except Exception:
            log.exception("dashboard: internal error on %s", request.path)
            return self._error_page(request, 500, "internal error; see the scheduler log")

    async def _secure_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        for name, value in _HEADERS.items():
            response.headers.setdefault(name, value)
        # Not which server and version: that only helps whoever attacks it.
        response.headers["Server"] = "tessera"

    # -- rendering ------------------------------------------------------------

    def _page(
        self, request: web.Request, template: str, code: int = 200, **values: Any
    ) -> web.Response:
        principal = request.get(_PRINCIPAL)
        text = self._env.get_template(template).render(
            who=principal.who if principal is not None else "",
            can_act=principal is not None and principal.has_role(DASHBOARD_ACTORS),
            **values,
        )
        return web.Response(text=text, status=code, content_type="text/html")

    def _error_page(self, request: web.Request, status: int, message: str) -> web.Response:
        reason = web.Response(status=status).reason
        fragment = request.headers.get("HX-Request") == "true"
        if fragment:
            # htmx swaps only 2xx answers by default: say it where the page shows outcomes.
            text = f'<p class="error" role="alert">{markupsafe.escape(message)}</p>'
            response = web.Response(text=text, status=status, content_type="text/html")
            response.headers["HX-Reswap"] = "innerHTML"
            return response
        template = "error.html" if request.get(_PRINCIPAL) is not None else "bare_error.html"
        return self._page(
            request, template, status, status=f"{status} {reason}", message=message, section=""
        )

    # -- probes and metrics ------------------------------------------------------

    async def _root(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/fleet")

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._ready() is None:
            return web.Response(text="ready\n")
        # Anyone may ask: where the store is and why it fails is the log's.
        return web.Response(text="not ready: the state store does not answer\n", status=503)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        if self._metrics is None:
            raise web.HTTPNotFound(text="metrics are off\n")
        body, content_type = await self._metrics()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    # -- live ---------------------------------------------------------------------

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``change`` for any change, ``host-<id>`` per changed host."""
        try:
            queue = self._feed.listen(request[_PRINCIPAL].who)
        except TooManyListenersError as err:
            raise web.HTTPServiceUnavailable(text=f"{err}; retry later\n") from None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await response.prepare(request)
            # Said at once, so the page shows the stream is up.
            hello = (
                f"retry: 2000\n\nevent: revision\ndata: live · revision {self._view.revision}\n\n"
            )
            await response.write(hello.encode())
            quiet = 0.0
            while True:
                try:
                    change = await asyncio.wait_for(queue.get(), 1.0)
                except TimeoutError:
                    # The server is not told a page went away until it
                    # writes: look every second, so its slot comes back.
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        break
                    quiet += 1.0
                    if quiet >= KEEPALIVE_S:
                        await response.write(b": keep-alive\n\n")
                        quiet = 0.0
                    continue
                quiet = 0.0
                data = json.dumps({"revision": change.revision, "hosts": list(change.hosts)})
                lines = [f"event: change\ndata: {data}\n\n"]
                lines += [f"event: host-{h}\ndata: {change.revision}\n\n" for h in change.hosts]
                lines.append(f"event: revision\ndata: live · revision {change.revision}\n\n")
                await response.write("".join(lines).encode())
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self._feed.leave(queue)
        return response

    # -- fleet ----------------------------------------------------------------------

    async def _fleet_values(self, request: web.Request) -> dict[str, Any]:
        query = dict(request.query)
        chosen = FleetFilter.parse(query)
        page = _page_number(query.get("page", "1"))
        tiles, stranded = await self._view.tiles()
        kept = [t for t in tiles if chosen.matches(t)]
        base = {
            k: v
            for k, v in query.items()
            if k in ("search", "label", "model", "tenant", "lease") and v
        }

        def query_page(n: int) -> str:
            return urlencode({**base, "page": n})

        return {
            "filter": chosen,
            "page": page_of(kept, page),
            "totals": totals(kept, stranded),
            "all_hosts": len(tiles),
            "query": urlencode(base),
            "query_page": query_page,
            "section": "fleet",
        }

    async def _fleet(self, request: web.Request) -> web.Response:
        return self._page(request, "fleet.html", **await self._fleet_values(request))

    async def _fleet_tiles(self, request: web.Request) -> web.Response:
        return self._page(request, "fleet_tiles.html", **await self._fleet_values(request))

    # -- a host -----------------------------------------------------------------------

    async def _host(self, request: web.Request) -> web.Response:
        host_id = _host_id(request)
        detail = await self._view.host(host_id)
        return self._page(request, "host.html", d=detail, outcome="", section="fleet")

    async def _host_detail(self, request: web.Request) -> web.Response:
        detail = await self._view.host(_host_id(request))
        return self._page(request, "host_detail.html", d=detail, outcome="")

    async def _host_action(self, request: web.Request) -> web.StreamResponse:
        action = request.path.rsplit("/", 1)[-1]
        resources: dict[str, object] = {"host_id": request.match_info["host_id"][:128]}
        try:
            # Inside: an action refused for its id or its body is audited too.
            host_id = _host_id(request)
            form = await request.post()
            reason = str(form.get("reason", "")).strip()
            outcome = await self._act_on_host(request, action, host_id, reason, resources)
        except BaseException as err:
            self._audit_action(request, action, resources, err)
            raise
        self._audit_action(request, action, resources, None)
        if action == "forget":
            response = web.Response(text="")
            response.headers["HX-Redirect"] = "/fleet"
            return response
        detail = await self._view.host(host_id)
        return self._page(request, "host_detail.html", d=detail, outcome=outcome)

    async def _act_on_host(
        self,
        request: web.Request,
        action: str,
        host_id: str,
        reason: str,
        resources: dict[str, object],
    ) -> str:
        """Carry a host action out; what the page says of it."""
        principal = request[_PRINCIPAL]
        who = str(principal.identity) if principal.identity else f"unauthenticated {request.remote}"
        if action == "cordon":
            await self._c.cordon(host_id, reason, who)
            return f"cordoned by {who}"
        if action == "uncordon":
            await self._c.uncordon(host_id, who)
            return f"uncordoned by {who}"
        if action == "drain":
            _, released, failed = await self._c.drain(host_id, reason, who)
            resources["released"] = [p.placement_id for p in released][:64]
            resources["not_released"] = [f.placement_id for f in failed][:64]
            again = " (drain again once they settle)" if failed else ""
            return f"drained: {len(released)} released, {len(failed)} not released{again}"
        resources["dropped"] = (await self._c.forget(host_id, False, who))[:64]
        return ""

    def _audit_action(
        self,
        request: web.Request,
        action: str,
        resources: dict[str, object],
        error: BaseException | None,
    ) -> None:
        outcome = "OK"
        if isinstance(error, web.HTTPException):
            outcome = f"HTTP {error.status}"
        elif isinstance(error, Exception):
            outcome = status_of(error).name
        elif error is not None:
            outcome = "CANCELLED"
        self._audit.record(
            who=request[_PRINCIPAL].who,
            action=f"dashboard {action}",
            outcome=outcome,
            resources=resources,
            peer=request.remote or "",
            detail=str(error) if error is not None else "",
        )

    # -- placements ---------------------------------------------------------------------

    async def _placement_values(self, request: web.Request) -> dict[str, Any]:
        query = request.query
        chosen = {k: query.get(k, "").strip() for k in ("tenant", "host", "state", "form")}
        for name, value in chosen.items():
            if len(value) > 256:
                raise InvalidRequestError.of(name, "at most 256 characters")
        if chosen["host"] and (violations := validate_identifier(chosen["host"], "host")):
            raise InvalidRequestError(violations)
        rows = await self._view.placements(chosen["tenant"], chosen["host"])
        if chosen["state"]:
            rows = [p for p in rows if state_name(p) == chosen["state"]]
        if chosen["form"]:
            rows = [p for p in rows if form_of(p) == chosen["form"]]
        # Newest first: what an operator looks for is usually what just happened.
        rows.sort(key=lambda p: (-p.created_unix_ms, p.placement_id))
        return {
            "pf": chosen,
            "shown": rows[:MAX_ROWS],
            "matched": len(rows),
            "query": urlencode({k: v for k, v in chosen.items() if v}),
            "section": "placements",
        }

    async def _placements(self, request: web.Request) -> web.Response:
        return self._page(request, "placements.html", **await self._placement_values(request))

    async def _placement_rows(self, request: web.Request) -> web.Response:
        return self._page(request, "placement_rows.html", **await self._placement_values(request))

    async def _placement(self, request: web.Request) -> web.Response:
        placement = await self._c.get(request.match_info["placement_id"], "")
        return self._page(request, "placement.html", p=placement, section="placements")

    async def _release(self, request: web.Request) -> web.Response:
        placement_id = request.match_info["placement_id"]
        resources: dict[str, object] = {"placement_id": placement_id[:200]}
        try:
            released = await self._c.release(placement_id, "")
        except Exception as err:
            self._audit_action(request, "release", resources, err)
            raise
        resources.update(tenant=released.tenant, host_id=released.host_id)
        self._audit_action(request, "release", resources, None)
        # From a table its row goes; from its own page, back to its tenant's
        # placements (it is no longer in the store either way).
        response = web.Response(text="", content_type="text/html")
        if request.headers.get("HX-Target") == "main":
            response.headers["HX-Redirect"] = "/placements?" + urlencode(
                {"tenant": released.tenant}
            )
        return response

    # -- tenants --------------------------------------------------------------------------

    async def _tenants(self, request: web.Request) -> web.Response:
        return self._page(
            request, "tenants.html", tenants=await self._view.tenants(), section="tenants"
        )

    async def _tenant_rows(self, request: web.Request) -> web.Response:
        return self._page(request, "tenant_rows.html", tenants=await self._view.tenants())

    # -- explain ----------------------------------------------------------------------------

    async def _explain_page(self, request: web.Request) -> web.Response:
        return self._page(request, "explain.html", section="explain")

    async def _explain(self, request: web.Request) -> web.Response:
        form = await request.post()
        try:
            msg = _explain_request({k: str(v) for k, v in form.items()})
            domain = parsed_request(msg)
        except InvalidRequestError as err:
            return self._page(request, "verdict.html", error=str(err))
        except (ValueError, json_format.ParseError, RecursionError) as err:
            # What the JSON parser says names the field it choked on.
            return self._page(request, "verdict.html", error=f"json: {str(err)[:500]}")
        result = await self._c.placer.explain(domain)
        answer = explain_response(domain, result)
        return self._page(
            request,
            "verdict.html",
            error="",
            placeable=answer.placeable,
            summary=answer.summary,
            placement=answer.placement,
            reasons=[r for v in answer.verdicts for r in v.reasons],
            verdicts=answer.verdicts,
        )


def _cross_site(request: web.Request, *, htmx: bool = True) -> str:
    """Why a request may have come from another site's page ("" if it did not).

    Args:
        request: the request.
        htmx: it must also say htmx sent it (the actions' buttons).
    """
    if htmx and request.headers.get("HX-Request") != "true":
        return "actions come from the dashboard's own buttons (HX-Request missing)"
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return "" if site == "same-origin" else f"refused a {site} request"
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return f"refused a request from {origin[:100]}"
    return ""


#: What a plaintext dashboard answers to: loopback names only.
_LOOPBACK_NAMES = frozenset({"localhost", "::1"})


def _loopback_name(host: str) -> bool:
    """Whether a Host header names this machine's loopback (with any port)."""
    if host.startswith("["):
        name = host[1:].split("]", 1)[0]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _RecordBudget:
    """At most ``per_window`` records a window; counts what it held back, to say with the next."""

    def __init__(self, per_window: int, window_s: float) -> None:
        self._per_window = per_window
        self._window_s = window_s
        self._started = float("-inf")
        self._used = 0
        self._held = 0

    def admit(self, now: float) -> int | None:
        """None: do not record; else record, saying how many were held back before (0: none)."""
        if now - self._started >= self._window_s:
            self._started, self._used = now, 0
        if self._used >= self._per_window:
            self._held += 1
            return None
        self._used += 1
        held, self._held = self._held, 0
        return held


def _host_id(request: web.Request) -> str:
    host_id = request.match_info["host_id"]
    if violations := validate_identifier(host_id, "host_id"):
        raise InvalidRequestError(violations)
    return host_id


def _page_number(text: str) -> int:
    if not text.isdigit() or len(text) > 6:
        raise InvalidRequestError.of("page", "a page number from 1")
    return max(1, int(text))


_KINDS = {
    "gpu": placement_pb2.DEVICE_KIND_GPU,
    "nic": placement_pb2.DEVICE_KIND_NIC,
    "accelerator": placement_pb2.DEVICE_KIND_ACCELERATOR,
}
_FORMS = {
    "whole": placement_pb2.DEVICE_FORM_WHOLE_DEVICE,
    "vf": placement_pb2.DEVICE_FORM_VF,
    "mdev": placement_pb2.DEVICE_FORM_MDEV,
    "mig": placement_pb2.DEVICE_FORM_MIG,
}


def _explain_request(form: dict[str, str]) -> placement_pb2.PlacementRequest:
    """The request the Explain form describes: pasted JSON, or built from its fields.

    Raises:
        ValueError: a field cannot be read; the message names it.
    """
    msg = placement_pb2.PlacementRequest()
    pasted = form.get("json", "").strip()
    if pasted:
        json_format.Parse(pasted, msg, max_recursion_depth=16)
        if not msg.request_id:
            msg.request_id = "dashboard-explain"
        return msg
    kind = _KINDS.get(form.get("kind", ""))
    if kind is None:
        raise InvalidRequestError.of("kind", "one of gpu, nic, accelerator")
    device_form = _FORMS.get(form.get("form", "whole"))
    if device_form is None:
        raise InvalidRequestError.of("form", "one of whole, vf, mdev, mig")
    count = _bounded_int(form.get("count", "1"), "count", 1, 64)
    claim = placement_pb2.Claim(
        name="device",
        kind=kind,
        count=count,
        forms=[device_form],
        # The form chosen is the isolation accepted: a slice or a VF shares.
        min_isolation=least_isolation(device_form),
    )
    if form.get("model", "").strip():
        claim.selector.models.append(form["model"].strip())
    profile = form.get("profile", "").strip()
    if profile and device_form == placement_pb2.DEVICE_FORM_MIG:
        claim.mig_profiles.append(profile)
    elif profile and device_form == placement_pb2.DEVICE_FORM_MDEV:
        claim.mdev_types.append(profile)
    msg.request_id = "dashboard-explain"
    msg.tenant = form.get("tenant", "").strip() or "explain"
    msg.claims.append(claim)
    msg.cpu_milli = int(_bounded_float(form.get("cpus", "0") or "0", "cpus", 0, 4096) * 1000)
    msg.memory_mib = _bounded_int(form.get("memory_mib", "0") or "0", "memory_mib", 0, 1 << 24)
    return msg


def _bounded_int(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidRequestError.of(name, f"a whole number from {low} to {high}") from None
    if not low <= value <= high:
        raise InvalidRequestError.of(name, f"a whole number from {low} to {high}")
    return value


def _bounded_float(text: str, name: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequestError.of(name, f"a number from {low:g} to {high:g}") from None
    if not low <= value <= high:
        raise InvalidRequestError.of(name, f"a number from {low:g} to {high:g}")
    return value
