"""Allocation keys read from the store are folded without trusting them.

A store edited by hand, written by another version or damaged can hold keys
the slot grammar does not know, numbers out of range, or devices the host
does not have. Folding a host's occupancy must not fail on them (one bad
key would stop every plan on the host), must tie an unknown key to no
device, and must keep every key it does understand held. The fold memoises
what each key means per host view, so the same keys are folded twice here:
the second time from the memo.
"""

from __future__ import annotations

import pytest

from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.identity import (
    HostId,
    IommuGroupNumber,
    PciAddress,
    PlacementId,
    RequestId,
    SlotKey,
    TenantName,
)
from tessera.scheduler.core.occupancy import DeviceMode, Occupancy, build_occupancy
from tessera.scheduler.core.plan import Plan
from tessera.scheduler.core.request import Claim, DeviceForm, DeviceKind, PlacementRequest
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState
from tests.scheduler.core.topologies import workstation

#: Keys the slot grammar does not read: held, but tied to nothing.
MALFORMED_KEYS = (
    "no-colon-at-all",
    "",
    ":",
    "warp-drive:0000:01:00.0",
    "iommu-group:",
    "iommu-group:not-a-number",
    "vf:0000:01:00.0",
    "vf:0000:01:00.0#x",
    "mdev:only-two#parts",
    "mig:0000:01:00.0#9@zero+one",
    "exclusive:no-such-domain:x#r",
    "exclusive:host",
    "\x00\r\n" * 10,
    "é" * 300,
)

#: Keys the grammar reads, naming devices this host does not have: held as
#: named (nothing else may take them should they appear), never spilling onto
#: the devices it has.
ABSENT_KEYS = (
    "iommu-group:-1",
    "iommu-group:99999999999999999999999999",
    "iommu-group:424242",
    "vf:0000:ff:00.0#3",
    "mdev:0000:ff:00.0#nvidia-1#0d7e3f6a",
    "mig:0000:ff:00.0#9@0+1",
)

HOSTILE_KEYS = MALFORMED_KEYS + ABSENT_KEYS


def _state(extra: dict[str, str]) -> HostState:
    view = workstation()
    allocations = {SlotKey("iommu-group:1"): PlacementId("held")}
    allocations.update({SlotKey(k): PlacementId(p) for k, p in extra.items()})
    return HostState(
        view=view,
        alloc_generation=3,
        allocations=allocations,
        tenants={PlacementId("held"): TenantName("tenant-a")},
    )


def _clean() -> Occupancy:
    clean = build_occupancy(_state({}))
    # What the understood key holds, as the fixture has it.
    assert clean.groups_taken == {IommuGroupNumber(1)}
    assert clean.modes[PciAddress("0000:01:00.0")] is DeviceMode.WHOLE
    return clean


@pytest.mark.parametrize("key", MALFORMED_KEYS, ids=repr)
def test_a_malformed_key_is_held_by_nothing_and_spoils_nothing(key: str) -> None:
    clean = _clean()
    state = _state({key: "stranger"})
    for _ in range(2):  # the second fold reads the memo
        # It ties to no device, group, VF, mdev, MIG slice, exclusive hold
        # or tenant: the occupancy is the clean one.
        assert build_occupancy(state) == clean


@pytest.mark.parametrize("key", ABSENT_KEYS, ids=repr)
def test_a_key_naming_an_absent_device_leaves_the_present_ones_as_they_were(key: str) -> None:
    clean = _clean()
    state = _state({key: "stranger"})
    present = set(state.view.functions)
    for _ in range(2):  # the second fold reads the memo
        folded = build_occupancy(state)
        assert {a: m for a, m in folded.modes.items() if a in present} == dict(clean.modes)
        assert folded.groups_taken & set(state.view.iommu_groups) == clean.groups_taken
        assert folded.tenants == clean.tenants and folded.exclusive == clean.exclusive
        assert folded.unusable == clean.unusable


def test_the_engine_places_beside_every_hostile_key_at_once() -> None:
    state = _state({key: f"stranger-{i}" for i, key in enumerate(HOSTILE_KEYS)})
    snap = ClusterSnapshot(hosts={HostId("ws"): state})
    request = PlacementRequest(
        RequestId("r1"),
        TenantName("tenant-b"),
        (Claim("gpu", DeviceKind.GPU, 1, forms=frozenset({DeviceForm.WHOLE_DEVICE})),),
    )
    for engine in (Engine(), Engine()):
        plan = engine.schedule(snap, request)
        assert isinstance(plan, Plan)
        # The free GPU, never the one held by the key it understands.
        assert plan.slots == (SlotKey("iommu-group:2"),)
