"""The command line's settings: flags over environment over config file over defaults.

The config file is TOML, ``$XDG_CONFIG_HOME/tessera/config.toml`` (by default
``~/.config/tessera/config.toml``), or the file ``--config``/``TESSERA_CONFIG``
names::

    scheduler = "sched.example.net:50051"
    tls_dir = "~/.config/tessera/tls"   # relative paths: from the file's folder
    output = "wide"                     # table, wide, json or yaml
    timeout = 30                        # seconds per call

A file that is there but wrong (not TOML, an unknown key, a bad value) stops the
command with one line naming the file and the key; a default file that is not
there is no error.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tessera.scheduler.flags import seconds

#: How ``-o`` may render a result.
OUTPUT_FORMATS: Final = ("table", "wide", "json", "yaml")

#: A config file is a few lines; anything larger is not one (and is not read whole).
MAX_CONFIG_BYTES: Final = 64 * 1024

DEFAULT_SCHEDULER: Final = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S: Final = 60.0


class ConfigError(ValueError):
    """The config file, or a setting's value, is wrong; the message names which."""


@dataclass(frozen=True)
class Settings:
    """Where the scheduler is, how to reach it, and how to show what it says."""

    scheduler: str = DEFAULT_SCHEDULER
    tls_dir: Path | None = None
    output: str = "table"
    timeout: float = DEFAULT_TIMEOUT_S


def default_config_path(env: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/tessera/config.toml``, ``~/.config/...`` when XDG is unset."""
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tessera" / "config.toml"


def _read(path: Path, *, required: bool) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config {path}: no such file") from None
        return {}
    except OSError as err:
        raise ConfigError(f"config {path}: {err.strerror or err}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path}: larger than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config {path}: not UTF-8 text") from None
    except (ValueError, RecursionError) as err:
        # TOMLDecodeError is a ValueError; so is an integer too long to
        # convert, and arrays nested deep enough exhaust the parser's stack.
        raise ConfigError(f"config {path}: not TOML: {str(err)[:200]}") from None


def _string(path: Path, key: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise ConfigError(f"config {path}: {key}: a non-empty string")
    return value


@dataclass(frozen=True)
class _FileSettings:
    """What a config file sets; None where it is silent."""

    scheduler: str | None = None
    tls_dir: Path | None = None
    output: str | None = None
    timeout: float | None = None


def _from_file(path: Path, data: Mapping[str, object]) -> _FileSettings:
    """The file's settings, checked."""
    known = ("scheduler", "tls_dir", "output", "timeout")
    for key in data:
        if key not in known:
            raise ConfigError(
                f"config {path}: unknown key {key[:32]!r} (known: {', '.join(known)})"
            )
    tls_dir = None
    if "tls_dir" in data:
        tls_dir = Path(_string(path, "tls_dir", data["tls_dir"])).expanduser()
        # Relative to the file, as a path in any config file reads.
        tls_dir = tls_dir if tls_dir.is_absolute() else path.parent / tls_dir
    timeout = None
    if "timeout" in data:
        value = data["timeout"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config {path}: timeout: a number of seconds")
        try:
            timeout = seconds(str(value))
        except argparse.ArgumentTypeError as err:
            raise ConfigError(f"config {path}: timeout: {err}") from None
    return _FileSettings(
        scheduler=_string(path, "scheduler", data["scheduler"]) if "scheduler" in data else None,
        tls_dir=tls_dir,
        output=(
            output_format(_string(path, "output", data["output"]), f"config {path}")
            if "output" in data
            else None
        ),
        timeout=timeout,
    )


def output_format(text: str, where: str) -> str:
    """``text`` if it names an output format.

    Raises:
        ConfigError: it does not; the message starts with ``where``.
    """
    if text not in OUTPUT_FORMATS:
        choices = ", ".join(OUTPUT_FORMATS)
        raise ConfigError(f"{where}: output: {text[:32]!r} is not one of {choices}")
    return text


def resolve(opts: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """The settings a command runs with: each from its flag, else env, else file, else default.

    Args:
        opts: the parsed command line; its global options are None when not given.
        env: the environment (``TESSERA_SCHEDULER``, ``TESSERA_TLS_DIR``,
            ``TESSERA_OUTPUT``, ``TESSERA_CONFIG``, ``XDG_CONFIG_HOME``).

    Raises:
        ConfigError: the config file or an environment value is wrong.
    """
    named = opts.config or env.get("TESSERA_CONFIG")
    path = Path(named).expanduser() if named else default_config_path(env)
    file = _from_file(path, _read(path, required=bool(named)))
    env_tls = Path(env["TESSERA_TLS_DIR"]) if env.get("TESSERA_TLS_DIR") else None
    env_output = env.get("TESSERA_OUTPUT")
    if env_output:
        output_format(env_output, "TESSERA_OUTPUT")
    return Settings(
        scheduler=opts.scheduler
        or env.get("TESSERA_SCHEDULER")
        or file.scheduler
        or DEFAULT_SCHEDULER,
        tls_dir=opts.tls_dir or env_tls or file.tls_dir,
        output=opts.output or env_output or file.output or "table",
        timeout=opts.timeout or file.timeout or DEFAULT_TIMEOUT_S,
    )
