"""Turns discovery into versioned HostInventory reports."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from tessera.agent.allowlist import AllowList
from tessera.agent.discovery import discover
from tessera.agent.nvml import NvmlClient
from tessera.agent.report import to_inventory
from tessera.agent.sysfs import Sysfs
from tessera.v1 import inventory_pb2


def read_boot_id(root: Path, host_id: str) -> str:
    """The kernel's boot id, ``/proc/sys/kernel/random/boot_id`` under the root.

    A fake host tree may have no procfs; it then gets an id derived from its
    host name and root, stable for the tree's lifetime.
    """
    try:
        return (root / "proc" / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"tessera-fake-boot:{host_id}:{root}"))


class HostReporter:
    """Discovers the host and numbers each distinct report.

    The generation starts at the wall clock in milliseconds, so a restarted
    agent's first report is newer than anything it sent before, and grows by
    one whenever the discovered host differs from the last report.
    """

    def __init__(
        self,
        sysfs: Sysfs,
        nvml: NvmlClient,
        *,
        host_id: str,
        boot_id: str,
        labels: Mapping[str, str],
        allow: AllowList | None = None,
    ) -> None:
        self._sysfs = sysfs
        self._nvml = nvml
        self.host_id = host_id
        self.boot_id = boot_id
        self._labels = dict(labels)
        self.allow = allow
        self._generation = int(time.time() * 1000)
        self._last: bytes | None = None
        self._lock = threading.Lock()

    def report(self) -> tuple[inventory_pb2.HostInventory, bool]:
        """Discover now.

        Returns:
            The inventory and whether it changed since the previous call.
        """
        report = discover(
            self._sysfs,
            self._nvml,
            host_id=self.host_id,
            boot_id=self.boot_id,
            labels=self._labels,
            allow=self.allow,
        )
        with self._lock:
            inventory = to_inventory(report, generation=0)
            body = inventory.SerializeToString(deterministic=True)
            changed = body != self._last
            if changed and self._last is not None:
                self._generation += 1
            self._last = body
            inventory.generation = self._generation
            return inventory, changed
