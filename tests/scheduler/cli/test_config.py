"""Where the CLI's settings come from: a flag beats the environment, which beats the file.

Each test writes a config file, sets (or not) the environment and the flags,
and reads what :func:`resolve` settles on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera.scheduler.cli.config import DEFAULT_SCHEDULER, ConfigError, Settings, resolve
from tessera.scheduler.cli.parser import build_parser


def settings(argv: list[str], env: dict[str, str]) -> Settings:
    return resolve(build_parser().parse_args(argv), env)


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An environment whose default config file is in ``tmp_path``, written by the test."""
    (tmp_path / "tessera").mkdir()
    return {"XDG_CONFIG_HOME": str(tmp_path)}


def write(env: dict[str, str], text: str) -> Path:
    path = Path(env["XDG_CONFIG_HOME"]) / "tessera" / "config.toml"
    path.write_text(text)
    return path


def test_without_a_file_the_defaults_hold(home: dict[str, str]) -> None:
    assert settings(["hosts"], home) == Settings()
    assert Settings().scheduler == DEFAULT_SCHEDULER


def test_the_file_sets_every_setting(home: dict[str, str]) -> None:
    config = write(home, 'scheduler = "s:1"\ntls_dir = "tls"\noutput = "wide"\ntimeout = 5\n')
    assert settings(["hosts"], home) == Settings(
        scheduler="s:1", tls_dir=config.parent / "tls", output="wide", timeout=5.0
    )


def test_the_environment_beats_the_file_and_a_flag_beats_both(home: dict[str, str]) -> None:
    write(home, 'scheduler = "file:1"\noutput = "wide"\n')
    env = {**home, "TESSERA_SCHEDULER": "env:1", "TESSERA_OUTPUT": "yaml"}
    assert settings(["hosts"], env).scheduler == "env:1"
    assert settings(["hosts"], env).output == "yaml"
    flagged = settings(["hosts", "--scheduler", "flag:1", "-o", "json"], env)
    assert (flagged.scheduler, flagged.output) == ("flag:1", "json")


def test_a_flag_before_the_command_is_kept_when_none_follows_it(home: dict[str, str]) -> None:
    assert settings(["-o", "json", "list", "--tenant", "acme"], home).output == "json"
    assert settings(["-o", "json", "list", "-o", "yaml"], home).output == "yaml"


def test_config_names_a_file_elsewhere_and_it_must_be_there(
    home: dict[str, str], tmp_path: Path
) -> None:
    other = tmp_path / "other.toml"
    other.write_text('scheduler = "other:1"\n')
    assert settings(["hosts", "--config", str(other)], home).scheduler == "other:1"
    assert settings(["hosts"], {**home, "TESSERA_CONFIG": str(other)}).scheduler == "other:1"
    with pytest.raises(ConfigError, match="no such file"):
        settings(["hosts", "--config", str(tmp_path / "gone.toml")], home)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("output = 3\n", "output"),
        ('scheduler = ""\n', "scheduler"),
        ("timeout = true\n", "timeout"),
        ("timeout = 1e9\n", "timeout"),
        ('tls_dir = ["a"]\n', "tls_dir"),
        ("[server]\nscheduler = 'x'\n", "server"),
    ],
)
def test_a_wrong_file_is_refused_naming_the_key(
    home: dict[str, str], text: str, named: str
) -> None:
    path = write(home, text)
    with pytest.raises(ConfigError, match=named) as err:
        settings(["hosts"], home)
    assert str(path) in str(err.value)
