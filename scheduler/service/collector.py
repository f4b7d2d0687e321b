"""How the scheduler process runs Python's cyclic garbage collector.

A replica holds the cluster in memory (millions of objects at 10,000 hosts)
and makes short-lived ones at a high rate as it places. With the
interpreter's defaults (a young collection every 700 net allocations of
container objects, a full one every 100 young ones) the collector took a
tenth of the process's time under load, and each full pass scanned every
long-lived object made since the cluster model last froze the heap (see
:meth:`scheduler.service.cluster_model.LiveCluster`): 90 ms pauses every
couple of seconds at 1,000 hosts. Nearly everything placing makes is freed by
reference counting at once, so the collector can run far less often.
"""

from __future__ import annotations

import gc

#: Net allocations of container objects between collections of the youngest
#: generation (the interpreter's default is 700).
YOUNG = 10_000

#: Young collections between collections of the middle generation (default 10).
MIDDLE = 10

#: Middle collections between full collections (default 10): full passes are
#: the long pauses.
OLD = 100


def tune() -> None:
    """Set the collector's thresholds for a scheduler replica (once, at start)."""
    gc.set_threshold(YOUNG, MIDDLE, OLD)
