"""The fleet view's pure parts: a tile per host, the filters, the totals and the pages.

Spec (``scheduler.dashboard.fleet``):

* A tile is derived from one host state and its usage alone: its lease
  (``live``, ``expired``, ``cordoned``), labels, models (most common first;
  a device without a model by its kind), devices offered and in use, units
  held per form, the form most of its used *devices* are in, the tenants
  holding something, its GPUs and their free capacity.
* Its band colours it: 0 idle, then 1 to 4 by quarter of devices in use.
* A filter keeps the tiles that pass every part given: part of the host id,
  a label (``key`` or ``key=value``), part of a model (any case), a tenant,
  a lease state. Parsed from a query string, a value longer than
  :data:`MAX_FILTER` or a lease that is no lease state is refused with the
  field named.
* Totals sum the tiles; the stranded share is the free GPU capacity on
  partly used GPUs over all free GPU capacity.
* A page is clamped to the pages there are (at least one).

Hosts are the named topologies of ``tests/scheduler/core/checker_topologies``
(``mixed()``: every form; ``gpu_host()``: GPUs alone, one per root port),
with allocations as slot keys the store holds; nothing is mocked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import pytest

from tessera.scheduler.core.fragmentation import free_shares
from tessera.scheduler.core.host import HostView
from tessera.scheduler.core.host_usage import host_usage
from tessera.scheduler.core.identity import (
    IommuGroupNumber,
    PciAddress,
    PlacementId,
    SlotKey,
    TenantName,
    iommu_group_slot,
)
from tessera.scheduler.core.mig import GpuInstance
from tessera.scheduler.core.occupancy import build_occupancy
from tessera.scheduler.core.slots import mdev_slot, mig_slot, vf_slot
from tessera.scheduler.core.snapshot import HostState
from tessera.scheduler.dashboard.fleet import (
    FORMS,
    MAX_FILTER,
    PAGE_SIZE,
    FleetFilter,
    HostTile,
    lease_of,
    page_of,
    stranded_gpu_share,
    tile_of,
    totals,
)

from ..core.checker_topologies import (
    A16,
    A100,
    CX6,
    H100,
    MDEV_GPU,
    MIG_GPU,
    PF_EMPTY,
    PF_ENABLED,
    gpu_host,
    mixed,
)
from ..core.test_vgpu_vfs import vgpu_host

#: Groups of ``mixed()``'s A100s: 03:00.0, 04:00.0 and 50:00.0 (with its USB controller).
GROUP_A, GROUP_B, GROUP_WITH_USB = 10, 11, 60

#: A 3g.40gb on memory slices 4-7 of an H100: 3 of 7 compute slices.
HALF_MIG = GpuInstance(start=4, size=4, profile_id=9, slices=3)


def group(number: int) -> str:
    return iommu_group_slot(IommuGroupNumber(number))


def state_of(
    view: HostView,
    allocations: Mapping[str, str] | None = None,
    tenants: Mapping[str, str] | None = None,
    *,
    schedulable: bool = True,
    cordoned: bool = False,
) -> HostState:
    """``view`` with slots held (slot -> placement) by tenants (placement -> tenant)."""
    return HostState(
        view,
        1,
        allocations={SlotKey(k): PlacementId(p) for k, p in (allocations or {}).items()},
        schedulable=schedulable,
        cordoned=cordoned,
        tenants={PlacementId(p): TenantName(t) for p, t in (tenants or {}).items()},
    )


def tile(state: HostState) -> HostTile:
    return tile_of(state, host_usage(state, build_occupancy(state)))


def labelled(view: HostView, labels: Mapping[str, str]) -> HostView:
    return replace(view, labels=dict(labels))


# -- the tile of a host ---------------------------------------------------------------


def test_the_lease_is_live_expired_or_cordoned() -> None:
    view = gpu_host("h", plain=1)
    assert lease_of(state_of(view)) == "live"
    # The lease ran out: no new placements, but no operator took it out.
    assert lease_of(state_of(view, schedulable=False)) == "expired"
    # An operator took it out (the scheduler marks it unschedulable too).
    assert lease_of(state_of(view, schedulable=False, cordoned=True)) == "cordoned"
    # Cordoned says more than expired, whatever the lease says.
    assert lease_of(state_of(view, cordoned=True)) == "cordoned"
    assert tile(state_of(view, schedulable=False, cordoned=True)).lease == "cordoned"
    assert tile(state_of(view, schedulable=False)).lease == "expired"


def test_an_untouched_host_shows_its_devices_models_and_live_units() -> None:
    """``mixed()`` as the agent reports it, nothing allocated.

    In use already: the boot display (the host's), the PF with VFs enabled,
    the A16 with a live nvidia-1 and the H100 with a live 3g.40gb.
    """
    t = tile(state_of(mixed("m1")))
    assert (t.host_id, t.lease, t.labels) == ("m1", "live", {"zone": "a", "tier": "gold"})
    assert (t.devices, t.used) == (9, 4)
    assert t.by_form == {"whole": 0, "vf": 0, "mdev": 1, "mig": 1}
    assert list(t.by_form) == list(FORMS)
    assert t.tenants == ()  # live units nobody placed belong to no tenant
    # Four A100s, two ConnectX-6 and two A16s, one H100: most common first.
    assert t.models[0] == A100 and t.models[-1] == H100
    assert set(t.models[1:3]) == {CX6, A16} and len(t.models) == 4
    # A100 x4 (one the host's), A16 x2 and the H100 can go whole; VF-capable NICs are no GPUs.
    assert t.gpus == 7
    assert t.allocated == pytest.approx(4 / 9)


def test_a_device_without_a_model_is_listed_by_its_kind() -> None:
    t = tile(vgpu_host())  # its PF's inventory names no model
    assert t.models == ("gpu",)


def test_tenants_are_listed_once_each_sorted() -> None:
    state = state_of(
        mixed(),
        {
            group(GROUP_A): "pl-1",
            vf_slot(PF_EMPTY, 0): "pl-2",
            mdev_slot(MDEV_GPU, "nvidia-2", "u-1"): "pl-3",
            mig_slot(MIG_GPU, 19, 0, 1): "pl-4",
        },
        {"pl-1": "zeta", "pl-2": "acme", "pl-3": "zeta", "pl-4": "blue"},
    )
    t = tile(state)
    assert t.tenants == ("acme", "blue", "zeta")
    assert t.by_form == {"whole": 1, "vf": 1, "mdev": 2, "mig": 2}


def test_the_form_is_the_one_most_used_devices_are_in_not_the_most_units() -> None:
    """Three A100s held whole (3 units); six VFs held on two PFs (6 units).

    Devices: 3 whole, 2 vf, 1 mdev (the live nvidia-1), 1 mig (the live
    3g.40gb), 1 host: the tile is in the whole form though VFs are more units.
    """
    allocations = {group(g): f"pl-w{g}" for g in (GROUP_A, GROUP_B, GROUP_WITH_USB)}
    allocations |= {vf_slot(PF_EMPTY, i): f"pl-v{i}" for i in range(5)}
    allocations[vf_slot(PF_ENABLED, 0)] = "pl-v9"
    t = tile(state_of(mixed(), allocations, {p: "acme" for p in allocations.values()}))
    assert t.by_form["vf"] == 6 and t.by_form["whole"] == 3
    assert t.form == "whole"


def test_a_host_with_nothing_in_use_has_no_form_and_band_0() -> None:
    t = tile(state_of(gpu_host("h", plain=2)))
    assert (t.used, t.form, t.band, t.allocated) == (0, "", 0, 0.0)
    assert t.by_form == dict.fromkeys(FORMS, 0)
    assert (t.gpus, t.gpu_free) == (2, 2.0)


def test_a_mig_gpu_in_use_gives_the_mig_form_and_its_free_share() -> None:
    t = tile(state_of(gpu_host("h", mig=[(HALF_MIG,)], plain=1)))
    assert (t.devices, t.used, t.form) == (2, 1, "mig")
    assert set(t.models) == {H100, A100}
    assert t.gpus == 2
    assert t.gpu_free == pytest.approx(4 / 7 + 1)


@pytest.mark.parametrize(
    ("held", "band"),
    [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4), (8, 4)],
)
def test_the_band_is_0_when_idle_then_1_to_4_by_quarter_in_use(held: int, band: int) -> None:
    """Eight A100s, ``held`` of them passed through: 1/8 is band 1, 2/8 band 2, 8/8 band 4."""
    allocations = {group(100 + n): f"pl-{n}" for n in range(held)}
    t = tile(
        state_of(gpu_host("h", plain=8), allocations, dict.fromkeys(allocations.values(), "a"))
    )
    assert (t.devices, t.used) == (8, held)
    assert t.allocated == held / 8
    assert t.band == band
    assert t.form == ("whole" if held else "")


# -- filters -------------------------------------------------------------------------


def fleet() -> list[HostTile]:
    """Four hosts, two racks::

    rack1-01  mixed()            zone=a tier=gold  live      acme holds an A100 whole
    rack1-02  one H100 (MIG)     zone=a            live      blue holds a 1g.10gb
    rack2-01  mixed()            zone=b tier=""    cordoned  nobody
    rack2-02  two A100s          zone=b            expired   acme holds one whole
    """
    h100 = PciAddress("0000:81:00.0")
    return [
        tile(
            state_of(
                mixed("rack1-01", {"zone": "a", "tier": "gold"}),
                {group(GROUP_A): "pl-1"},
                {"pl-1": "acme"},
            )
        ),
        tile(
            state_of(
                labelled(gpu_host("rack1-02", mig=[()]), {"zone": "a"}),
                {mig_slot(h100, 19, 0, 1): "pl-2"},
                {"pl-2": "blue"},
            )
        ),
        tile(
            state_of(mixed("rack2-01", {"zone": "b", "tier": ""}), schedulable=False, cordoned=True)
        ),
        tile(
            state_of(
                labelled(gpu_host("rack2-02", plain=2), {"zone": "b"}),
                {group(100): "pl-3"},
                {"pl-3": "acme"},
                schedulable=False,
            )
        ),
    ]


def kept(flt: FleetFilter) -> list[str]:
    return [t.host_id for t in fleet() if flt.matches(t)]


def test_an_empty_filter_keeps_every_host() -> None:
    assert kept(FleetFilter()) == ["rack1-01", "rack1-02", "rack2-01", "rack2-02"]


def test_search_keeps_hosts_whose_id_contains_it() -> None:
    assert kept(FleetFilter(search="rack1")) == ["rack1-01", "rack1-02"]
    assert kept(FleetFilter(search="-02")) == ["rack1-02", "rack2-02"]
    assert kept(FleetFilter(search="rack3")) == []


def test_a_bare_label_key_keeps_hosts_with_that_label_whatever_its_value() -> None:
    assert kept(FleetFilter(label="tier")) == ["rack1-01", "rack2-01"]  # "" is a value too
    assert kept(FleetFilter(label="zone")) == ["rack1-01", "rack1-02", "rack2-01", "rack2-02"]
    assert kept(FleetFilter(label="rack")) == []


def test_key_equals_value_keeps_hosts_with_that_exact_value() -> None:
    assert kept(FleetFilter(label="zone=a")) == ["rack1-01", "rack1-02"]
    assert kept(FleetFilter(label="tier=gold")) == ["rack1-01"]
    assert kept(FleetFilter(label="tier=")) == ["rack2-01"]  # the empty value, not "any"
    assert kept(FleetFilter(label="zone=c")) == []
    assert kept(FleetFilter(label="zone=A")) == []  # values are compared exactly


def test_model_keeps_hosts_with_a_device_whose_model_contains_it_in_any_case() -> None:
    assert kept(FleetFilter(model="h100")) == ["rack1-01", "rack1-02", "rack2-01"]
    assert kept(FleetFilter(model="H100")) == kept(FleetFilter(model="h100"))
    assert kept(FleetFilter(model="nvidia a16")) == ["rack1-01", "rack2-01"]
    assert kept(FleetFilter(model="a100-SXM4")) == ["rack1-01", "rack2-01", "rack2-02"]
    assert kept(FleetFilter(model="connectx")) == ["rack1-01", "rack2-01"]
    assert kept(FleetFilter(model="mi300")) == []


def test_tenant_keeps_hosts_where_that_tenant_holds_something() -> None:
    assert kept(FleetFilter(tenant="acme")) == ["rack1-01", "rack2-02"]
    assert kept(FleetFilter(tenant="blue")) == ["rack1-02"]
    # A tenant is named whole: part of a name is another tenant.
    assert kept(FleetFilter(tenant="acm")) == []


def test_lease_keeps_hosts_in_that_lease_state() -> None:
    assert kept(FleetFilter(lease="live")) == ["rack1-01", "rack1-02"]
    assert kept(FleetFilter(lease="expired")) == ["rack2-02"]
    assert kept(FleetFilter(lease="cordoned")) == ["rack2-01"]


def test_a_host_must_pass_every_part_of_the_filter() -> None:
    assert kept(FleetFilter(label="zone=b", model="a100", lease="expired")) == ["rack2-02"]
    assert kept(FleetFilter(search="rack1", tenant="acme")) == ["rack1-01"]
    assert kept(FleetFilter(search="rack1", tenant="acme", model="a16")) == ["rack1-01"]
    assert kept(FleetFilter(search="rack1", tenant="acme", lease="cordoned")) == []


def test_parse_reads_each_field_of_a_query_and_ignores_the_rest() -> None:
    query = {
        "search": " rack1 ",
        "label": "zone=a",
        "model": "H100",
        "tenant": "acme",
        "lease": "live",
        "page": "3",
    }
    assert FleetFilter.parse(query) == FleetFilter(
        search="rack1", label="zone=a", model="H100", tenant="acme", lease="live"
    )
    assert FleetFilter.parse({}) == FleetFilter()
    assert FleetFilter.parse({"lease": ""}) == FleetFilter()


@pytest.mark.parametrize("name", ["search", "label", "model", "tenant"])
def test_parse_refuses_an_over_long_value_naming_the_field(name: str) -> None:
    assert getattr(FleetFilter.parse({name: "x" * MAX_FILTER}), name) == "x" * MAX_FILTER
    with pytest.raises(ValueError, match=rf"^{name}: .*{MAX_FILTER}"):
        FleetFilter.parse({name: "x" * (MAX_FILTER + 1)})


def test_parse_refuses_a_lease_that_is_no_lease_state_naming_the_field() -> None:
    for lease in ("live", "expired", "cordoned"):
        assert FleetFilter.parse({"lease": lease}).lease == lease
    for bad in ("dead", "LIVE", "live,expired"):
        with pytest.raises(ValueError, match=r"^lease: "):
            FleetFilter.parse({"lease": bad})
    with pytest.raises(ValueError, match=r"^lease: "):
        FleetFilter.parse({"lease": "l" * (MAX_FILTER + 1)})


# -- totals --------------------------------------------------------------------------


def test_totals_sum_the_tiles_forms_leases_and_distinct_tenants() -> None:
    tiles = fleet()
    stranded = {"rack1-01": 4 / 7, "rack1-02": 6 / 7, "not-in-the-fleet": 9.0}
    got = totals(tiles, stranded)
    assert got.hosts == 4
    assert got.leases == {"live": 2, "expired": 1, "cordoned": 1}
    # rack1-01: an A100 whole, the live nvidia-1 and 3g.40gb; rack1-02: the 1g.10gb;
    # rack2-01: the live nvidia-1 and 3g.40gb; rack2-02: an A100 whole.
    assert got.by_form == {"whole": 2, "vf": 0, "mdev": 2, "mig": 3}
    assert got.tenants == 2  # acme (on two hosts) and blue
    assert got.devices == 9 + 1 + 9 + 2
    assert got.used == 5 + 1 + 4 + 1
    assert got.allocated == pytest.approx(11 / 21)
    assert got.gpus == 7 + 1 + 7 + 2
    assert got.gpu_free == pytest.approx(sum(t.gpu_free for t in tiles))
    # Only the hosts counted count: the stranded figure of a host filtered out does not.
    assert got.gpu_stranded == pytest.approx(4 / 7 + 6 / 7)
    assert got.stranded_share == pytest.approx((4 / 7 + 6 / 7) / got.gpu_free)


def test_totals_of_no_host_are_zero_with_every_lease_and_form_present() -> None:
    got = totals([], {})
    assert (got.hosts, got.devices, got.used, got.gpus, got.tenants) == (0, 0, 0, 0, 0)
    assert got.leases == {"live": 0, "expired": 0, "cordoned": 0}
    assert got.by_form == dict.fromkeys(FORMS, 0)
    assert (got.allocated, got.stranded_share) == (0.0, 0.0)


def test_the_stranded_share_is_0_when_no_gpu_capacity_is_free() -> None:
    state = state_of(gpu_host("h", plain=1), {group(100): "pl-1"}, {"pl-1": "acme"})
    got = totals([tile(state)], {"h": 0.0})
    assert (got.gpu_free, got.gpu_stranded, got.stranded_share) == (0.0, 0.0, 0.0)


def test_stranded_capacity_is_what_is_free_on_gpus_neither_idle_nor_full() -> None:
    assert stranded_gpu_share([]) == 0.0
    assert stranded_gpu_share([0.0, 1.0, 1.0]) == 0.0
    assert stranded_gpu_share([0.0, 0.25, 1.0, 0.5]) == pytest.approx(0.75)


def test_stranded_capacity_of_a_real_host() -> None:
    """An H100 with a 3g.40gb (4/7 free), an idle H100, an A100 held whole (none free)."""
    state = state_of(
        gpu_host("h", mig=[(HALF_MIG,), ()], plain=1), {group(102): "pl-1"}, {"pl-1": "acme"}
    )
    shares = free_shares(state.view, build_occupancy(state))
    assert sorted(shares.values()) == pytest.approx([0.0, 4 / 7, 1.0])
    stranded = stranded_gpu_share(shares.values())
    assert stranded == pytest.approx(4 / 7)
    t = tile(state)
    got = totals([t], {"h": stranded})
    assert got.gpu_free == pytest.approx(4 / 7 + 1)
    assert got.stranded_share == pytest.approx((4 / 7) / (4 / 7 + 1))


# -- pages ---------------------------------------------------------------------------


def many(n: int) -> list[HostTile]:
    one = tile(state_of(gpu_host("h", plain=1)))
    return [replace(one, host_id=f"h{i:04}") for i in range(n)]


def test_pages_cut_the_tiles_in_order() -> None:
    tiles = many(2 * PAGE_SIZE + 50)
    first = page_of(tiles, 1)
    assert (first.page, first.pages, first.matched) == (1, 3, 2 * PAGE_SIZE + 50)
    assert [t.host_id for t in first.tiles] == [f"h{i:04}" for i in range(PAGE_SIZE)]
    second = page_of(tiles, 2)
    assert second.tiles[0].host_id == f"h{PAGE_SIZE:04}" and len(second.tiles) == PAGE_SIZE
    last = page_of(tiles, 3)
    assert len(last.tiles) == 50 and last.tiles[-1].host_id == f"h{2 * PAGE_SIZE + 49:04}"


@pytest.mark.parametrize(("asked", "given"), [(-5, 1), (0, 1), (1, 1), (3, 3), (4, 3), (10**9, 3)])
def test_a_page_past_either_end_is_clamped_to_the_pages_there_are(asked: int, given: int) -> None:
    tiles = many(25)
    page = page_of(tiles, asked, size=10)
    assert (page.page, page.pages, page.matched) == (given, 3, 25)
    assert [t.host_id for t in page.tiles] == [t.host_id for t in tiles[(given - 1) * 10 :][:10]]


def test_no_tiles_is_one_empty_page() -> None:
    for asked in (0, 1, 7):
        page = page_of([], asked)
        assert (list(page.tiles), page.page, page.pages, page.matched) == ([], 1, 1, 0)


def test_a_full_last_page_makes_no_empty_page_after_it() -> None:
    page = page_of(many(20), 5, size=10)
    assert (page.page, page.pages, len(page.tiles)) == (2, 2, 10)
