"""The placement policies the benchmarks compare (they live in the core, beside the engine).

See :mod:`scheduler.core.engine.policies`: the scheduler service can run each
of them too (``tessera-scheduler --policy NAME``), so end-to-end figures
compare the same way as in-process ones.
"""

from __future__ import annotations

from tessera.scheduler.core.engine.policies import (
    POLICIES,
    BestFitPolicy,
    FirstFitPolicy,
    Policy,
    RandomPolicy,
    TesseraPolicy,
    dra_expressible,
    nodes_to_score,
)

__all__ = [
    "POLICIES",
    "BestFitPolicy",
    "FirstFitPolicy",
    "Policy",
    "RandomPolicy",
    "TesseraPolicy",
    "dra_expressible",
    "nodes_to_score",
]
