"""Fixtures of the security tests.

* ``pki`` (function): a fresh CA under ``tmp_path`` (:class:`~.pki.Pki`) that
  issues real certificates; ECDSA P-256 keys make that a matter of milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .pki import Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)
