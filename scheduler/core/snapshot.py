"""An immutable view of the cluster: what the scheduler decides against."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass, field
from typing import Protocol

from tessera.scheduler.core import guards
from tessera.scheduler.core.host import HostView
from tessera.scheduler.core.identity import HostId, PlacementId, SlotKey, TenantName


@dataclass(frozen=True)
class HostState:
    """A host and what is allocated on it, at one allocation generation.

    Attributes:
        view: the host's last accepted inventory.
        alloc_generation: bumped by every commit on the host; a plan made
            against one generation commits only if it is still current. Two
            states of a host with the same view and generation hold the same
            allocations: the engine's memos rely on it.
        allocations: slot -> the placement owning it.
        schedulable: False when the host's lease expired or it is cordoned.
        cordoned: an operator took the host out of scheduling (so an
            unschedulable host is reported as cordoned, not as silent).
        tenants: the tenant of each placement holding a slot here; what
            exclusivity domains and interference are judged by.
        planned: empty for a state read from the store; for a state that
            only exists in a plan (reservations not committed, see
            :func:`with_reservation`), the placements assumed, in order. The
            store may later reach the same generation with other contents,
            so memos key on this too.
        versions: version of each guard key (:mod:`scheduler.core.guards`:
            the host's epoch, its devices, its tenants and exclusive holds)
            as the store held them; a plan's commit checks the versions of
            the keys it depends on instead of the whole host's generation.
    """

    view: HostView
    alloc_generation: int
    allocations: Mapping[SlotKey, PlacementId] = field(default_factory=dict)
    schedulable: bool = True
    cordoned: bool = False
    tenants: Mapping[PlacementId, TenantName] = field(default_factory=dict)
    planned: tuple[PlacementId, ...] = ()
    versions: Mapping[str, int] = field(default_factory=dict)


class HostChanges(Protocol):
    """A live cluster model's record of which hosts changed, by revision.

    A snapshot taken from a model that lives across requests names the model
    and the revision it was taken at, so an engine that indexed an earlier
    snapshot of the same model can bring its indexes up to date by visiting
    only the hosts that changed since, instead of every host.
    """

    def changed_since(self, revision: int) -> Set[HostId] | None:
        """Hosts added, changed or removed after ``revision``.

        Args:
            revision: a revision of this model an earlier snapshot carried.

        Returns:
            The host ids, or None when the model no longer remembers that far
            back (or was rebuilt since): the caller must compare every host.
        """
        ...


@dataclass(frozen=True, eq=False)
class Derivation:
    """Where a derived snapshot came from: its parent's hosts, and the hosts it changed.

    Attributes:
        parent: the parent snapshot's ``hosts`` mapping. A plain mapping
            refers to no snapshot, so a chain of derived snapshots (a batch
            plans thousands in a row) keeps one generation back alive, not
            every ancestor.
        changed: the hosts whose state differs from the parent's.
    """

    parent: Mapping[HostId, HostState]
    changed: tuple[HostId, ...]


@dataclass(frozen=True)
class ClusterSnapshot:
    """Every host's state, read at one moment.

    Attributes:
        hosts: host id -> state.
        revision: the live model's revision this snapshot was taken at (0:
            not taken from a live model).
        changes: the live model it was taken from, or None (a snapshot read
            whole, or derived by :func:`with_reservation`). Results never
            depend on it: it only lets memos skip hosts that did not change.
        derived: for a snapshot derived from another (:func:`with_reservation`,
            :func:`with_release`), what it changed; like ``changes``, only a
            hint for memos.
    """

    hosts: Mapping[HostId, HostState]
    revision: int = 0
    changes: HostChanges | None = field(default=None, compare=False, repr=False)
    derived: Derivation | None = field(default=None, compare=False, repr=False)


#: A derived snapshot keeps its parent's plain host map and the states it
#: replaced, until they are this share of the hosts (then one plain copy).
_OVERLAY_SHARE = 8


class _Overlay(Mapping[HostId, HostState]):
    """A plain host map with some hosts' states replaced, the rest not copied.

    What derived snapshots hold: a batch plans thousands of reservations in
    a row, and copying a 10,000-host map for each cost more than planning.
    Only states of hosts the map has are ever replaced, so its keys, their
    order and its length are the base map's.
    """

    __slots__ = ("_base", "_changed")

    def __init__(self, base: dict[HostId, HostState], changed: dict[HostId, HostState]) -> None:
        self._base = base
        self._changed = changed

    def __getitem__(self, host_id: HostId) -> HostState:
        found = self._changed.get(host_id)
        return self._base[host_id] if found is None else found

    def __contains__(self, host_id: object) -> bool:
        return host_id in self._base

    def __iter__(self) -> Iterator[HostId]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


def _derived(snapshot: ClusterSnapshot, host_id: HostId, updated: HostState) -> ClusterSnapshot:
    """``snapshot`` with one host's state replaced, saying so.

    The parent's map is not copied while few hosts changed: only a plain
    dict (a snapshot's own) is shared, never a live model's view that
    changes under it.
    """
    hosts = snapshot.hosts
    mapping: Mapping[HostId, HostState]
    if isinstance(hosts, _Overlay):
        base, changed = hosts._base, {**hosts._changed, host_id: updated}
    elif type(hosts) is dict:
        base, changed = hosts, {host_id: updated}
    else:
        base, changed = dict(hosts), {host_id: updated}
    if len(changed) * _OVERLAY_SHARE > len(base):
        mapping = {**base, **changed}
    else:
        mapping = _Overlay(base, changed)
    return ClusterSnapshot(hosts=mapping, derived=Derivation(hosts, (host_id,)))


def with_reservation(
    snapshot: ClusterSnapshot,
    host_id: HostId,
    slots: tuple[SlotKey, ...],
    placement_id: PlacementId,
    tenant: TenantName,
) -> ClusterSnapshot:
    """The snapshot after a reservation commits, as the store would record it.

    The host's allocation generation and the versions of what the slots
    touch move on, exactly as the commit script bumps them; used to plan
    several requests in a row without a store.
    """
    updated = reserved(snapshot.hosts[host_id], slots, placement_id, tenant)
    return _derived(snapshot, host_id, updated)


def reserved(
    state: HostState, slots: tuple[SlotKey, ...], placement_id: PlacementId, tenant: TenantName
) -> HostState:
    """A host's state after a reservation commits on it (see :func:`with_reservation`).

    For a caller that follows a few hosts through many reservations and
    needs no whole snapshot of each step.
    """
    allocations = dict(state.allocations)
    for slot in slots:
        allocations[slot] = placement_id
    return HostState(
        view=state.view,
        alloc_generation=state.alloc_generation + 1,
        allocations=allocations,
        schedulable=state.schedulable,
        cordoned=state.cordoned,
        tenants={**state.tenants, placement_id: tenant},
        planned=(*state.planned, placement_id),
        versions=guards.bumped(
            state.versions,
            guards.changed_by(state.view, slots),
            new_tenant=tenant not in state.tenants.values(),
        ),
    )


def with_release(
    snapshot: ClusterSnapshot, host_id: HostId, placement_id: PlacementId
) -> ClusterSnapshot:
    """The snapshot after a placement is released, as the store would record it.

    Every slot the placement owns and its tenant entry go; the allocation
    generation moves on, as it does on every commit. ``planned`` records the
    release (``released:<id>``) rather than forgetting the placement, so a
    state that only exists in a plan never looks like one read from the
    store at the same generation (the engine's memos key on both).

    Raises:
        KeyError: ``placement_id`` holds nothing on the host.
    """
    state = snapshot.hosts[host_id]
    if placement_id not in state.tenants and placement_id not in state.allocations.values():
        raise KeyError(f"placement {placement_id!r} holds nothing on host {host_id!r}")
    held = [s for s, p in state.allocations.items() if p == placement_id]
    updated = HostState(
        view=state.view,
        alloc_generation=state.alloc_generation + 1,
        allocations={s: p for s, p in state.allocations.items() if p != placement_id},
        schedulable=state.schedulable,
        cordoned=state.cordoned,
        tenants={p: t for p, t in state.tenants.items() if p != placement_id},
        planned=(*state.planned, PlacementId(f"released:{placement_id}")),
        versions=guards.bumped(state.versions, guards.changed_by(state.view, held)),
    )
    return _derived(snapshot, host_id, updated)
