"""Make the benchmark package ``bench`` importable: it lives at the repository root, uninstalled.

pytest runs with ``--import-mode=importlib``, which leaves ``sys.path`` alone,
and ``pip install -e`` installs only ``scheduler``, ``agent`` and ``tessera``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
