"""The client's retries are gRPC's own: UNAVAILABLE retried with backoff, nothing else retried.

A scripted Scheduler in this process answers each call from a list of
outcomes, so the number of attempts is exact: no timing, no real scheduler.
The real scheduler's answers are in ``test_client.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tessera.client import (
    Client,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
    UnavailableError,
)
from tessera.v1 import placement_pb2, scheduler_pb2

FAST = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


class Scripted:
    """Answers GetPlacement and Place with the next scripted status code (OK: a placement)."""

    def __init__(self) -> None:
        self.script: list[grpc.StatusCode] = []
        self.calls: list[str] = []

    def _answer(self, context: grpc.ServicerContext, seen: str) -> placement_pb2.Placement:
        self.calls.append(seen)
        code = self.script.pop(0) if self.script else grpc.StatusCode.OK
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            status = status_pb2.Status(code=code.value[0], message="claims[0].count: too small")
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field="claims[0].count", description="too small"
                    )
                ]
            )
            status.details.add().Pack(bad)
            context.abort_with_status(rpc_status.to_status(status))
        if code is not grpc.StatusCode.OK:
            context.abort(code, f"scripted {code.name}")
        return placement_pb2.Placement(placement_id="pl-1@h", request_id=seen)

    def get_placement(
        self, request: scheduler_pb2.GetPlacementRequest, context: grpc.ServicerContext
    ) -> placement_pb2.Placement:
        return self._answer(context, request.placement_id)

    def place(
        self, request: scheduler_pb2.PlaceRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.PlaceResponse:
        return scheduler_pb2.PlaceResponse(
            placement=self._answer(context, request.request.request_id)
        )


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, str]]:
    servicer = Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    # Two methods of the Scheduler service; the others answer UNIMPLEMENTED.
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "GetPlacement": grpc.unary_unary_rpc_method_handler(
            servicer.get_placement,
            request_deserializer=scheduler_pb2.GetPlacementRequest.FromString,
            response_serializer=placement_pb2.Placement.SerializeToString,
        ),
        "Place": grpc.unary_unary_rpc_method_handler(
            servicer.place,
            request_deserializer=scheduler_pb2.PlaceRequest.FromString,
            response_serializer=scheduler_pb2.PlaceResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("tessera.v1.Scheduler", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_unavailable_is_retried_until_an_attempt_succeeds(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.script = [UNAVAILABLE, UNAVAILABLE]
    with Client(target, retry=FAST) as client:
        assert client.get("pl-1@h").placement_id == "pl-1@h"
    assert len(servicer.calls) == 3


def test_attempts_stop_at_the_policys_limit_and_raise_unavailable(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, target = scripted
    servicer.script = [UNAVAILABLE] * 9
    with Client(target, retry=FAST) as client, pytest.raises(UnavailableError) as err:
        client.get("pl-1@h")
    assert len(servicer.calls) == FAST.max_attempts
    assert err.value.code is UNAVAILABLE and err.value.message == "scripted UNAVAILABLE"


def test_without_a_policy_unavailable_is_not_retried(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.script = [UNAVAILABLE]
    with Client(target, retry=None) as client, pytest.raises(UnavailableError):
        client.get("pl-1@h")
    assert len(servicer.calls) == 1


@pytest.mark.parametrize(
    ("code", "raised"),
    [
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
    ],
)
def test_other_codes_are_not_retried(
    scripted: tuple[Scripted, str], code: grpc.StatusCode, raised: type[Exception]
) -> None:
    servicer, target = scripted
    servicer.script = [code]
    with Client(target, retry=FAST) as client, pytest.raises(raised):
        client.get("pl-1@h")
    assert len(servicer.calls) == 1


def test_a_place_retried_sends_one_request_id_so_the_scheduler_places_once(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, target = scripted
    servicer.script = [UNAVAILABLE, UNAVAILABLE]
    request = placement_pb2.PlacementRequest(tenant="acme")  # no request id: the client adds one
    with Client(target, retry=FAST) as client:
        placed = client.place(request)
    assert len(servicer.calls) == 3 and len(set(servicer.calls)) == 1
    assert placed.request_id == servicer.calls[0] and placed.request_id.startswith("client-")
    assert request.request_id == ""  # the caller's message is left as it was


def test_bad_request_field_violations_reach_the_error(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.script = [grpc.StatusCode.INVALID_ARGUMENT]
    with Client(target) as client, pytest.raises(InvalidArgumentError) as err:
        client.get("pl-1@h")
    assert err.value.message == "claims[0].count: too small"
    assert [str(v) for v in err.value.field_violations] == ["claims[0].count: too small"]


def test_a_retry_policy_outside_grpcs_limits_is_refused() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=6)
    with pytest.raises(ValueError, match="backoffs"):
        RetryPolicy(initial_backoff_s=2.0, max_backoff_s=1.0)
