"""The programs the deployment runs, as the wheel defines them: console scripts and their sources.

Deployment files name programs only by their console scripts
(``[project.scripts]`` of pyproject.toml), never by module path, and pass
settings as flags and ``TESSERA_*`` variables. These helpers find the source
file behind each script by reading pyproject.toml (no import of the programs),
so tests can check that every setting a deployment file passes is one the
program reads.
"""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@cache
def pyproject() -> dict[str, Any]:
    """pyproject.toml, parsed."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def version() -> str:
    """The project's version."""
    return str(pyproject()["project"]["version"])


def console_scripts() -> dict[str, str]:
    """Console script name -> ``module:function``, as the wheel installs them."""
    return dict(pyproject()["project"]["scripts"])


def module_file(module: str) -> Path:
    """The source file of ``module`` in this repository, by setuptools' rules.

    ``[tool.setuptools.package-dir]`` maps a package to a folder (the longest
    mapped prefix wins); otherwise the module is looked for under each
    ``packages.find`` ``where`` folder, or the repository's root.

    Raises:
        FileNotFoundError: no such file.
    """
    setuptools = pyproject().get("tool", {}).get("setuptools", {})
    parts = module.split(".")
    bases: list[tuple[Path, list[str]]] = []
    package_dir: dict[str, str] = setuptools.get("package-dir", {})
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in package_dir:
            bases.append((ROOT / package_dir[prefix], parts[i:]))
            break
    wheres = setuptools.get("packages", {})
    where = wheres.get("find", {}).get("where", ["."]) if isinstance(wheres, dict) else ["."]
    bases += [(ROOT / w, parts) for w in where]
    for base, rest in bases:
        for candidate in (
            base.joinpath(*rest).with_suffix(".py") if rest else base / "__init__.py",
            base.joinpath(*rest, "__init__.py"),
        ):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no source file for module {module} under {ROOT}")


def script_source(script: str) -> str:
    """The source text of the module behind console script ``script``.

    Raises:
        KeyError: the wheel defines no such script.
    """
    module = console_scripts()[script].partition(":")[0]
    return module_file(module).read_text()
