"""Wire <-> domain conversion."""

from __future__ import annotations

import pytest

from tessera.scheduler.core.host import PciRole
from tessera.scheduler.core.request import DeviceForm, DeviceKind, Isolation, NumaPolicy
from tessera.scheduler.core.validation import InvalidRequestError
from tessera.scheduler.service.convert import (
    host_view_from_inventory,
    request_digest,
    request_from_proto,
)
from tessera.v1 import inventory_pb2, placement_pb2


def test_defaults_mean_whole_device_exclusive_no_numa_policy() -> None:
    msg = placement_pb2.PlacementRequest(
        request_id="r",
        tenant="t",
        claims=[placement_pb2.Claim(name="g", kind=placement_pb2.DEVICE_KIND_GPU, count=1)],
    )
    req = request_from_proto(msg)
    (claim,) = req.claims
    assert claim.kind is DeviceKind.GPU
    assert claim.forms == {DeviceForm.WHOLE_DEVICE}
    assert claim.min_isolation is Isolation.EXCLUSIVE
    assert req.numa_policy is NumaPolicy.NONE


def test_an_unspecified_kind_is_an_invalid_argument_naming_the_field() -> None:
    msg = placement_pb2.PlacementRequest(
        request_id="r", tenant="t", claims=[placement_pb2.Claim(name="g", count=1)]
    )
    with pytest.raises(InvalidRequestError) as err:
        request_from_proto(msg)
    assert [v.field for v in err.value.violations] == ["claims[0].kind"]


def test_the_digest_ignores_map_order_but_not_content() -> None:
    a = placement_pb2.PlacementRequest(request_id="r", tenant="t")
    a.host_selector["x"] = "1"
    a.host_selector["y"] = "2"
    b = placement_pb2.PlacementRequest(request_id="r", tenant="t")
    b.host_selector["y"] = "2"
    b.host_selector["x"] = "1"
    assert request_digest(a) == request_digest(b)
    b.tenant = "u"
    assert request_digest(a) != request_digest(b)


def test_an_inventory_becomes_a_host_view_with_groups_and_models() -> None:
    inv = inventory_pb2.HostInventory(
        host_id="h",
        boot_id="b",
        iommu_present=True,
        pci_functions=[
            inventory_pb2.PciFunction(
                address="0000:00:01.0", class_code=0x060400, role=inventory_pb2.PCI_ROLE_ROOT_PORT,
                iommu_group=1, has_iommu_group=True,
            ),
            inventory_pb2.PciFunction(
                address="0000:01:00.0", vendor_id=0x10DE, class_code=0x030000, numa_node=0,
                iommu_group=1, has_iommu_group=True, bridge_chain=["0000:00:01.0"],
                role=inventory_pb2.PCI_ROLE_ENDPOINT,
            ),
            inventory_pb2.PciFunction(
                address="0000:01:00.1", class_code=0x040300, iommu_group=1, has_iommu_group=True,
                role=inventory_pb2.PCI_ROLE_ENDPOINT,
            ),
        ],
        iommu_groups=[
            inventory_pb2.IommuGroup(
                number=1, members=["0000:00:01.0", "0000:01:00.0", "0000:01:00.1"]
            )
        ],
        gpus=[inventory_pb2.Gpu(address="0000:01:00.0", model="NVIDIA RTX A6000")],
    )  # fmt: skip
    view = host_view_from_inventory(inv)
    gpu = view.functions["0000:01:00.0"]  # type: ignore[index]
    assert gpu.kind is DeviceKind.GPU and gpu.model == "NVIDIA RTX A6000"
    assert view.functions["0000:00:01.0"].role is PciRole.ROOT_PORT  # type: ignore[index]
    assert view.group_endpoints(1) == ("0000:01:00.0", "0000:01:00.1")  # type: ignore[arg-type]
