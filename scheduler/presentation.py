"""How placements read to people: the words the CLI's tables and the dashboard share."""

from __future__ import annotations

from tessera.v1 import placement_pb2


def describe_slot(a: placement_pb2.ClaimAllocation) -> str:
    """One allocation's slot in a few words: device, VF, mdev or MIG instance."""
    kind = a.WhichOneof("slot")
    if kind == "vf":
        where = a.vf.vf_address or "(to be created)"
        return f"VF {a.vf.vf_index} of {a.vf.pf_address} {where} on {a.vf.vfio_driver}"
    if kind == "mdev":
        return f"mdev {a.mdev.type_id} on {a.mdev.parent_address} {a.mdev.uuid}"
    if kind == "mig":
        m = a.mig
        return f"MIG {m.profile_name}@{m.placement.start}+{m.placement.size} on {m.gpu_address}"
    endpoints = ",".join(a.whole_device.group_endpoints)
    return f"{a.whole_device.address} (group: {endpoints})"


def state_name(placement: placement_pb2.Placement) -> str:
    """A placement's lifecycle state as the store spells it (``ready``, ``failed``)."""
    return state_label(placement.state)


def state_label(state: placement_pb2.PlacementState.ValueType) -> str:
    """A lifecycle state as the store spells it (``ready``, ``failed``)."""
    try:
        name = placement_pb2.PlacementState.Name(state)
    except ValueError:
        return f"state {int(state)}"
    return name.removeprefix("PLACEMENT_STATE_").lower()


def form_of(placement: placement_pb2.Placement) -> str:
    """The form a placement's devices are in: whole, vf, mdev, mig, or mixed."""
    forms = {_FORMS_OF_SLOT.get(a.WhichOneof("slot") or "", "") for a in placement.allocations}
    forms.discard("")
    if not forms:
        return ""
    return forms.pop() if len(forms) == 1 else "mixed"


#: The form of each kind of slot a claim can get.
_FORMS_OF_SLOT = {"whole_device": "whole", "vf": "vf", "mdev": "mdev", "mig": "mig"}
