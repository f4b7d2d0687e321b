"""ListPlacements and ListHosts a page at a time: every item once, in order, whatever the page size.

Through the coordinator on a real Valkey, on three copies of the ``virt-2s``
fixture host (see ``test_list_hosts``), with fake agents at the gRPC edge::

    virt-a, virt-b, virt-c    16 ConnectX-6 Dx VFs each (2 PFs x 8)

20 single-VF placements of two tenants fill virt-a (best fit packs), then
spill onto the next host. Pages are read with every size from 1 to 7 and
must join into the whole list, ordered by host id, then placement id.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tessera.scheduler.service.coordinator import PlacementCoordinator
from tessera.scheduler.service.page_tokens import PageRequest
from tessera.scheduler.service.placement_lookup import PlacementLookup
from tessera.scheduler.store.redis_store import RedisStateStore
from tessera.v1 import placement_pb2

from ...conftest import Runner
from .test_host_admin import Agents
from .test_list_hosts import A_VF, Clock, request, virt_2s

HOSTS = ("virt-a", "virt-b", "virt-c")
PLACEMENTS = 20


@pytest.fixture
def coordinator(redis_client: aioredis.Redis) -> PlacementCoordinator:
    return PlacementCoordinator(RedisStateStore(redis_client), Agents(), clock_ms=Clock())


async def _fill(coordinator: PlacementCoordinator) -> list[placement_pb2.Placement]:
    """Register the hosts and place :data:`PLACEMENTS` VFs; the placements in list order."""
    for host_id in HOSTS:
        inventory = virt_2s()
        inventory.host_id = host_id
        assert await coordinator.register(inventory, f"{host_id}:50052")
    placed = [
        await coordinator.place(request(f"r{i}", "acme" if i % 3 else "blue", A_VF))
        for i in range(PLACEMENTS)
    ]
    return sorted(placed, key=lambda p: (p.host_id, p.placement_id))


def _everyone(_tenant: str) -> bool:
    return True


async def _pages(
    coordinator: PlacementCoordinator, size: int, tenant: str = "", host_id: str = ""
) -> list[list[str]]:
    """Every page's placement ids, following the keys the coordinator hands back."""
    pages: list[list[str]] = []
    after = ""
    while True:
        rows, after = await coordinator.placements_page(
            tenant, host_id, PageRequest(size, after), _everyone
        )
        pages.append([p.placement_id for p in rows])
        if not after:
            return pages


def test_pages_of_every_size_join_into_the_whole_list_in_host_then_id_order(
    coordinator: PlacementCoordinator, arun: Runner
) -> None:
    async def body() -> None:
        placed = await _fill(coordinator)
        assert len({p.host_id for p in placed}) >= 2  # the premise: pages cross hosts
        whole = [p.placement_id for p in placed]
        for size in range(1, 8):
            pages = await _pages(coordinator, size)
            assert [pid for page in pages for pid in page] == whole, size
            # Full pages but the last, which is never empty: no wasted call.
            assert all(len(page) == size for page in pages[:-1])
            assert 0 < len(pages[-1]) <= size
        assert await _pages(coordinator, PLACEMENTS) == [whole]

    arun(body())


def test_filters_and_the_callers_view_apply_before_the_page_is_cut(
    coordinator: PlacementCoordinator, arun: Runner
) -> None:
    async def body() -> None:
        placed = await _fill(coordinator)
        blue = [p.placement_id for p in placed if p.tenant == "blue"]
        pages = await _pages(coordinator, 2, tenant="blue")
        assert [pid for page in pages for pid in page] == blue
        assert all(len(page) == 2 for page in pages[:-1])

        first_host = placed[0].host_id
        on_host = [p.placement_id for p in placed if p.host_id == first_host]
        pages = await _pages(coordinator, 3, host_id=first_host)
        assert [pid for page in pages for pid in page] == on_host

        # A caller acting for acme only sees full pages of acme's.
        rows, after = await coordinator.placements_page(
            "", "", PageRequest(4), lambda tenant: tenant == "acme"
        )
        assert [p.tenant for p in rows] == ["acme"] * 4 and after == rows[-1].placement_id

    arun(body())


def test_a_page_resumes_after_its_key_when_that_placement_was_released_meanwhile(
    coordinator: PlacementCoordinator, arun: Runner
) -> None:
    async def body() -> None:
        placed = await _fill(coordinator)
        rows, after = await coordinator.placements_page("", "", PageRequest(5), _everyone)
        assert after == placed[4].placement_id
        await coordinator.release(after, "")
        await coordinator.release(placed[5].placement_id, "")
        rest, _ = await coordinator.placements_page("", "", PageRequest(100, after), _everyone)
        assert [p.placement_id for p in rows + rest] == [
            p.placement_id for p in placed if p.placement_id != placed[5].placement_id
        ]

    arun(body())


def test_a_page_stops_at_its_byte_budget_but_always_holds_one_placement(
    redis_client: aioredis.Redis, coordinator: PlacementCoordinator, arun: Runner
) -> None:
    async def body() -> None:
        placed = await _fill(coordinator)
        lookup = PlacementLookup(RedisStateStore(redis_client))
        hosts = sorted({p.host_id for p in placed})
        rows, after = await lookup.page("", "", hosts, PageRequest(500), visible=_everyone)
        assert len(rows) == PLACEMENTS and after == ""
        one_each = placed[0].ByteSize() + 1
        rows, after = await lookup.page(
            "", "", hosts, PageRequest(500), visible=_everyone, max_bytes=one_each
        )
        assert [p.placement_id for p in rows] == [placed[0].placement_id]
        assert after == placed[0].placement_id

    arun(body())


def test_hosts_come_a_page_at_a_time_in_host_id_order(
    coordinator: PlacementCoordinator, arun: Runner
) -> None:
    async def body() -> None:
        await _fill(coordinator)
        for size in (1, 2, 3):
            seen: list[str] = []
            after = ""
            while True:
                rows, after = await coordinator.hosts_page(PageRequest(size, after))
                assert 0 < len(rows) <= size
                seen += [h.host_id for h in rows]
                if not after:
                    break
            assert seen == list(HOSTS)
        # Summaries as ListHosts showed them whole.
        whole = await coordinator.hosts()
        rows, after = await coordinator.hosts_page(PageRequest(10))
        assert after == "" and [h.host_id for h in rows] == [h.host_id for h in whole]
        assert [h.used_by_form for h in rows] == [h.used_by_form for h in whole]
        rows, after = await coordinator.host_admin.hosts_page(PageRequest(10), max_bytes=1)
        assert [h.host_id for h in rows] == ["virt-a"] and after == "virt-a"

    arun(body())
