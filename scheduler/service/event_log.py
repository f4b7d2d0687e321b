"""The lines an operator follows: one per placement and host lifecycle event.

Each event is said once, by the code that made the change in the store (the
replica whose commit, release or registration landed, or the housekeeping
job's leader), never by the replicas that later read it off the change feed.
All go to the logger ``tessera.scheduler.events`` with structured fields
(see :mod:`tessera.logs`): what the line is about (``placement``,
``request``, ``tenant``, ``host``), the ``state`` it reached, and ``reason``,
``by``, ``form``, ``units`` where they apply.

The states and who says them:

* ``ready`` (INFO): the plan applier once a Place's host carried it out;
  the reconciler once it prepared a lost placement again.
* ``released`` (INFO): the plan applier (a client's Release, a drain, a
  broken gang, a Place undone because the caller went away), the reaper;
  a WARNING when a Place is undone because its host failed to carry it out.
* ``failed`` (WARNING): :class:`~scheduler.service.placement_moves.PlacementMoves`,
  for every move to FAILED (quarantine), whoever asked for it.
* ``registered``, ``re-registered``, ``rebooted`` (INFO): the host registry,
  for a host it did not know, the same boot again, a new boot.
* ``lease-expired`` (INFO): the housekeeper's lease sweep;
  ``lease-renewed`` (INFO): the host registry, when an expired host
  heartbeats again.
* ``cordoned``, ``uncordoned``, ``drained`` (INFO): host administration.
* ``forgotten`` (INFO): host administration, the housekeeper (a dead host);
  a WARNING when placements were dropped with the host.

Values come from validated requests and inventories (ids are at most 256
characters) and are cut again by the formatter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tessera.scheduler.presentation import form_of
from tessera.v1 import placement_pb2

log = logging.getLogger("tessera.scheduler.events")


def _placement(placement: placement_pb2.Placement, state: str) -> dict[str, object]:
    """The structured fields of a placement's line."""
    out: dict[str, object] = {
        name: value
        for name, value in (
            ("placement", placement.placement_id),
            ("request", placement.request_id),
            ("tenant", placement.tenant),
            ("host", placement.host_id),
        )
        if value
    }
    out["state"] = state
    if form := form_of(placement):
        out["form"] = form
    if placement.allocations:
        out["units"] = len(placement.allocations)
    return out


def placement_ready(placement: placement_pb2.Placement, reason: str = "") -> None:
    """A placement is READY: its host carried it out and the tenant may use it.

    Args:
        placement: the placement as confirmed.
        reason: why it became ready other than by a Place (a re-prepare).
    """
    extra = _placement(placement, "ready")
    if reason:
        extra["reason"] = reason
    log.info(
        "placement %s ready on host %s%s",
        placement.placement_id, placement.host_id, f": {reason}" if reason else "",
        extra=extra,
    )  # fmt: skip


def placement_released(placement: placement_pb2.Placement, reason: str = "") -> None:
    """A placement was torn down on its host and its slots are free again.

    Args:
        placement: the placement released.
        reason: why, when not a Release call (the reaper finished it).
    """
    extra = _placement(placement, "released")
    if reason:
        extra["reason"] = reason
    log.info(
        "placement %s released on host %s%s",
        placement.placement_id, placement.host_id, f": {reason}" if reason else "",
        extra=extra,
    )  # fmt: skip


def placement_undone(placement: placement_pb2.Placement, reason: str, *, failed: bool) -> None:
    """A committed placement was undone before it was ready; its slots are free again.

    Args:
        placement: the reservation undone.
        reason: why (the agent's error, the caller went away).
        failed: the host failed to carry it out (a WARNING), rather than the
            caller going away (INFO).
    """
    extra = _placement(placement, "released")
    extra["reason"] = reason
    log.log(
        logging.WARNING if failed else logging.INFO,
        "placement %s undone on host %s before it was ready: %s; its slots are free",
        placement.placement_id, placement.host_id, reason,
        extra=extra,
    )  # fmt: skip


def placement_failed(placement: placement_pb2.Placement, reason: str) -> None:
    """A placement is FAILED: its slots stay held (quarantined) until it is released.

    Args:
        placement: the placement as moved to FAILED.
        reason: why, as the placement reads.
    """
    extra = _placement(placement, "failed")
    extra["reason"] = reason
    log.warning(
        "placement %s failed on host %s: %s",
        placement.placement_id, placement.host_id, reason,
        extra=extra,
    )  # fmt: skip


def host_registered(host_id: str, address: str, boot_id: str, previous_boot: str | None) -> None:
    """An agent registered its host.

    Args:
        host_id: the host.
        address: where its agent listens.
        boot_id: the boot it reported.
        previous_boot: the boot the store had, or None for a host it did not know.
    """
    if previous_boot is None:
        state, how = "registered", "registered"
    elif previous_boot != boot_id:
        state, how = "rebooted", "registered again after a reboot"
    else:
        state, how = "re-registered", "registered again"
    log.info(
        "host %s %s, agent at %s",
        host_id, how, address,
        extra={"host": host_id, "state": state, "address": address, "boot": boot_id},
    )  # fmt: skip


def host_lease_expired(host_id: str, silent_s: float) -> None:
    """A host's lease ran out: no new placements go there until it heartbeats again."""
    log.info(
        "lease of host %s expired: no heartbeat for %.0f s",
        host_id, silent_s,
        extra={"host": host_id, "state": "lease-expired", "silent_s": round(silent_s)},
    )  # fmt: skip


def host_lease_renewed(host_id: str) -> None:
    """A host whose lease had expired heartbeats again: it is schedulable again."""
    log.info(
        "lease of host %s renewed: it heartbeats again",
        host_id,
        extra={"host": host_id, "state": "lease-renewed"},
    )


def host_cordoned(host_id: str, by: str, reason: str) -> None:
    """An operator took a host out of scheduling."""
    log.info(
        "host %s cordoned by %s: %s",
        host_id, by, reason or "(no reason given)",
        extra={"host": host_id, "state": "cordoned", "by": by, "reason": reason},
    )  # fmt: skip


def host_uncordoned(host_id: str, by: str) -> None:
    """An operator let new placements land on a host again."""
    log.info(
        "host %s uncordoned by %s",
        host_id, by,
        extra={"host": host_id, "state": "uncordoned", "by": by},
    )  # fmt: skip


def host_drained(host_id: str, by: str, released: int, left: int) -> None:
    """An operator drained a host (each release has its own line)."""
    log.info(
        "host %s drained by %s: %d released, %d left",
        host_id, by, released, left,
        extra={
            "host": host_id, "state": "drained", "by": by, "released": released, "left": left,
        },
    )  # fmt: skip


def host_forgotten(host_id: str, by: str, reason: str = "", dropped: Sequence[str] = ()) -> None:
    """A host and every key of it left the store.

    Args:
        host_id: the host.
        by: who forgot it (an operator, the housekeeping job).
        reason: why, when the job did.
        dropped: placements dropped with it, not torn down (a forced forget):
            the line is then a WARNING.
    """
    extra: dict[str, object] = {"host": host_id, "state": "forgotten", "by": by}
    if reason:
        extra["reason"] = reason
    if dropped:
        extra["dropped"] = list(dropped)
    log.log(
        logging.WARNING if dropped else logging.INFO,
        "host %s forgotten by %s%s%s",
        host_id, by, f": {reason}" if reason else "",
        f"; dropped placements {', '.join(dropped)}" if dropped else "",
        extra=extra,
    )  # fmt: skip
