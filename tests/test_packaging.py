"""What the wheels install: every package of the repository, under ``tessera`` and nowhere else.

The build maps the repository's folders into the ``tessera`` namespace with
an explicit package list (``[tool.setuptools]`` in each pyproject.toml); a
package folder missing from that list would be left out of the wheel while
every test run from the checkout still passed. ``scripts/check_dists.py``
builds and installs the wheels themselves (CI); this reads the lists.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def packages_in(folder: Path, prefix: str) -> set[str]:
    """Every package (a folder with ``__init__.py``) under ``folder``, named from ``prefix``."""
    found = set()
    # Symlinked folders count (the client's tessera/v1 is one): setuptools follows them.
    for here, _, files in os.walk(folder, followlinks=True):
        if "__init__.py" in files:
            found.add(".".join((prefix, *Path(here).relative_to(folder).parts)))
    return found


def configured(pyproject: Path) -> tuple[set[str], dict[str, str]]:
    setuptools = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    return set(setuptools["packages"]), setuptools.get("package-dir", {})


def test_the_scheduler_wheel_lists_every_package_of_its_folders() -> None:
    packages, package_dir = configured(ROOT / "pyproject.toml")
    assert package_dir == {
        "tessera.scheduler": "scheduler",
        "tessera.agent": "agent",
        "tessera": "protos/tessera",
    }
    expected = packages_in(ROOT / "scheduler", "tessera.scheduler")
    expected |= packages_in(ROOT / "agent", "tessera.agent")
    # tessera.v1 belongs to the client's distribution (a dependency), alone.
    expected |= {p for p in packages_in(ROOT / "protos" / "tessera", "tessera") if "v1" not in p}
    expected.add("tessera")  # the namespace's own modules: logs, keepalive
    assert packages == expected


def test_the_client_wheel_lists_the_wire_contract_and_the_client() -> None:
    client = ROOT / "clients" / "python"
    packages, _ = configured(client / "pyproject.toml")
    assert packages == packages_in(client / "tessera", "tessera")


def test_tessera_is_a_namespace_package_shared_by_both_wheels() -> None:
    # An __init__.py in either would make one distribution own tessera/.
    assert not (ROOT / "protos" / "tessera" / "__init__.py").exists()
    assert not (ROOT / "clients" / "python" / "tessera" / "__init__.py").exists()
