"""The agent refuses a --sysfs-root that holds no sysfs tree, instead of reporting an empty host.

Discovery reads a missing directory as "nothing there"; an agent started on a
mistyped root would therefore register a host without devices, and say
nothing. ``Sysfs.check_tree`` and the command line stop it first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tessera.agent.__main__ import main
from tessera.agent.sysfs import NotASysfsTreeError, Sysfs
from tessera.agent.testing.hosts import FIXTURES, build


def not_a_tree(kind: str, tmp_path: Path) -> Path:
    """A root of the given kind that holds no sysfs tree."""
    if kind == "missing":
        return tmp_path / "no-such-dir"
    if kind == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if kind == "file":
        (tmp_path / "a-file").write_text("not a directory\n")
        return tmp_path / "a-file"
    # A /sys with its device hierarchy but no PCI bus: a half-copied tree.
    (tmp_path / "half" / "sys" / "devices").mkdir(parents=True)
    return tmp_path / "half"


KINDS = ["missing", "empty", "file", "sys-without-pci-bus"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_root_without_a_sysfs_tree_is_refused_naming_what_is_missing(
    kind: str, tmp_path: Path
) -> None:
    root = not_a_tree(kind, tmp_path)
    with pytest.raises(NotASysfsTreeError) as err:
        Sysfs(root).check_tree()
    assert err.value.missing == "sys/bus/pci/devices"
    assert str(err.value) == f"{root}: not a sysfs tree (no sys/bus/pci/devices)"


def test_a_pci_bus_without_the_device_hierarchy_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sys" / "bus" / "pci" / "devices").mkdir(parents=True)
    with pytest.raises(NotASysfsTreeError) as err:
        Sysfs(tmp_path).check_tree()
    assert err.value.missing == "sys/devices"


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_fixture_host_tree_is_accepted(name: str, tmp_path: Path) -> None:
    build(name, tmp_path / name)
    Sysfs(tmp_path / name).check_tree()


@pytest.mark.parametrize("kind", KINDS)
def test_inventory_exits_2_with_one_line_on_a_root_that_is_not_a_tree(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = not_a_tree(kind, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["inventory", "--sysfs-root", str(root)])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"tessera-agent: --sysfs-root {root}: not a sysfs tree (no sys/bus/pci/devices)\n"
    )


def test_inventory_of_a_fixture_host_tree_still_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build("virt-2s", tmp_path / "virt")
    assert main(["inventory", "--sysfs-root", str(tmp_path / "virt"), "--host-id", "v"]) == 0
    assert "PCI functions:" in capsys.readouterr().out


def test_run_exits_2_before_registering_anything_and_without_a_traceback(tmp_path: Path) -> None:
    # As the operator sees it: the real process, its exit status and stderr.
    # The scheduler address points nowhere: the agent must stop before it
    # tries to reach it (or it would hang retrying instead of exiting).
    root = tmp_path / "typo"
    result = subprocess.run(
        [
            sys.executable, "-m", "tessera.agent", "run", "--sysfs-root", str(root),
            "--scheduler", "127.0.0.1:1", "--state-dir", str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        f"tessera-agent: --sysfs-root {root}: not a sysfs tree (no sys/bus/pci/devices)\n"
    )
    assert not (tmp_path / "state").exists()
