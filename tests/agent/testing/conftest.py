"""Fixtures for the fake-host toolkit tests.

* ``tree_dir`` (function): an empty directory for a fake tree, on tmpfs
  (``/dev/shm``) when there is one: building a tree is bound by file creation,
  which is several times faster there than on a disk. Removed afterwards.
* ``make_host`` (function): builds a named fixture host in a fresh temporary
  directory and returns a :class:`FakeHost` handle on it.
* ``built`` (session): every fixture host built once, by name; tests that use
  it must only read (building is bound by file creation, so sharing keeps the
  suite fast).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tessera.agent.testing import hosts

from .fakehost import FakeHost

_SHM = Path("/dev/shm")


@contextmanager
def _scratch(fallback: Path) -> Iterator[Path]:
    if _SHM.is_dir() and os.access(_SHM, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="tessera-fakehost-", dir=_SHM))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        yield fallback


@pytest.fixture
def tree_dir(tmp_path: Path) -> Iterator[Path]:
    with _scratch(tmp_path) as path:
        yield path


@pytest.fixture
def make_host(tree_dir: Path) -> Callable[[str], FakeHost]:
    count = 0

    def make(name: str) -> FakeHost:
        nonlocal count
        count += 1
        root = tree_dir / f"{name}-{count}"
        hosts.build(name, root)
        return FakeHost(root)

    return make


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, FakeHost]]:
    with _scratch(tmp_path_factory.mktemp("fixture-hosts")) as base:
        out = {}
        for name in hosts.FIXTURE_HOSTS:
            hosts.build(name, base / name)
            out[name] = FakeHost(base / name)
        yield out
