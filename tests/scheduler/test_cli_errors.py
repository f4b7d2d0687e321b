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
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tessera"), result.stderr
    assert named in last, last


@pytest.mark.parametrize(
    ("module", "args", "named"),
    [
        ("tessera.agent", ["fakehost", "build", "no-such-host", "{d}/tree"], "no-such-host"),
        ("tessera.agent", ["fakehost", "build", "vgpu", "{d}/existing"], "already holds a tree"),
        ("tessera.agent", ["fakehost", "build"], "usage"),
        ("tessera.agent", ["run", "--log-level", "bogus"], "--log-level"),
        ("tessera.scheduler", ["--log-level", "bogus"], "--log-level"),
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
