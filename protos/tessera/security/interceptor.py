"""The gRPC server interceptor that enforces :mod:`tessera.security.policy` on every call.

For each call it:

1. decodes the request itself, so an undecodable body answers
   INVALID_ARGUMENT with one rate-limited log line instead of UNKNOWN and a
   traceback;
2. reads the caller's identity from its verified client certificate (the
   SPIFFE URI SAN): none, or one that is not a Tessera identity, is
   UNAUTHENTICATED;
3. asks the policy; a refusal is PERMISSION_DENIED;
4. runs the handler with the caller bound to :data:`CURRENT_PRINCIPAL`, so
   an ``OWNER``-scoped servicer can check the placement it loaded;
5. writes an audit record for every call that changes something and for every
   refusal.

A certificate from another CA, an expired one, or none at all never gets this
far: the TLS handshake fails and the caller sees UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError, Message

from tessera.security.audit import AuditLog
from tessera.security.identity import Identity, IdentityError
from tessera.security.policy import AccessDeniedError, AccessPolicy, Principal, Rule
from tessera.security.tls import identity_of_pem

log = logging.getLogger(__name__)

#: The caller of the RPC being served (set only while its handler runs).
CURRENT_PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar("tessera_principal")

#: Status codes that mean "refused": always audited.
_REFUSALS = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

Context = grpc.aio.ServicerContext[Any, Any]


def current_principal() -> Principal:
    """The caller of the RPC being served.

    Raises:
        LookupError: called outside a served RPC (a bug in the wiring).
    """
    return CURRENT_PRINCIPAL.get()


class _Undecodable:
    """Stands for a request body that did not decode (the handler answers it)."""

    def __init__(self, error: str) -> None:
        self.error = error


@dataclass
class _Call:
    """One call being served: what the checks and the audit record need."""

    method: str
    context: Context
    request: Any
    principal: Principal | None = None


@contextlib.contextmanager
def _acting_as(call: _Call) -> Iterator[None]:
    """Bind the admitted caller to :data:`CURRENT_PRINCIPAL` while its handler runs."""
    assert call.principal is not None  # set by the admission check
    token = CURRENT_PRINCIPAL.set(call.principal)
    try:
        yield
    finally:
        CURRENT_PRINCIPAL.reset(token)


class _RateLimitedLog:
    """At most one line per ``every_s``, with the count of those left out."""

    def __init__(self, every_s: float = 10.0) -> None:
        self._every_s = every_s
        self._last = 0.0
        self._skipped = 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last < self._every_s:
            self._skipped += 1
            return
        skipped, self._skipped, self._last = self._skipped, 0, now
        log.warning("%s%s", message, f" ({skipped} more since the last line)" if skipped else "")


def _identity(context: Context) -> Identity:
    """The caller's identity from its verified certificate.

    Raises:
        IdentityError: the certificate names no (single) Tessera identity.
    """
    # The verified certificate itself, read for URI SANs only: gRPC's
    # x509_subject_alternative_name mixes every SAN type, and a DNS or email
    # SAN that reads "spiffe://tessera/admin/x" must never stand for an identity.
    pems = list(context.auth_context().get("x509_pem_cert", []))
    if len(pems) != 1:
        raise IdentityError("no client certificate")
    return _identity_of_pem(bytes(pems[0]))


@functools.lru_cache(maxsize=4096)
def _identity_of_pem(pem: bytes) -> Identity:
    """:func:`identity_of_pem`, remembered: a peer shows the same certificate on every call."""
    try:
        return identity_of_pem(pem)
    except ValueError as err:  # IdentityError is one; a PEM cryptography cannot read too
        raise IdentityError(f"the client certificate names no Tessera identity: {err}") from None


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, authorizes and audits every call of a server.

    Args:
        policy: the access policy.
        tls: whether the server requires client certificates; False is a
            plaintext development server whose callers are trusted.
        audit: where records go.
        resources: full RPC name -> a function giving the resource ids of a
            call (request and response; the response may be None) for the audit log.
    """

    def __init__(
        self,
        policy: AccessPolicy,
        *,
        tls: bool,
        audit: AuditLog,
        resources: Mapping[str, Callable[[Any, Any], dict[str, object]]] | None = None,
    ) -> None:
        self._policy = policy
        self._tls = tls
        self._audit = audit
        self._resources = resources or {}
        self._undecodable_log = _RateLimitedLog()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wrap the method's handler in the checks."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(method, handler.unary_stream),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_stream(method, handler.stream_stream),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        # Client streaming: no Tessera RPC streams requests alone; refuse it.
        return grpc.unary_unary_rpc_method_handler(self._refuse(method))

    # -- the checks -----------------------------------------------------------

    def _check(self, call: _Call) -> Rule:
        """Decode check, authentication, authorization; audits a refusal.

        Raises:
            _RefusedError: the status and reason to abort the call with.
        """
        if isinstance(call.request, _Undecodable):
            self._undecodable_log.warning(
                f"undecodable {call.method[:128]} body from {call.context.peer()[:64]}: "
                f"{call.request.error[:200]}"
            )
            raise _RefusedError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request body: not a valid message for {call.method.rsplit('/', 1)[-1][:64]}",
            )
        call.principal = Principal.plaintext()
        if self._tls:
            try:
                call.principal = self._policy.principal(_identity(call.context))
            except IdentityError as err:
                call.principal = None
                self._refused(call, grpc.StatusCode.UNAUTHENTICATED, str(err))
        assert call.principal is not None
        try:
            return self._policy.authorize(call.method, call.principal, call.request)
        except AccessDeniedError as err:
            self._refused(call, grpc.StatusCode.PERMISSION_DENIED, str(err))
        raise AssertionError("unreachable: _refused raises")

    def _refused(self, call: _Call, code: grpc.StatusCode, reason: str) -> NoReturn:
        self._record(call, code, reason, None)
        raise _RefusedError(code, reason)

    async def _admit(self, call: _Call) -> Rule:
        """:meth:`_check`, aborting the call (asyncio handlers) on refusal."""
        try:
            return self._check(call)
        except _RefusedError as refused:
            await call.context.abort(refused.code, refused.reason)
        raise AssertionError("unreachable: abort raises")

    def _admit_sync(self, call: _Call) -> Rule:
        """:meth:`_check` for a blocking handler, whose context aborts synchronously."""
        try:
            return self._check(call)
        except _RefusedError as refused:
            call.context.abort(refused.code, refused.reason)  # type: ignore[unused-coroutine]
        raise AssertionError("unreachable: abort raises")

    def _record(self, call: _Call, code: grpc.StatusCode, detail: str, response: Any) -> None:
        if not self._audit.enabled:
            return
        resources: dict[str, object] = {}
        describe = self._resources.get(call.method)
        if describe is not None and isinstance(call.request, Message):
            try:
                resources = describe(call.request, response)
            except Exception:  # an audit line must never fail a call
                log.exception("describing %s for the audit log", call.method)
        self._audit.record(
            who=call.principal.who if call.principal else "unauthenticated",
            action=call.method.rsplit("/", 1)[-1],
            outcome=code.name,
            resources=resources,
            peer=call.context.peer(),
            detail="" if code is grpc.StatusCode.OK else detail,
        )

    def _finish(self, call: _Call, rule: Rule, response: Any, error: BaseException | None) -> None:
        """Audit a call that ran: changes always, other calls when refused."""
        code = call.context.code() if error is not None else None
        if isinstance(code, grpc.StatusCode):
            status = code
        else:
            status = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
        if rule.audited or status in _REFUSALS:
            detail = call.context.details() if error is not None else ""
            text = detail.decode(errors="replace") if isinstance(detail, bytes) else detail or ""
            self._record(call, status, text, response)

    # -- wrappers per call shape ----------------------------------------------
    #
    # gRPC runs a handler that is not a coroutine (or async generator)
    # function in a thread, with a blocking context (grpc_health's servicer
    # is one): each shape has a wrapper of the same kind as what it wraps.

    def _unary(self, method: str, behavior: Any) -> Callable[[Any, Context], Any]:
        if not inspect.iscoroutinefunction(behavior):

            def run_sync(request: Any, context: Any) -> Any:
                call = _Call(method, context, request)
                self._admit_sync(call)
                with _acting_as(call):
                    return behavior(request, context)

            return run_sync

        async def run(request: Any, context: Context) -> Any:
            call = _Call(method, context, request)
            rule = await self._admit(call)
            response = None
            error: BaseException | None = None
            try:
                with _acting_as(call):
                    response = await behavior(request, context)
                return response
            except BaseException as err:
                error = err
                raise
            finally:
                self._finish(call, rule, response, error)

        return run

    def _unary_stream(self, method: str, behavior: Any) -> Callable[[Any, Context], Any]:
        if not (inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior)):

            def run_sync(request: Any, context: Any) -> Iterator[Any]:
                call = _Call(method, context, request)
                self._admit_sync(call)
                with _acting_as(call):
                    yield from behavior(request, context)

            return run_sync

        async def run(request: Any, context: Context) -> AsyncIterator[Any]:
            call = _Call(method, context, request)
            await self._admit(call)
            with _acting_as(call):
                async for item in _each(behavior(request, context)):
                    yield item

        return run

    def _stream_stream(self, method: str, behavior: Any) -> Callable[[Any, Context], Any]:
        if not (inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior)):

            def run_sync(requests: Any, context: Any) -> Iterator[Any]:
                call = _Call(method, context, None)
                self._admit_sync(call)
                with _acting_as(call):
                    yield from behavior(self._decoded_sync(call, requests), context)

            return run_sync

        async def run(requests: Any, context: Context) -> AsyncIterator[Any]:
            call = _Call(method, context, None)
            await self._admit(call)
            with _acting_as(call):
                async for item in _each(behavior(self._decoded(call, requests), context)):
                    yield item

        return run

    async def _decoded(self, call: _Call, requests: Any) -> AsyncIterator[Any]:
        """A request stream, aborting the call at its first undecodable message."""
        async for request in requests:
            if isinstance(request, _Undecodable):
                call.request = request
                await self._admit(call)  # refuses it, as for a unary body
            yield request

    def _decoded_sync(self, call: _Call, requests: Iterator[Any]) -> Iterator[Any]:
        for request in requests:
            if isinstance(request, _Undecodable):
                call.request = request
                self._admit_sync(call)
            yield request

    def _refuse(self, method: str) -> Callable[[Any, Context], Awaitable[Any]]:
        async def run(request: Any, context: Context) -> Any:
            try:
                self._refused(
                    _Call(method, context, None), grpc.StatusCode.PERMISSION_DENIED, "not served"
                )
            except _RefusedError as refused:
                await context.abort(refused.code, refused.reason)

        return run


class _RefusedError(Exception):
    """A call refused before its handler ran: the status and reason to abort with."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


async def _each(responses: Any) -> AsyncIterator[Any]:
    """Items of an async iterator; nothing for a handler that writes through its context."""
    if inspect.isawaitable(responses):
        await responses  # a coroutine handler answers with context.write()
        return
    async for item in responses:
        yield item


def _tolerant(
    deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    """A deserializer that hands an undecodable body to the handler instead of failing."""
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, ValueError, RuntimeError) as err:
            return _Undecodable(str(err))

    return decode
