"""Ordinary mistakes on the command line: one line saying what is wrong, exit 2, no traceback.

Each case is a command an operator could type; none of them needs a
scheduler (the line is refused before any call), so every row runs the real
program in a subprocess, as a shell would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(
    *args: str, module: str = "tessera.scheduler.cli", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("requests")
    (d / "bad-enum.json").write_text(json.dumps({"claims": [{"kind": "DEVICE_KIND_TOASTER"}]}))
    (d / "truncated.json").write_text('{"claims":')
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "tabs.yaml").write_text("claims:\n\t- kind: x\n")
    (d / "unknown-field.json").write_text(json.dumps({"tenant": "acme", "gpus": 2}))
    (d / "binary.json").write_bytes(b"\xff\xfe\x00")
    (d / "short.txt").write_text("short\n")
    (d / "requests.yaml").write_text("- request_id: r\n  tenant: t\n")
    (d / "not-toml.toml").write_text("scheduler = \n")
    (d / "unknown-key.toml").write_text('schedular = "x:1"\n')
    (d / "bad-output.toml").write_text('output = "csv"\n')
    (d / "bad-timeout.toml").write_text("timeout = -1\n")
    (d / "string-timeout.toml").write_text('timeout = "soon"\n')
    (d / "huge.toml").write_text("# " + "x" * 70_000 + "\n")
    (d / "deep.toml").write_text("a = " + "[" * 20_000 + "\n")
    (d / "long-int.toml").write_text("timeout = " + "9" * 5_000 + "\n")
    return d


#: (what the operator typed, a word the error must name)
MISTAKES = [
    (["place", "--gpu", "-1"], "--gpu"),
    (["place", "--gpu", "many"], "--gpu"),
    (["place", "--gpu", "65"], "--gpu"),
    (["place", "--vf", "x"], "--vf"),
    (["place", "--gpu", "1", "--vendor", "zzz"], "--vendor"),
    (["place", "--gpu", "1", "--vendor", "0x10000"], "--vendor"),
    (["place", "--mig", ""], "--mig"),
    (["place", "--mig", "3g.40gb:0"], "--mig"),
    (["place", "--mdev", "nvidia-63:x"], "--mdev"),
    (["place", "--gpu", "1", "--isolation", "airtight"], "--isolation"),
    (["place", "--gpu", "1", "--priority", "99999999999"], "--priority"),
    (["explain", "--gpu", "1", "--selector", "nokv"], "--selector"),
    (["explain", "--gpu", "1", "--cpus", "lots"], "--cpus"),
    (["place", "--file", "/no/such/request.json"], "--file"),
    (["place", "--file", "{d}/bad-enum.json"], "DEVICE_KIND_TOASTER"),
    (["place", "--file", "{d}/truncated.json"], "not JSON"),
    (["place", "--file", "{d}/list.yaml"], "mapping"),
    (["place", "--file", "{d}/tabs.yaml"], "--file"),
    (["place", "--file", "{d}/unknown-field.json"], "gpus"),
    (["place", "--file", "{d}/binary.json"], "--file"),
    (["--timeout", "0", "hosts"], "--timeout"),
    (["--timeout", "soon", "hosts"], "--timeout"),
    (["demo", "--http-port", "70000"], "--http-port"),
    (
        ["certs", "p12", "/no/such/dir", "/tmp/x.p12", "--password-file", "/no/such/file"],
        "No such file",
    ),
    (["nosuch"], "invalid choice"),
    # Every command, its own mistakes.
    (["list", "--bogus"], "--bogus"),
    (["list", "-o", "csv"], "--output"),
    (["hosts", "extra"], "extra"),
    (["get"], "id"),
    (["release"], "id"),
    (["host"], "COMMAND"),
    (["host", "reboot", "dgx-1"], "reboot"),
    (["host", "cordon"], "id"),
    (["host", "drain", "dgx-1", "--reason"], "--reason"),
    (["host", "forget", "dgx-1", "--force=yes"], "--force"),
    (["plan", "--hosts", "{d}"], "--requests"),
    (["plan", "--hosts", "{d}", "--requests", "{d}/requests.yaml", "--workers", "0"], "--workers"),
    (
        ["plan", "--hosts", "{d}", "--requests", "{d}/requests.yaml", "--time-limit", "0"],
        "--time-limit",
    ),
    (["plan", "--hosts", "/no/such/dir", "--requests", "{d}/requests.yaml"], "/no/such/dir"),
    (["certs", "ca", "{d}/ca", "--days", "0"], "--days"),
    (["certs", "issue", "--ca", "{d}", "--role", "emperor", "--name", "x", "{d}/o"], "--role"),
    (
        ["certs", "issue", "--ca", "/no/such/ca", "--role", "admin", "--name", "x", "{d}/o"],
        "/no/such/ca",
    ),
    (["certs", "show", "/no/such/tls"], "/no/such/tls"),
    (["completion", "powershell"], "powershell"),
    (["demo", "-o", "json"], "--output"),
    # The global options and the config file, before or after the command.
    (["list", "--timeout", "-5"], "--timeout"),
    (["list", "--tls-dir", "/no/such/tls"], "/no/such/tls"),
    (["--config", "/no/such/config.toml", "hosts"], "no such file"),
    (["hosts", "--config", "{d}/not-toml.toml"], "not TOML"),
    (["hosts", "--config", "{d}/unknown-key.toml"], "schedular"),
    (["hosts", "--config", "{d}/bad-output.toml"], "output"),
    (["hosts", "--config", "{d}/bad-timeout.toml"], "timeout"),
    (["hosts", "--config", "{d}/string-timeout.toml"], "timeout"),
    (["hosts", "--config", "{d}/huge.toml"], "KiB"),
    (["hosts", "--config", "{d}/deep.toml"], "not TOML"),
    (["hosts", "--config", "{d}/long-int.toml"], "not TOML"),
    (["certs", "p12", "{d}", "{d}/x.p12", "--password-file", "{d}/short.txt"], "at least 8"),
]


@pytest.mark.parametrize(
    ("args", "named"), MISTAKES, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_a_mistake_on_the_tessera_line_is_one_line_and_exit_2(
    files: Path, args: list[str], named: str
) -> None:
    result = run(*(a.replace("{d}", str(files)) for a in args))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()  # one line, no usage block
    assert line.startswith("tessera"), result.stderr
    assert named in line, line


def test_a_bad_output_format_in_the_environment_is_named() -> None:
    import os

    result = run("hosts", env={**os.environ, "TESSERA_OUTPUT": "csv"})
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "tessera: TESSERA_OUTPUT: output: 'csv' is not one of "
        "table, wide, json, yaml"
    )


def test_global_options_are_taken_after_the_command_too() -> None:
    # Parsed, then the call fails for want of a scheduler: exit 3, not a usage error.
    result = run("list", "--tenant", "acme", "--scheduler", "127.0.0.1:9", "-o", "json",
                 "--timeout", "5")  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("tessera: UNAVAILABLE"), result.stderr


def test_version_and_completion_answer_without_a_scheduler() -> None:
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("tessera "), version.stdout
    completion = run("completion", "bash")
    assert completion.returncode == 0 and "complete" in completion.stdout


@pytest.mark.parametrize(
    ("module", "args", "named"),
    [
        ("tessera.agent", ["fakehost", "build", "no-such-host", "{d}/tree"], "no-such-host"),
        ("tessera.agent", ["fakehost", "build", "vgpu", "{d}/existing"], "already holds a tree"),
        ("tessera.agent", ["fakehost", "build"], "usage"),
        ("tessera.agent", ["run", "--log-level", "bogus"], "--log-level"),
        ("tessera.agent", ["run", "--label", "nokv"], "--label"),
        ("tessera.agent", ["inventory", "--label", "=v"], "--label"),
        ("tessera.scheduler", ["--log-level", "bogus"], "--log-level"),
        ("tessera.agent", ["run", "--log-format", "xml"], "--log-format"),
        ("tessera.scheduler", ["--log-format", "xml"], "--log-format"),
        ("tessera.scheduler", ["--log-format", ""], "--log-format"),
        ("tessera.scheduler", ["--http-listen", "nowhere"], "--http-listen"),
        ("tessera.scheduler", ["--forget-dead-after", "forever"], "--forget-dead-after"),
        ("tessera.scheduler", ["--forget-dead-after", "-1"], "--forget-dead-after"),
    ],
)
def test_a_mistake_on_the_agent_or_scheduler_line_is_one_line_and_exit_2(
    tmp_path: Path, module: str, args: list[str], named: str
) -> None:
    if "{d}/existing" in args:
        assert (
            run(
                "fakehost", "build", "vgpu", str(tmp_path / "existing"), module="tessera.agent"
            ).returncode
            == 0
        )
    result = run(*(a.replace("{d}", str(tmp_path)) for a in args), module=module)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    program = module.replace(".", "-")  # tessera.agent runs as tessera-agent
    assert last.startswith(program), result.stderr
    assert named in last, last


@pytest.mark.parametrize("module", ["tessera.agent", "tessera.scheduler"])
def test_a_bad_log_format_in_the_environment_is_named_as_the_flag(module: str) -> None:
    import os

    args = ["run"] if module == "tessera.agent" else []
    result = run(*args, module=module, env={**os.environ, "TESSERA_LOG_FORMAT": "xml"})
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(module.replace(".", "-")), result.stderr
    assert "--log-format" in last and "xml" in last, last
