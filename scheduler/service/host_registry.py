"""The host registry: agents register their hosts and renew their leases.

A registration records the host's inventory (checked first: see
:mod:`scheduler.service.inventory_check`); a new boot id means the host
rebooted, and every live placement on it becomes FAILED with its slots kept.
Heartbeats renew the lease and carry an inventory only when it changed.
Registrations, and a heartbeat that brings an expired host back, are
said in the log (:mod:`scheduler.service.event_log`) by the call that
wrote them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tessera.scheduler.core.lifecycle import FAILED, move
from tessera.scheduler.core.validation import (
    FieldViolation,
    InvalidRequestError,
    shown,
    validate_address,
    validate_identifier,
)
from tessera.scheduler.service import event_log
from tessera.scheduler.service.inventory_check import check_inventory, inventory_violations
from tessera.scheduler.service.placement_moves import PlacementMoves
from tessera.scheduler.store import schema
from tessera.scheduler.store.redis_store import HeartbeatOutcome, RedisStateStore
from tessera.v1 import inventory_pb2, placement_pb2

# A reboot fails a placement in whichever live state it was (every state the
# table lets move to FAILED).
_FAIL_AFTER_REBOOT = move(to=FAILED)


@dataclass(frozen=True)
class Leases:
    """Heartbeat cadence and how long a silent host stays schedulable."""

    heartbeat_interval_s: int = 5
    lease_s: int = 20


#: The settings a scheduler runs with unless told otherwise.
DEFAULT_LEASES = Leases()


class HostRegistry:
    """Records hosts as their agents report them, and renews their leases.

    Args:
        store: the Redis state store.
        moves: makes lifecycle moves in the store (a reboot's failures).
        leases: heartbeat settings handed to agents.
        clock_ms: current time in ms.
    """

    def __init__(
        self,
        store: RedisStateStore,
        moves: PlacementMoves,
        leases: Leases,
        clock_ms: Callable[[], int],
    ) -> None:
        self._store = store
        self._moves = moves
        self._leases = leases
        self._clock_ms = clock_ms

    @property
    def leases(self) -> Leases:
        """Heartbeat settings handed to agents."""
        return self._leases

    async def fence(self) -> int:
        """The newest fencing token of the background jobs, told to agents (0: none yet)."""
        return await self._store.current_fence(schema.BACKGROUND_JOB)

    async def register(self, inventory: inventory_pb2.HostInventory, agent_address: str) -> bool:
        """Record a host's report; False if it is older than the stored one.

        Raises:
            InvalidRequestError: the inventory is malformed, out of bounds or
                inconsistent (see :mod:`scheduler.service.inventory_check`);
                nothing was read from or written to the store.
        """
        check_inventory(inventory)
        if violations := validate_address(agent_address, "agent_address"):
            raise InvalidRequestError(violations)
        before = await self._store.get_host(inventory.host_id)
        accepted = await self._store.upsert_host(
            inventory.host_id,
            inventory.SerializeToString(),
            inventory_generation=inventory.generation,
            boot_id=inventory.boot_id,
            agent_address=agent_address,
            now_ms=self._clock_ms(),
        )
        if not accepted:
            return False
        event_log.host_registered(
            inventory.host_id,
            agent_address,
            inventory.boot_id,
            before.boot_id if before is not None else None,
        )
        if before is not None and before.boot_id != inventory.boot_id:
            await self._fail_after_reboot(inventory.host_id)
        return True

    async def _fail_after_reboot(self, host_id: str) -> None:
        """Mark every live placement of a rebooted host FAILED, keeping its slots.

        A reboot resets every device and loses what tenants had open; IOMMU
        group numbers may change too. The placements are therefore no longer
        true, but their slots stay quarantined until each is released, so
        nothing is handed out on the strength of a stale group number.
        """
        for _, payload in await self._store.list_placements(host_id):
            placement = placement_pb2.Placement.FromString(payload)
            await self._moves.apply(
                placement,
                _FAIL_AFTER_REBOOT,
                "host rebooted: its devices were reset; release this placement",
            )

    async def heartbeat(
        self, host_id: str, boot_id: str, inventory: inventory_pb2.HostInventory | None
    ) -> bool:
        """Renew a host's lease (and take a changed inventory).

        Returns:
            False when the scheduler does not know this host or boot: the
            agent must register again.

        Raises:
            InvalidRequestError: a malformed host id, or an inventory that
                is not this host's or that Register would refuse; nothing was
                read from or written to the store.
        """
        violations = validate_identifier(host_id, "host_id")
        more = 0
        if inventory is not None:
            found, more = inventory_violations(inventory)
            violations += found
        if inventory is not None and (inventory.host_id, inventory.boot_id) != (host_id, boot_id):
            violations.append(
                FieldViolation(
                    "inventory",
                    f"reports host {shown(inventory.host_id)} boot {shown(inventory.boot_id)}, "
                    f"the heartbeat is for host {shown(host_id)} boot {shown(boot_id)}",
                )
            )
        if violations:
            raise InvalidRequestError(violations, more)
        now = self._clock_ms()
        if inventory is not None:
            record = await self._store.get_host(host_id)
            if record is None or record.boot_id != boot_id:
                return False
            accepted = await self._store.upsert_host(
                host_id,
                inventory.SerializeToString(),
                inventory_generation=inventory.generation,
                boot_id=boot_id,
                agent_address=record.agent_address,
                now_ms=now,
            )
            if accepted and record.lease_expired:
                event_log.host_lease_renewed(host_id)
            return True
        outcome = await self._store.touch_host(host_id, boot_id, now)
        if outcome is HeartbeatOutcome.REVIVED:
            event_log.host_lease_renewed(host_id)
        return outcome is not HeartbeatOutcome.UNKNOWN
