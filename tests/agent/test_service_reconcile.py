"""At start the agent destroys what it created and no placement holds any more.

The checkpoint's ledger (``agent.checkpoint``) lists every object the agent
created and has not destroyed. Here an entry is dropped from the checkpoint
behind the agent's back (as a lost or hand-edited entry would be), leaving its
objects orphaned; a restarted agent's :meth:`AgentServicer.recover` removes
them, and nothing it did not create. Host: ``virt-2s`` (see
``test_service_slots``).
"""

from __future__ import annotations

from pathlib import Path

from tessera.agent.actuation.mdev import MdevManager
from tessera.agent.checkpoint import Checkpoint
from tessera.agent.nvml import PynvmlClient
from tessera.agent.sysfs import Sysfs
from tessera.agent.testing.nvml import FakeNvml

from ..conftest import Runner
from . import test_service_slots as slots
from .agentclient import AgentClient
from .test_service_slots import (
    P4,
    PF,
    THREE_G,
    UUID_A,
    UUID_B,
    attr,
    gpu_instances,
    mdev,
    mdevs,
    mig,
    occupy,
    placement,
    servicer,
    vf,
)

# Fixtures shared with test_service_slots.
agent = slots.agent
fake_nvml = slots.fake_nvml
host = slots.host
root = slots.root


def lose_entry(state: Path, placement_id: str) -> None:
    """Drop an entry from the checkpoint file, leaving the host as it is."""
    Checkpoint(state / "cp.json").remove(placement_id)


def restart(host: Sysfs, state: Path, fake: FakeNvml) -> None:
    servicer(host, state, PynvmlClient(fake)).recover()


def test_the_ledger_lists_what_a_placement_created_until_it_is_destroyed(
    agent: AgentClient, tmp_path: Path
) -> None:
    agent.prepare(placement("pl", vf(1), mdev(UUID_A), mig(THREE_G, 4, 4)))

    assert sorted(Checkpoint(tmp_path / "cp.json").created()) == [
        f"mdev:{UUID_A}",
        "mig:0000:4b:00.0:9:4+4",
        f"sriov:{PF}",
    ]
    agent.unprepare("pl")
    assert Checkpoint(tmp_path / "cp.json").created() == {}


def test_orphans_the_agent_created_are_destroyed_at_start(
    agent: AgentClient, host: Sysfs, fake_nvml: FakeNvml, root: Path, tmp_path: Path
) -> None:
    agent.prepare(placement("pl", vf(1), mdev(UUID_A), mig(THREE_G, 4, 4)))
    lose_entry(tmp_path, "pl")

    restart(host, tmp_path, fake_nvml)

    assert mdevs(host) == []
    assert gpu_instances(root) == []
    assert (attr(host, PF, "sriov_numvfs"), attr(host, PF, "sriov_drivers_autoprobe")) == (
        "0",
        "1",
    )
    assert Checkpoint(tmp_path / "cp.json").created() == {}


def test_what_a_placement_still_holds_is_kept(
    agent: AgentClient, host: Sysfs, fake_nvml: FakeNvml, root: Path, tmp_path: Path
) -> None:
    agent.prepare(placement("kept", mdev(UUID_A), mig(THREE_G, 4, 4)))
    agent.prepare(placement("lost", mdev(UUID_B, "nvidia-63")))
    lose_entry(tmp_path, "lost")

    restart(host, tmp_path, fake_nvml)

    assert mdevs(host) == [UUID_A]
    assert len(gpu_instances(root)) == 1
    assert sorted(Checkpoint(tmp_path / "cp.json").created()) == [
        f"mdev:{UUID_A}",
        "mig:0000:4b:00.0:9:4+4",
    ]


def test_what_the_agent_did_not_create_is_never_touched(
    agent: AgentClient, host: Sysfs, fake_nvml: FakeNvml, root: Path, tmp_path: Path
) -> None:
    MdevManager(host).create(P4, "nvidia-63", UUID_B)  # an operator's mdev
    theirs = occupy(fake_nvml, THREE_G, 0, 4)  # an operator's GPU instance
    # An mdev the placement adopted (it existed) is the placement's, not the agent's.
    MdevManager(host).create(P4, "nvidia-63", UUID_A)
    agent.prepare(placement("pl", mdev(UUID_A)))
    lose_entry(tmp_path, "pl")

    restart(host, tmp_path, fake_nvml)

    assert mdevs(host) == sorted([UUID_A, UUID_B])
    assert [gi["id"] for gi in gpu_instances(root)] == [theirs]


def test_a_create_that_failed_leaves_nothing_in_the_ledger(
    agent: AgentClient, fake_nvml: FakeNvml, tmp_path: Path
) -> None:
    occupy(fake_nvml, THREE_G, 0, 4)

    # 4g.40gb at 0+4 overlaps the operator's 3g at 0+4: NVML refuses it.
    _, details = agent.refusal(placement("pl", mig(5, 0, 4)))

    assert "INSUFFICIENT_RESOURCES" in details.upper(), details

    assert Checkpoint(tmp_path / "cp.json").created() == {}


def test_an_orphan_that_cannot_be_removed_yet_stays_in_the_ledger(
    agent: AgentClient, host: Sysfs, fake_nvml: FakeNvml, tmp_path: Path, arun: Runner
) -> None:
    agent.prepare(placement("pl", mig(THREE_G, 4, 4)))
    lose_entry(tmp_path, "pl")
    fake_nvml.nvmlShutdown()  # NVML answers UNINITIALIZED to everything

    restart(host, tmp_path, fake_nvml)

    assert list(Checkpoint(tmp_path / "cp.json").created()) == ["mig:0000:4b:00.0:9:4+4"]
