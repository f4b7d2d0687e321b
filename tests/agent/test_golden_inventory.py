"""Golden inventories: what `tessera-agent inventory --json` reports for each fixture host.

A change to discovery, to the report or to a fixture shows up here as a diff
of readable JSON. To accept an intended change, regenerate:

    TESSERA_UPDATE_GOLDEN=1 .venv/bin/pytest tests/agent/test_golden_inventory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tessera.agent.testing.hosts import FIXTURES, build

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("TESSERA_UPDATE_GOLDEN") == "1"
#: tmpfs when available: building a tree is bound by file creation.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def inventory_json(fixture: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="tessera-golden-", dir=SCRATCH) as tmp:
        root = Path(tmp) / fixture
        build(fixture, root)
        out = subprocess.run(
            [sys.executable, "-m", "tessera.agent", "inventory", "--json",
             "--sysfs-root", str(root), "--host-id", fixture],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
    data: dict[str, object] = json.loads(out)
    # The only values that differ from run to run: the boot id of a fake
    # tree derives from its (temporary) path, the generation from the clock.
    data["bootId"] = "<boot>"
    data["generation"] = "<generation>"
    return data


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_inventory_matches_its_golden_file(fixture: str) -> None:
    got = json.dumps(inventory_json(fixture), indent=1, sort_keys=True) + "\n"
    golden = GOLDEN / f"{fixture}.json"
    if UPDATE:
        golden.write_text(got)
    assert golden.exists(), f"no golden file for {fixture}; run with TESSERA_UPDATE_GOLDEN=1"
    assert got == golden.read_text(), (
        f"{fixture}: inventory differs from {golden.name}; if intended, regenerate with "
        "TESSERA_UPDATE_GOLDEN=1"
    )
