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
  and its **incarnation**: a host forgotten and registered again (or a store
  that lost its data) starts a new one, so versions counted anew from zero
  never match a plan made on the old host;
* **exclusive holds** on the host (a tenant holding a domain keeps others
  out of devices the plan did not touch);
* for a plan that holds a domain exclusively, **every device of the domain**
  (another tenant arriving on any of them, even one already on the host,
  breaks the hold) and **which tenants** the host has.

A VF's use, and the use of an mdev whose parent is a VF, count on its PF's
device: the PF's VF pool and the VF's own function are one physical device.

The store keeps one counter per such key beside the host
(:mod:`scheduler.store.schema`); the commit checks the plan's guards and bumps
what it changes, and a release bumps the same. Pure: names only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tessera.scheduler.core.host import HostView, domain_instance
from tessera.scheduler.core.identity import PciAddress, SlotKey
from tessera.scheduler.core.slots import (
    ExclusiveSlot,
    GroupSlot,
    HostShareSlot,
    MdevSlot,
    MigSlot,
    VfSlot,
    parse_slot,
)

EPOCH = "epoch"
"""Bumped by the store when the host's inventory or boot changes, when it is
cordoned and when its lease expires."""

TENANTS = "tenants"
"""Bumped by a commit that brings a tenant new to the host."""

EXCLUSIVE = "exclusive"
"""Bumped by a commit or release of a placement holding a domain exclusively."""

INCARNATION = "incarnation"
"""Set once, when the store creates the host's record (server time in µs)."""

HOST_SHARE = "host-share"
"""Bumped by a commit or release of a placement holding host CPU or memory:
a plan that takes some checks nobody took or gave back any since it looked."""


def _function_keys(view: HostView, address: PciAddress) -> set[str]:
    """The version keys of one function: its IOMMU group's, and its PF's for a VF."""
    function = view.functions.get(address)
    if function is None:
        return {f"device:{address}"}
    group = function.iommu_group
    keys = {f"device:{address}" if group is None else f"group:{group}"}
    if function.physfn is not None:
        keys |= _function_keys(view, function.physfn)
    return keys


def device_keys(view: HostView, slot: SlotKey) -> set[str]:
    """The version keys of the physical device(s) a slot is on (empty: an exclusive hold).

    Args:
        view: the host the slot is on.
        slot: a slot key (:mod:`scheduler.core.slots`).

    Returns:
        ``group:<N>`` of each IOMMU group involved (for a VF, or an mdev on a
        VF, its PF's too; for a whole group holding VFs, their PFs' too),
        ``device:<address>`` for a device the view does not know,
        :data:`HOST_SHARE` for host CPU and memory.
    """
    parsed = parse_slot(slot)
    if parsed is None:
        # An unknown kind of slot: its own key, so it is guarded at all.
        return {f"slot:{slot}"}
    if isinstance(parsed, ExclusiveSlot):
        return set()
    if isinstance(parsed, HostShareSlot):
        return {HOST_SHARE}
    if isinstance(parsed, GroupSlot):
        keys = {f"group:{parsed.group}"}
        group = view.iommu_groups.get(parsed.group)
        for member in group.members if group is not None else ():
            keys |= _function_keys(view, member)
        return keys
    if isinstance(parsed, VfSlot):
        return _function_keys(view, parsed.pf)
    if isinstance(parsed, MdevSlot):
        return _function_keys(view, parsed.parent)
    assert isinstance(parsed, MigSlot)
    return _function_keys(view, parsed.gpu)


def domain_keys(view: HostView, slot: SlotKey) -> set[str]:
    """For an exclusive hold, the version keys of every device in the domain it holds.

    Any commit of another tenant in the domain takes a slot on one of them
    and so bumps its key: the hold's commit then conflicts.
    """
    parsed = parse_slot(slot)
    if not isinstance(parsed, ExclusiveSlot):
        return set()
    keys: set[str] = set()
    for function in view.functions.values():
        if domain_instance(view, function, parsed.domain) == parsed.instance:
            keys |= _function_keys(view, function.address)
    return keys


def changed_by(view: HostView, slots: Iterable[SlotKey]) -> tuple[str, ...]:
    """The keys a commit (and later the release) of these slots bumps, sorted.

    The devices' keys, and :data:`EXCLUSIVE` when a slot is an exclusive hold
    (:data:`TENANTS` is the store's to judge: it knows the host's tenants).
    """
    keys: set[str] = set()
    for slot in slots:
        found = device_keys(view, slot)
        keys |= found if found else {EXCLUSIVE}
    return tuple(sorted(keys))


def guards(view: HostView, slots: Iterable[SlotKey], *, exclusive: bool) -> tuple[str, ...]:
    """The keys whose versions a plan's commit must find as the plan saw them, sorted.

    Args:
        view: the host.
        slots: the slots the plan takes.
        exclusive: the request holds a domain exclusively (its validity then
            depends on which tenants the host has).
    """
    slots = tuple(slots)
    keys = {EPOCH, INCARNATION, EXCLUSIVE, *changed_by(view, slots)}
    if exclusive:
        keys.add(TENANTS)
        for slot in slots:
            keys |= domain_keys(view, slot)
    return tuple(sorted(keys))


def expected(
    view: HostView,
    versions: Mapping[str, int],
    slots: Iterable[SlotKey],
    *,
    exclusive: bool,
) -> dict[str, int]:
    """What a plan's commit must find: each of its :func:`guards` at the version the plan saw.

    Args:
        view: the host.
        versions: the guard versions of the state the plan was made on.
        slots: the slots the plan takes.
        exclusive: the request holds a domain exclusively.
    """
    return {key: versions.get(key, 0) for key in guards(view, slots, exclusive=exclusive)}


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
