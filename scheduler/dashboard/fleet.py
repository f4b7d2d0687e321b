"""The fleet as the dashboard shows it: a tile per host, filters, pages and totals.

A tile says how much of a host is allocated and in which forms (whole
devices, VFs, mdevs, MIG instances), its lease state and who holds
something there. Tiles are derived from the scheduler's model of each host
alone (its :class:`HostState`), so the caller keeps one per host state and
redraws only the hosts that changed: at 10,000 hosts a page is filtered and
cut from tiles already made.

Pure: no store, no network, no web framework.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tessera.scheduler.core.host_usage import DeviceUse, HostUsage
from tessera.scheduler.core.snapshot import HostState

#: The forms a device is handed out in, in the order tiles list them.
FORMS = ("whole", "vf", "mdev", "mig")

#: Hosts on one page of the fleet view.
PAGE_SIZE = 200

#: A filter's longest accepted value: longer ones are refused, not cut.
MAX_FILTER = 256


@dataclass(frozen=True)
class HostTile:
    """One host in the fleet view.

    Attributes:
        host_id: the host.
        lease: ``live``, ``expired`` (its lease ran out: no new placements)
            or ``cordoned`` (an operator took it out).
        labels: the operator's labels.
        models: the models of the devices it offers, most common first.
        devices: devices offered to tenants.
        used: of those, devices in use in any form or by the host.
        by_form: units held per form (``whole``, ``vf``, ``mdev``, ``mig``).
        form: the form most of its used devices are in ("" when none).
        tenants: tenants holding something here.
        gpus: its GPUs.
        gpu_free: the GPU capacity still free, in GPUs.
    """

    host_id: str
    lease: str
    labels: Mapping[str, str]
    models: tuple[str, ...]
    devices: int
    used: int
    by_form: Mapping[str, int]
    form: str
    tenants: tuple[str, ...]
    gpus: int
    gpu_free: float

    @property
    def allocated(self) -> float:
        """The share of its devices in use, 0 to 1."""
        return self.used / self.devices if self.devices else 0.0

    @property
    def band(self) -> int:
        """The allocation band the tile is coloured by: 0 (idle) to 4 (full)."""
        if not self.used:
            return 0
        return min(4, 1 + int(self.allocated * 4))


def lease_of(state: HostState) -> str:
    """A host's lease state as the fleet view names it."""
    if state.cordoned:
        return "cordoned"
    return "live" if state.schedulable else "expired"


def tile_of(state: HostState, usage: HostUsage) -> HostTile:
    """The tile of one host state."""
    models: Counter[str] = Counter()
    forms: Counter[str] = Counter()
    used = 0
    for device in usage.devices.values():
        models[device.model or device.kind] += 1
        if device.use is not DeviceUse.FREE:
            used += 1
            if device.use.value in FORMS:
                forms[device.use.value] += 1
    return HostTile(
        host_id=state.view.host_id,
        lease=lease_of(state),
        labels=dict(state.view.labels),
        models=tuple(m for m, _ in models.most_common()),
        devices=len(usage.devices),
        used=used,
        by_form={form: usage.by_form.get(form, 0) for form in FORMS},
        form=forms.most_common(1)[0][0] if forms else "",
        tenants=tuple(sorted(usage.tenants)),
        gpus=usage.gpus,
        gpu_free=usage.gpu_free_share,
    )


