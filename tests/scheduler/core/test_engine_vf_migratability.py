"""Which VFs a migratable claim may take: existing VFs by their own word, future ones by their PF's.

The mixed host (see ``checker_topologies``) has two ConnectX-6 Dx PFs:
PF_EMPTY with no VFs enabled, and PF_ENABLED with VF 0 and VF 1, both
reported migratable through mlx5_vfio_pci. Each test changes only what the
agent would report about migration and reads the plan the engine makes.
"""

from __future__ import annotations

from dataclasses import replace

from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.engine.plugins import VFIO_PCI, free_vfs
from tessera.scheduler.core.host import HostView
from tessera.scheduler.core.identity import PlacementId, RequestId, SlotKey, TenantName
from tessera.scheduler.core.occupancy import build_occupancy
from tessera.scheduler.core.plan import Plan, Unschedulable, VfAssignment
from tessera.scheduler.core.request import (
    Claim,
    DeviceForm,
    DeviceKind,
    Isolation,
    PlacementRequest,
)
from tessera.scheduler.core.slots import vf_slot
from tessera.scheduler.core.snapshot import ClusterSnapshot, HostState

from .checker_topologies import PF_EMPTY, PF_ENABLED, VF_0, VF_1, VF_MIGRATION_DRIVER, mixed


def nic_vf(*, migratable: bool = True) -> PlacementRequest:
    claim = Claim(
        "nic", DeviceKind.NIC, 1, frozenset({DeviceForm.VF}),
        min_isolation=Isolation.SHARED, migratable=migratable,
    )  # fmt: skip
    return PlacementRequest(RequestId("r"), TenantName("t"), (claim,))


def schedule(
    view: HostView, request: PlacementRequest, held: tuple[SlotKey, ...] = ()
) -> Plan | Unschedulable:
    """The engine's answer on ``view`` alone, with the ``held`` slots another tenant's."""
    state = HostState(
        view, 0,
        allocations={s: PlacementId("other") for s in held},
        tenants={PlacementId("other"): TenantName("other")},
    )  # fmt: skip
    return Engine().schedule(ClusterSnapshot(hosts={view.host_id: state}), request)


def the_vf(result: Plan | Unschedulable) -> VfAssignment:
    assert isinstance(result, Plan), result
    (a,) = result.assignments
    assert isinstance(a, VfAssignment)
    return a


def pf_reports(view: HostView, **future: str | None) -> HostView:
    """``view`` with each PF named (``PF_EMPTY=...``) reporting this future-VF driver."""
    pfs = dict(view.sriov_pfs)
    for name, driver in future.items():
        address = {"PF_EMPTY": PF_EMPTY, "PF_ENABLED": PF_ENABLED}[name]
        pfs[address] = replace(pfs[address], vf_migration_driver=driver)
    return replace(view, sriov_pfs=pfs)


def live_vfs_not_migratable(view: HostView) -> HostView:
    """PF_ENABLED's VFs as the agent reports VFs with no variant driver for their ids."""
    functions = dict(view.functions)
    for vf in (VF_0, VF_1):
        functions[vf] = replace(functions[vf], migration_driver=None)
    return replace(view, functions=functions)


def test_a_pf_without_vfs_takes_a_migratable_claim_on_the_driver_it_names() -> None:
    view = pf_reports(live_vfs_not_migratable(mixed()), PF_EMPTY=VF_MIGRATION_DRIVER)

    a = the_vf(schedule(view, nic_vf()))

    assert (a.pf_address, a.vf_index, a.vf_address) == (PF_EMPTY, 0, None)
    assert a.vfio_driver == VF_MIGRATION_DRIVER


def test_a_pf_without_vfs_that_names_no_driver_refuses_a_migratable_claim() -> None:
    view = live_vfs_not_migratable(mixed())  # and PF_EMPTY names none

    result = schedule(view, nic_vf())

    assert isinstance(result, Unschedulable)
    assert {(r.plugin, r.reason) for r in result.rejections} == {
        ("migratability", "vf-driver-not-migratable")
    }


def test_existing_vfs_answer_for_themselves_whatever_their_pf_names() -> None:
    # PF_ENABLED names a driver for its VFs, but the VFs it has report none:
    # they are what the claim would get, and they cannot migrate.
    view = pf_reports(live_vfs_not_migratable(mixed()), PF_ENABLED=VF_MIGRATION_DRIVER)

    assert isinstance(schedule(view, nic_vf()), Unschedulable)


def test_existing_migratable_vfs_need_no_word_from_their_pf() -> None:
    a = the_vf(schedule(mixed(), nic_vf()))  # neither PF names a driver

    assert (a.pf_address, a.vfio_driver) == (PF_ENABLED, VF_MIGRATION_DRIVER)


def test_a_claim_that_need_not_migrate_gets_plain_vfio_pci_on_a_vf_not_created_yet() -> None:
    # So that it never depends on the variant module being loaded.
    view = pf_reports(mixed(), PF_EMPTY=VF_MIGRATION_DRIVER)
    occupancy = build_occupancy(HostState(view, 0))

    assert free_vfs(view, occupancy, PF_EMPTY)[1] == VFIO_PCI
    assert free_vfs(view, occupancy, PF_EMPTY, migratable=True)[1] == VF_MIGRATION_DRIVER
    held = (vf_slot(PF_ENABLED, 0), vf_slot(PF_ENABLED, 1))  # PF_EMPTY is what is left
    a = the_vf(schedule(view, nic_vf(migratable=False), held))
    assert (a.pf_address, a.vfio_driver) == (PF_EMPTY, VFIO_PCI)
