"""Agents refuse a scheduler background job of an older term (fencing tokens).

The reaper runs on one scheduler replica at a time; each term has a larger
token. Once a host has seen a term's token, a deposed replica that still
thinks it leads cannot tear down or prepare anything there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tessera.agent.checkpoint import Checkpoint
from tessera.agent.nvml import NullNvmlClient
from tessera.agent.reporter import HostReporter
from tessera.agent.service import FENCE_STEP, AgentServicer
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.hosts import build
from tessera.agent.testing.kernel import KernelEmulator

from ..conftest import Runner
from .agentclient import AgentClient
from .test_service_slots import A100, driver, placement, whole


@pytest.fixture
def host(tmp_path: Path) -> Sysfs:
    root = tmp_path / "virt"
    build("virt-2s", root)
    return Sysfs(root, KernelEmulator(root))


def start(host: Sysfs, state: Path, arun: Runner) -> AgentClient:
    reporter = HostReporter(host, NullNvmlClient(), host_id="virt", boot_id="b", labels={})
    return AgentClient(arun, AgentServicer(host, reporter, Checkpoint(state)))


@pytest.fixture
def agent(host: Sysfs, tmp_path: Path, arun: Runner) -> Iterator[AgentClient]:
    client = start(host, tmp_path / "cp.json", arun)
    yield client
    client.close()


def test_a_deposed_reaper_cannot_tear_down_after_its_successor_acted(
    agent: AgentClient, host: Sysfs
) -> None:
    agent.prepare(placement("pl", whole(A100, 5)))  # an ordinary placement: no token
    agent.unprepare("gone", fencing_token=7)  # the new leader's reconcile
    with pytest.raises(grpc.RpcError) as stale:
        agent.unprepare("pl", fencing_token=6)
    assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fencing_token: 6 is stale" in (stale.value.details() or "")
    assert driver(host, A100) == "vfio-pci"  # untouched
    agent.unprepare("pl", fencing_token=7)  # the current term may
    assert driver(host, A100) == "nvidia"


def test_ordinary_calls_carry_no_token_and_are_never_fenced(agent: AgentClient) -> None:
    agent.unprepare("x", fencing_token=9)
    agent.prepare(placement("pl", whole(A100, 5)))
    agent.unprepare("pl")
    assert agent.prepared() == []


def test_the_highest_token_survives_an_agent_restart(
    host: Sysfs, tmp_path: Path, arun: Runner
) -> None:
    first = start(host, tmp_path / "cp.json", arun)
    first.unprepare("x", fencing_token=12)
    first.close()
    again = start(host, tmp_path / "cp.json", arun)
    try:
        with pytest.raises(grpc.RpcError) as stale:
            again.prepare(placement("pl", whole(A100, 5)), fencing_token=11)
        assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        again.close()


def test_a_token_far_above_the_reported_fence_is_refused_and_never_remembered(
    host: Sysfs, tmp_path: Path, arun: Runner
) -> None:
    servicer = AgentServicer(
        host,
        HostReporter(host, NullNvmlClient(), host_id="virt", boot_id="b", labels={}),
        Checkpoint(tmp_path / "cp.json"),
    )
    servicer.learn_fence(40)  # what the scheduler's last heartbeat answer said
    agent = AgentClient(arun, servicer)
    try:
        for token in (2**64 - 1, 2**40, 40 + FENCE_STEP + 1):
            with pytest.raises(grpc.RpcError) as far:
                agent.unprepare("x", fencing_token=token)
            assert far.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "beyond any term the scheduler has issued" in (far.value.details() or "")
        assert Checkpoint(tmp_path / "cp.json").fence == 0  # nothing persisted
        agent.unprepare("x", fencing_token=41)  # the next term, a leader change away
        # No climbing: the ceiling is the reported fence's, not the highest seen.
        agent.unprepare("x", fencing_token=40 + FENCE_STEP)
        with pytest.raises(grpc.RpcError):
            agent.unprepare("x", fencing_token=40 + FENCE_STEP + 1)
        servicer.learn_fence(100)  # the store moved on: so does the ceiling
        agent.unprepare("x", fencing_token=100 + FENCE_STEP)
    finally:
        agent.close()