@dataclass(frozen=True)
class FleetFilter:
    """What the operator narrowed the fleet to; empty fields match every host.

    Attributes:
        search: part of the host id.
        label: ``key=value`` (or a bare ``key``: any value).
        model: part of a device model, case-insensitive.
        tenant: a tenant holding something on the host.
        lease: ``live``, ``expired`` or ``cordoned``.
    """

    search: str = ""
    label: str = ""
    model: str = ""
    tenant: str = ""
    lease: str = ""

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> FleetFilter:
        """The filter in a page's query string.

        Raises:
            ValueError: a value is too long or ``lease`` is not a lease state;
                the message names the field.
        """
        values = {}
        for name in ("search", "label", "model", "tenant", "lease"):
            value = query.get(name, "").strip()
            if len(value) > MAX_FILTER:
                raise ValueError(f"{name}: at most {MAX_FILTER} characters")
            values[name] = value
        if values["lease"] not in ("", "live", "expired", "cordoned"):
            raise ValueError("lease: one of live, expired, cordoned")
        return cls(**values)

    def matches(self, tile: HostTile) -> bool:
        """Whether a host passes every part of the filter."""
        if self.search and self.search not in tile.host_id:
            return False
        if self.lease and tile.lease != self.lease:
            return False
        if self.tenant and self.tenant not in tile.tenants:
            return False
        if self.model:
            wanted = self.model.lower()
            if not any(wanted in m.lower() for m in tile.models):
                return False
        if self.label:
            key, sep, value = self.label.partition("=")
            if key not in tile.labels or (sep and tile.labels[key] != value):
                return False
        return True


@dataclass(frozen=True)
class FleetTotals:
    """Figures for the whole fleet (or the hosts a filter kept).

    Attributes:
        hosts: hosts counted.
        leases: hosts per lease state.
        devices: devices offered to tenants.
        used: of those, in use.
        by_form: units held per form.
        gpus: GPUs.
        gpu_free: free GPU capacity, in GPUs.
        gpu_stranded: the part of it on GPUs partly in use (slices or
            vGPUs left beside others): what only small requests can take.
        tenants: tenants holding something.
    """

    hosts: int
    leases: Mapping[str, int]
    devices: int
    used: int
    by_form: Mapping[str, int]
    gpus: int
    gpu_free: float
    gpu_stranded: float
    tenants: int

    @property
    def allocated(self) -> float:
        """The share of devices in use, 0 to 1."""
        return self.used / self.devices if self.devices else 0.0

    @property
    def stranded_share(self) -> float:
        """The share of free GPU capacity stranded on partly used GPUs, 0 to 1."""
        return self.gpu_stranded / self.gpu_free if self.gpu_free else 0.0


def totals(tiles: Iterable[HostTile], stranded: Mapping[str, float]) -> FleetTotals:
    """Figures over tiles.

    Args:
        tiles: the hosts.
        stranded: per host, its free GPU capacity on partly used GPUs
            (:func:`stranded_gpu_share`).
    """
    leases: Counter[str] = Counter()
    forms: Counter[str] = Counter()
    tenants: set[str] = set()
    hosts = devices = used = gpus = 0
    free = stranded_total = 0.0
    for tile in tiles:
        hosts += 1
        leases[tile.lease] += 1
        devices += tile.devices
        used += tile.used
        forms.update(tile.by_form)
        gpus += tile.gpus
        free += tile.gpu_free
        stranded_total += stranded.get(tile.host_id, 0.0)
        tenants.update(tile.tenants)
    return FleetTotals(
        hosts=hosts,
        leases={lease: leases.get(lease, 0) for lease in ("live", "expired", "cordoned")},
        devices=devices,
        used=used,
        by_form={form: forms.get(form, 0) for form in FORMS},
        gpus=gpus,
        gpu_free=free,
        gpu_stranded=stranded_total,
        tenants=len(tenants),
    )


def stranded_gpu_share(free_shares: Iterable[float]) -> float:
    """Free capacity on GPUs neither idle nor full, in GPUs."""
    return sum(share for share in free_shares if 0.0 < share < 1.0)


@dataclass(frozen=True)
class FleetPage:
    """One page of tiles, and where it sits among the hosts the filter kept."""

    tiles: Sequence[HostTile]
    page: int
    pages: int
    matched: int


def page_of(tiles: Sequence[HostTile], page: int, size: int = PAGE_SIZE) -> FleetPage:
    """Page ``page`` (from 1) of ``tiles``, clamped to the pages there are."""
    pages = max(1, -(-len(tiles) // size))
    page = min(max(1, page), pages)
    return FleetPage(tiles[(page - 1) * size : page * size], page, pages, len(tiles))
