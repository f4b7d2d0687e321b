"""NUMA nodes: ``/sys/devices/system/node/`` (``drivers/base/node.c``, HW_FACTS §8)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NewType

from tessera.agent.sysfs import Sysfs

NumaNodeId = NewType("NumaNodeId", int)

_NODE_DIR = re.compile(r"^node(\d+)$")
#: ``Node 0 MemTotal:       263921764 kB``
_MEM_TOTAL = re.compile(r"^Node\s+\d+\s+MemTotal:\s+(\d+)\s+kB\s*$")


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Expand a kernel list (``0-3,8,10-11``) into sorted numbers.

    Raises:
        ValueError: the text is not a kernel list.
    """
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, sep, high = part.partition("-")
        if sep:
            out.update(range(int(low), int(high) + 1))
        else:
            out.add(int(low))
    return tuple(sorted(out))


@dataclass(frozen=True)
class NumaNode:
    """One NUMA node.

    Attributes:
        node_id: N of ``nodeN``.
        cpulist: its CPUs in kernel list form (``0-55,112-167``); empty for a
            memory-only node.
        memory_kib: ``MemTotal`` of ``nodeN/meminfo``; None if not given.
        distances: SLIT distance to every online node, in node order.
    """

    node_id: NumaNodeId
    cpulist: str
    memory_kib: int | None
    distances: tuple[int, ...]

    @property
    def cpus(self) -> tuple[int, ...]:
        """The node's CPUs, expanded."""
        return parse_cpulist(self.cpulist)


def _memory_kib(meminfo: str | None) -> int | None:
    if meminfo is None:
        return None
    for line in meminfo.splitlines():
        match = _MEM_TOTAL.match(line)
        if match:
            return int(match.group(1))
    return None


def _distances(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(d) for d in text.split())
    except ValueError:
        return ()


def probe_numa(sysfs: Sysfs) -> tuple[NumaNode, ...] | None:
    """The online NUMA nodes, in id order; None without a node directory.

    Online nodes come from ``online``; a tree without it falls back to the
    ``nodeN`` directories present.
    """
    root = sysfs.path("devices", "system", "node")
    entries = sysfs.listdir(root)
    if not entries:
        return None
    online = sysfs.read(root / "online")
    ids: tuple[int, ...]
    try:
        ids = parse_cpulist(online) if online else ()
    except ValueError:
        ids = ()
    if not ids:
        ids = tuple(sorted(int(m.group(1)) for e in entries if (m := _NODE_DIR.match(e))))
    nodes = []
    for node_id in ids:
        node = root / f"node{node_id}"
        nodes.append(
            NumaNode(
                node_id=NumaNodeId(node_id),
                cpulist=sysfs.read(node / "cpulist") or "",
                memory_kib=_memory_kib(sysfs.read(node / "meminfo")),
                distances=_distances(sysfs.read(node / "distance")),
            )
        )
    return tuple(nodes)
