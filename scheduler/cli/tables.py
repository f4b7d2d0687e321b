"""The scheduler's answers as tables for a person: placements, hosts, a drain.

Each builder returns a rich :class:`Table`; ``wide`` adds the columns a person
needs less often (kubectl's ``-o wide``). The ``format_*`` functions render one
to text, for callers that print it themselves (the demo, at 120 columns).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.table import Table

from tessera.scheduler.cli.output import new_table, render_table
from tessera.scheduler.presentation import describe_slot, state_label
from tessera.v1 import placement_pb2, scheduler_pb2

#: The forms of ``HostSummary.used_by_form``, in the order shown.
_FORMS = ("whole", "vf", "mdev", "mig")


def state_word(state: placement_pb2.PlacementState.ValueType) -> str:
    """A placement state as a word; a plan's placements (no state yet) are "planned"."""
    return "planned" if state == placement_pb2.PLACEMENT_STATE_UNSPECIFIED else state_label(state)


def placements_table(
    placements: Sequence[placement_pb2.Placement], *, wide: bool = False
) -> Table | None:
    """One row per allocated unit; None when there is nothing to show.

    The handle a VMM opens (the VFIO group's path, a MIG instance's UUID) is
    long and only wanted to start one: ``wide`` shows it, with the rest.
    """
    headers = ["PLACEMENT", "TENANT", "HOST", "CLAIM", "SLOT", "STATE"]
    if wide:
        headers += ["HANDLE", "GROUP", "NUMA", "REQUEST", "PRIORITY"]
    table = new_table(headers, wrap={"SLOT", "HANDLE"})
    for p in placements:
        for a in p.allocations:
            row = [
                p.placement_id,
                p.tenant,
                p.host_id,
                a.claim,
                describe_slot(a),
                state_word(p.state),
            ]
            if wide:
                row += [
                    a.vfio_path or a.mig.mig_uuid or "-",
                    str(a.iommu_group) if a.vfio_path else "-",
                    str(a.numa_node),
                    p.request_id,
                    str(p.priority),
                ]
            table.add_row(*row)
    return table if table.row_count else None


def history_table(placement: placement_pb2.Placement) -> Table:
    """Every state a placement went through, oldest first."""
    table = new_table(["WHEN (UTC)", "STATE", "WHY"], wrap={"WHY"})
    for change in placement.history:
        when = _utc(change.unix_ms)
        table.add_row(when, state_word(change.state), change.message or "-")
    return table


def _utc(unix_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix_ms / 1000))


def hosts_table(hosts: Sequence[scheduler_pb2.HostSummary], *, wide: bool = False) -> Table:
    """One row per registered host."""
    headers = ["HOST", "SCHEDULABLE", "CORDONED", "GROUPS USED", "USED", "HEARTBEAT"]
    if wide:
        headers += ["AGENT", "LABELS", "MIG FREE"]
    table = new_table(headers, wrap={"SCHEDULABLE", "CORDONED", "LABELS", "MIG FREE"})
    for h in hosts:
        row = [
            h.host_id,
            schedulable(h),
            f"{h.cordon_reason or 'yes'} ({h.cordoned_by})" if h.cordoned else "-",
            f"{h.allocated_groups}/{h.assignable_groups}",
            _used(h),
            f"{h.heartbeat_age_ms / 1000:.1f}s",
        ]
        if wide:
            row += [
                h.agent_address,
                ",".join(f"{k}={v}" for k, v in sorted(h.labels.items())) or "-",
                " ".join(_mig_free(m) for m in h.mig) or "-",
            ]
        table.add_row(*row)
    return table


def drain_table(response: scheduler_pb2.DrainHostResponse) -> Table | None:
    """What a drain did: one row per placement, released or still there and why."""
    table = new_table(["PLACEMENT", "TENANT", "OUTCOME", "DETAIL"], wrap={"DETAIL"})
    for p in response.released:
        table.add_row(p.placement_id, p.tenant, "released", p.message or "-")
    for f in response.failed:
        table.add_row(f.placement_id, "", "NOT released", f.reason)
    return table if table.row_count else None


def drain_summary(response: scheduler_pb2.DrainHostResponse) -> str:
    """A drain in one line."""
    return (
        f"drained {response.host.host_id}: {len(response.released)} released, "
        f"{len(response.failed)} not released"
        + ("; drain again once they settle" if response.failed else "")
    )


def format_placements(
    placements: Sequence[placement_pb2.Placement], *, wide: bool = False, width: int | None = None
) -> str:
    """:func:`placements_table` as text, or ``(no placements)``."""
    table = placements_table(placements, wide=wide)
    return render_table(table, width) if table is not None else "(no placements)"


def format_hosts(
    hosts: Sequence[scheduler_pb2.HostSummary], *, wide: bool = False, width: int | None = None
) -> str:
    """:func:`hosts_table` as text."""
    return render_table(hosts_table(hosts, wide=wide), width)


def _used(h: scheduler_pb2.HostSummary) -> str:
    """What a host has in use, by form (``whole 1, vf 3``), or "-"."""
    forms = [f for f in _FORMS if f in h.used_by_form]
    forms += sorted(f for f in h.used_by_form if f not in _FORMS)
    held = [f"{f} {h.used_by_form[f]}" for f in forms if h.used_by_form[f]]
    return ", ".join(held) or "-"


def _age(ms: int) -> str:
    """A duration for a person: ``42s``, ``17m``, ``3h``, ``5d``."""
    seconds = max(0, ms) // 1000
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def schedulable(h: scheduler_pb2.HostSummary) -> str:
    """Whether new placements may land on a host, and if not, why.

    The store keeps no time of a lease's expiry: how long the host has been
    silent is its last heartbeat's age.
    """
    if h.schedulable:
        return "yes"
    why = ["cordoned"] if h.cordoned else []
    if h.lease_expired or not h.cordoned:
        why.append(f"lease expired, no heartbeat for {_age(h.heartbeat_age_ms)}")
    return f"NO ({'; '.join(why)})"


def _mig_free(m: scheduler_pb2.MigCapacity) -> str:
    """What a MIG GPU can still take, largest profiles first, and its fragmentation."""
    if not m.free:
        # Handed over whole, in VF or mdev use, or its instances overlap.
        return f"{m.gpu_address}: none (taken whole, by VFs or mdevs, or unusable)"
    # The media-extension variants (+me) mirror their base profile: left out.
    free = sorted(
        ((name, n) for name, n in m.free.items() if "+" not in name and n),
        key=lambda item: (-int(item[0].split("g", 1)[0]), item[0]),
    )
    if not free:
        return f"{m.gpu_address}: full"
    counts = " ".join(f"{name}={n}" for name, n in free)
    return f"{m.gpu_address}: {counts} (fragmentation {m.fragmentation:.2f})"
