"""The Scheduler API under fuzzing: bench/request_fuzz.py at about 1,000 requests, in CI.

One real cluster (embedded Valkey, a scheduler, agents on two fake hosts),
every method of the Scheduler service sent mutated, invalid, unplaceable and
raw random requests (``bench/request_fuzz.py`` says what each kind is). The
benchmark runs the same code with 20,000 requests per method. Nothing here
asserts a time.

Also the outside tester's regression: a 20,000-character id in GetPlacement
or Release came back as RESOURCE_EXHAUSTED "metadata size exceeds hard
limit", because the error echoed the id and gRPC carries status messages in
trailing metadata.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

# ``bench`` lives at the repository root, uninstalled; pytest's importlib mode
# leaves sys.path alone.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import request_fuzz as fz  # noqa: E402
from tessera.scheduler.core.validation import MAX_IDENT, MAX_PLACEMENT_ID  # noqa: E402
from tessera.scheduler.local_cluster import LocalCluster  # noqa: E402
from tessera.v1 import scheduler_pb2, scheduler_pb2_grpc  # noqa: E402

#: About 1,000 requests in all, whatever the number of methods.
PER_RPC = 1000 // len(fz.SERVICE.methods)
BURST = 100
SEED = 11


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with fz.start_cluster(tmp_path_factory.mktemp("fuzz")) as c:
        yield c


@pytest.fixture(scope="module")
def result(cluster: LocalCluster) -> dict[str, Any]:
    return fz.fuzz(cluster, PER_RPC, BURST, seed=SEED)


def samples(result: dict[str, Any]) -> str:
    return "\n".join(str(s) for s in result["samples"][:10])


def test_every_method_of_the_scheduler_is_fuzzed_with_every_kind(result: dict[str, Any]) -> None:
    assert set(result["by_rpc"]) == {m.name for m in fz.SERVICE.methods}
    for rpc, kinds in result["by_rpc"].items():
        assert sum(sum(codes.values()) for codes in kinds.values()) == PER_RPC, rpc
        assert {"mutated", "raw/undecodable"} <= set(kinds), rpc
    for rpc in ("Place", "PlaceBatch", "Explain"):
        assert {"invalid", "unplaceable"} <= set(result["by_rpc"][rpc])
    # Valid requests got through too: the fuzzing reached the engine and the hosts.
    assert result["by_rpc"]["Place"]["mutated"].get("OK", 0) > 0


def test_no_answer_is_internal_or_unknown_and_every_call_is_answered(
    result: dict[str, Any],
) -> None:
    codes = result["codes"]
    assert not {"INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"} & set(codes), samples(result)


def test_undecodable_bodies_answer_invalid_argument(result: dict[str, Any]) -> None:
    # The server's interceptor answers a body that does not decode; without
    # it gRPC answers UNKNOWN.
    undecodable = result["undecodable"]
    assert set(undecodable) == {"INVALID_ARGUMENT"}, samples(result)
    assert undecodable["INVALID_ARGUMENT"] > 0


def test_no_invalid_request_is_accepted(result: dict[str, Any]) -> None:
    assert result["accepted_invalid"] == 0, samples(result)


def test_status_messages_stay_under_the_cap(result: dict[str, Any]) -> None:
    assert 0 < result["max_details_bytes"] <= result["details_cap_bytes"], samples(result)


def test_a_burst_of_refused_requests_changes_nothing_in_the_store(result: dict[str, Any]) -> None:
    burst = result["burst"]
    assert burst["requests"] == BURST
    assert burst["accepted"] == 0, samples(result)
    assert "OK" not in burst["codes"]
    # The store held placements, slots and request records to leave alone.
    assert burst["held_placements"] > 0 and burst["keys"] > 5
    assert burst["changed_keys"] == []


def test_the_scheduler_is_alive_and_answering_after_it(
    result: dict[str, Any], cluster: LocalCluster
) -> None:
    assert result["alive"] and result["answering"]
    assert cluster.processes["scheduler"].poll() is None
    assert fz.failures(result) == []


# -- the 20 KB id regression --------------------------------------------------------------

HUGE = "p" * 20_000


@pytest.mark.parametrize(
    ("rpc", "field"),
    [
        ("GetPlacement", "placement_id"),
        ("GetPlacement", "request_id"),
        ("Release", "placement_id"),
        ("Release", "request_id"),
        ("ListPlacements", "tenant"),
        ("ListPlacements", "host_id"),
    ],
)
def test_a_20kb_id_answers_invalid_argument_naming_the_field_in_under_1kb(
    cluster: LocalCluster, rpc: str, field: str
) -> None:
    classes: dict[str, Any] = {
        "GetPlacement": scheduler_pb2.GetPlacementRequest,
        "Release": scheduler_pb2.ReleaseRequest,
        "ListPlacements": scheduler_pb2.ListPlacementsRequest,
    }
    request = classes[rpc](**{field: HUGE})
    with cluster.channel() as channel, pytest.raises(grpc.RpcError) as err:
        getattr(scheduler_pb2_grpc.SchedulerStub(channel), rpc)(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    limit = MAX_PLACEMENT_ID if field == "placement_id" else MAX_IDENT
    assert details == f"{field}: must be at most {limit} characters, not 20,000"
    assert len(details.encode()) < 1024
