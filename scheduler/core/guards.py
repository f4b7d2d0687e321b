"""What a plan's commit must find unchanged: versions of the devices it touches, not of the host.

A plan is valid against the host state it was made on. Checking one
generation for the whole host made two plans for different GPUs of one host
collide although neither cares about the other's GPU. A plan's validity
depends on:

* the **physical devices** it takes a slot of, each with everything on it:
  the IOMMU group of a whole-device claim, the PF of a VF, the parent of an
  mdev, the GPU of a MIG instance (MIG and mdev slot names overlap nothing
  else, so the version belongs to the physical device, named by its IOMMU
  group: a group is the unit of isolation, so a whole-device claim of it and
  a VF, mdev or MIG slot of a function in it meet on one version);
* the host's **epoch**: its inventory and boot, its cordon and its lease;
* **exclusive holds** on the host (a tenant holding a domain keeps others
  out of devices the plan did not touch);
* for a plan that holds a domain exclusively, **which tenants** the host has:
  another tenant arriving anywhere in the domain breaks it.

The store keeps one counter per such key beside the host
(:mod:`scheduler.store.schema`); the commit checks the plan's guards and bumps
what it changes, and a release bumps the same. Pure: names only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from scheduler.core.host import HostView
from scheduler.core.identity import PciAddress, SlotKey
from scheduler.core.slots import ExclusiveSlot, GroupSlot, MdevSlot, MigSlot, VfSlot, parse_slot

EPOCH = "epoch"
"""Bumped by the store when the host's inventory or boot changes, when it is
cordoned and when its lease expires."""

TENANTS = "tenants"
"""Bumped by a commit that brings a tenant new to the host."""

EXCLUSIVE = "exclusive"
"""Bumped by a commit or release of a placement holding a domain exclusively."""


def device_key(view: HostView, slot: SlotKey) -> str | None:
    """The version key of the physical device a slot is on (None: no device).

    Args:
        view: the host the slot is on.
        slot: a slot key (:mod:`scheduler.core.slots`).

    Returns:
        ``group:<N>`` for a device in IOMMU group N, ``device:<address>`` for
        a device the view does not know, None for an exclusive hold.
    """
    parsed = parse_slot(slot)
    if parsed is None:
        # An unknown kind of slot: its own key, so it is guarded at all.
        return f"slot:{slot}"
    if isinstance(parsed, ExclusiveSlot):
        return None
    if isinstance(parsed, GroupSlot):
        return f"group:{parsed.group}"
    address: PciAddress
    if isinstance(parsed, VfSlot):
        address = parsed.pf
    elif isinstance(parsed, MdevSlot):
        address = parsed.parent
    else:
        assert isinstance(parsed, MigSlot)
        address = parsed.gpu
    function = view.functions.get(address)
    if function is None or function.iommu_group is None:
        return f"device:{address}"
    return f"group:{function.iommu_group}"


def changed_by(view: HostView, slots: Iterable[SlotKey]) -> tuple[str, ...]:
    """The keys a commit (and later the release) of these slots bumps, sorted.

    The devices' keys, and :data:`EXCLUSIVE` when a slot is an exclusive hold
    (:data:`TENANTS` is the store's to judge: it knows the host's tenants).
    """
    keys: set[str] = set()
    for slot in slots:
        key = device_key(view, slot)
        keys.add(EXCLUSIVE if key is None else key)
    return tuple(sorted(keys))


def guards(view: HostView, slots: Iterable[SlotKey], *, exclusive: bool) -> tuple[str, ...]:
    """The keys whose versions a plan's commit must find as the plan saw them, sorted.

    Args:
        view: the host.
        slots: the slots the plan takes.
        exclusive: the request holds a domain exclusively (its validity then
            depends on which tenants the host has).
    """
    keys = {EPOCH, EXCLUSIVE, *changed_by(view, slots)}
    if exclusive:
        keys.add(TENANTS)
    return tuple(sorted(keys))


def bumped(
    versions: Mapping[str, int], keys: Iterable[str], *, new_tenant: bool = False
) -> dict[str, int]:
    """Versions after a commit or release bumps ``keys`` (and TENANTS for a new tenant)."""
    out = dict(versions)
    for key in keys:
        out[key] = out.get(key, 0) + 1
    if new_tenant:
        out[TENANTS] = out.get(TENANTS, 0) + 1
    return out
