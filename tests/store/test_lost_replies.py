"""A write whose reply is lost is sent again, and answers the second time as it did the first.

The scheduler's store client retries a command on a fresh connection when
its connection fails (a store restart, a failover, a network blip). When the
connection fails after the server ran the command but before its reply
arrived, the retry runs it a second time. On a Redis Cluster a reservation
is three scripts (intent, commit, finalization), and the commit on the host
must know itself when it runs again: answering "placement id already in
use" made the caller plan the request again and commit a second placement
for it, leaving the first one held by nobody.

The cluster here is three real Valkey primaries, each behind a
:class:`~tests.store.lossy_link.LossyLink` it announces to clients: the
scheduler's cluster client reaches every node through a link that can drop
a reply.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tessera.scheduler.core import guards
from tessera.scheduler.core.identity import IommuGroupNumber, SlotKey, iommu_group_slot
from tessera.scheduler.service.convert import host_view_from_inventory
from tessera.scheduler.store import schema
from tessera.scheduler.store.connection import connect_store
from tessera.scheduler.store.redis_store import (
    ClaimOutcome,
    CommitOutcome,
    CommitResult,
    RedisStateStore,
)

from ..conftest import Runner
from ..scheduler.service.test_cluster_model import two_gpu_host
from .lossy_link import LossyLink
from .valkey_cluster import _free_port, valkey_cluster

H = "h1"


@pytest.fixture(scope="module")
def lossy_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[int, int]]]:
    """Three primaries, each announcing a link's port: (link port, node port) per node."""
    links = [_free_port() for _ in range(3)]
    with valkey_cluster(tmp_path_factory.mktemp("valkey-lossy"), 3, announce=links) as ports:
        yield list(zip(links, ports, strict=True))


def test_a_commit_whose_reply_was_lost_is_committed_once_on_a_cluster(
    lossy_cluster: list[tuple[int, int]], arun: Runner
) -> None:
    async def body() -> None:
        async with contextlib.AsyncExitStack() as stack:
            links = [
                await stack.enter_async_context(LossyLink(link, node))
                for link, node in lossy_cluster
            ]
            client = await connect_store(f"redis+cluster://127.0.0.1:{links[0].port}")
            stack.push_async_callback(client.aclose)
            store = RedisStateStore(client)
            inventory = two_gpu_host(H)
            await store.upsert_host(
                H, inventory.SerializeToString(), inventory_generation=1, boot_id="b1",
                agent_address="agent:1", now_ms=1,
            )  # fmt: skip
            view = host_view_from_inventory(inventory)

            async def commit(request_id: str, group: int) -> tuple[str, CommitResult]:
                slots = [str(iommu_group_slot(IommuGroupNumber(group)))]
                keys = [SlotKey(s) for s in slots]
                found = await store.get_host(H)
                assert found is not None
                claim = await store.claim_request(request_id, "digest", f"call-{request_id}")
                assert claim.outcome is ClaimOutcome.CLAIMED
                placement_id = schema.placement_id(request_id, H)
                return placement_id, await store.commit_reservation(
                    host_id=H,
                    guards=guards.expected(view, dict(found.versions), keys, exclusive=False),
                    bumps=guards.changed_by(view, keys),
                    slots=slots,
                    placement_id=placement_id,
                    placement=b"payload",
                    request_id=request_id,
                    claimant=f"call-{request_id}",
                    tenant="acme",
                )

            # A first commit, whole: the node holding the host has the
            # scripts loaded (a reply lost now would be NOSCRIPT's).
            _, first = await commit("req-0", 2)
            assert first.outcome is CommitOutcome.COMMITTED
            # The one call naming both the host's slot owners and the new
            # placement is its commit: its reply is lost, on whichever node
            # holds the host.
            for link in links:
                link.lose_reply_to(schema.alloc(H).encode(), b"pl-req-1@h1")
            placement_id, result = await commit("req-1", 1)
            for link in links:
                link.lose_reply_to()
            assert sum(link.lost for link in links) == 1, "no reply was lost: nothing tested"

            assert result.outcome is CommitOutcome.COMMITTED, result.detail
            assert result.placement_id == placement_id
            assert await store.get_placement(placement_id) is not None
            # The request made this one placement, and is finished.
            again = await store.claim_request("req-1", "digest", "call-2")
            assert (again.outcome, again.placement_id) == (ClaimOutcome.DUPLICATE, placement_id)
            after = await store.get_host(H)
            assert after is not None
            assert after.allocations["iommu-group:1"] == placement_id

    arun(body())
