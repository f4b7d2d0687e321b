"""The systemd deployment (``deploy/systemd``), read as a specification.

The units are parsed the way systemd reads them (sections, ``Key=Value``
lines, a key given several times keeping every value, ``#`` and ``;``
comments, backslash continuations) and checked for what the deployment
promises: the scheduler runs as the account ``tessera.sysusers`` creates and
is confined, the agent keeps only what writing ``/sys`` and ``/dev/vfio``
needs, extra flags come from an args variable, and every setting is one the
program reads. ``systemd-analyze verify`` is not run here: a fresh CI machine
need not have systemd (deploy/README.md says what it reported).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from . import programs

SYSTEMD = programs.ROOT / "deploy" / "systemd"
SCHEDULER_UNIT = SYSTEMD / "tessera-scheduler.service"
AGENT_UNIT = SYSTEMD / "tessera-agent.service"
SYSUSERS = SYSTEMD / "tessera.sysusers"

#: Each unit and the console script it runs.
UNITS = {SCHEDULER_UNIT: "tessera-scheduler", AGENT_UNIT: "tessera-agent"}

#: Where the wheel's virtualenv is installed (deploy/README.md, the image).
VENV_BIN = "/opt/tessera/bin"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Section -> key -> every value given, in order."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {line!r} is not Key=Value"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def service(path: Path) -> dict[str, list[str]]:
    return parse_unit(path)["Service"]


def single(svc: dict[str, list[str]], key: str) -> str:
    values = svc.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def environment(svc: dict[str, list[str]]) -> dict[str, str]:
    """The variables ``Environment=`` lines set (later lines win, as in systemd)."""
    out: dict[str, str] = {}
    for line in svc.get("Environment", []):
        for assignment in shlex.split(line):
            name, _, value = assignment.partition("=")
            out[name] = value
    return out


def args_variable(script: str) -> str:
    """``tessera-scheduler`` -> ``TESSERA_SCHEDULER_ARGS``."""
    return script.upper().replace("-", "_") + "_ARGS"


def sysusers_accounts() -> dict[str, list[str]]:
    """Account name -> its sysusers.d fields (type, name, id, GECOS, home, ...)."""
    accounts = {}
    for line in SYSUSERS.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            fields = shlex.split(line)
            accounts[fields[1]] = fields
    return accounts


def test_the_scheduler_runs_as_the_account_sysusers_creates() -> None:
    svc = service(SCHEDULER_UNIT)
    user = single(svc, "User")
    assert single(svc, "Group") == user
    kind, name, uid, gecos, home = sysusers_accounts()[user][:5]
    assert (kind, name, uid) == ("u", user, "-")
    assert gecos == "Tessera scheduler"
    # Its home is the state directory systemd makes for it, owned by it.
    assert home == f"/var/lib/{single(svc, 'StateDirectory')}"


def test_the_agent_runs_as_root_and_needs_no_account() -> None:
    assert "User" not in service(AGENT_UNIT)
    assert set(sysusers_accounts()) == {"tessera"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_each_unit_runs_a_console_script_of_the_wheel_with_an_args_variable(unit: Path) -> None:
    svc = service(unit)
    script = UNITS[unit]
    assert script in programs.console_scripts()
    argv = single(svc, "ExecStart").split()
    assert argv[0] == f"{VENV_BIN}/{script}"
    # Unbraced, so systemd splits the variable into separate arguments.
    variable = args_variable(script)
    assert argv[-1] == f"${variable}"
    # Empty by default, set in the optional environment file.
    assert environment(svc)[variable] == ""
    (env_file,) = svc["EnvironmentFile"]
    assert env_file.startswith("-/etc/tessera/")


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_every_setting_in_a_unit_is_one_the_program_reads(unit: Path) -> None:
    svc = service(unit)
    script = UNITS[unit]
    source = programs.script_source(script)
    for name in environment(svc):
        if name == args_variable(script):
            continue  # expanded by systemd into the command line
        assert f'"{name}"' in source, f"{script} never reads {name}"
    for flag in (a for a in single(svc, "ExecStart").split() if a.startswith("--")):
        assert f'"{flag}"' in source, f"{script} has no flag {flag}"


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_each_unit_writes_only_under_its_own_state_and_log_directories(unit: Path) -> None:
    svc = service(unit)
    state = f"/var/lib/{single(svc, 'StateDirectory')}"
    logs = f"/var/log/{single(svc, 'LogsDirectory')}"
    env = environment(svc)
    assert env["TESSERA_AUDIT_LOG"].startswith(logs + "/")
    for name in ("TESSERA_DATA_DIR", "TESSERA_AGENT_STATE_DIR"):
        if name in env:
            assert env[name] == state or env[name].startswith(state + "/")
    assert "ReadWritePaths" not in svc, "StateDirectory and LogsDirectory are the writable paths"


def test_the_two_units_share_no_directory() -> None:
    # On one machine each unit chowns its directories to its own user.
    scheduler, agent = service(SCHEDULER_UNIT), service(AGENT_UNIT)
    for key in ("StateDirectory", "LogsDirectory"):
        assert single(scheduler, key) != single(agent, key)


def test_the_scheduler_is_confined() -> None:
    svc = service(SCHEDULER_UNIT)
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "SystemCallFilter": "@system-service",
    }
    assert {key: single(svc, key) for key in expected} == expected
    families = set(single(svc, "RestrictAddressFamilies").split())
    assert families <= {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}


def test_the_agent_is_confined_as_far_as_writing_sys_and_dev_vfio_allows() -> None:
    svc = service(AGENT_UNIT)
    assert single(svc, "NoNewPrivileges") == "yes"
    # strict leaves /sys, /dev and /proc to the options below.
    assert single(svc, "ProtectSystem") == "strict"
    assert single(svc, "ProtectHome") == "yes"
    assert single(svc, "PrivateTmp") == "yes"
    # It writes /sys (ProtectKernelTunables would make it read-only) and needs
    # the host's /dev/vfio (PrivateDevices would hide it).
    assert svc.get("ProtectKernelTunables", ["no"]) == ["no"]
    assert svc.get("PrivateDevices", ["no"]) == ["no"]
    # Root's capabilities less some, never none at all: a bounding set that
    # is not a "~" list would have to name every one device work needs.
    assert single(svc, "CapabilityBoundingSet").startswith("~")
    dropped = set(single(svc, "CapabilityBoundingSet")[1:].split())
    assert not dropped & {"CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_SYS_MODULE", "CAP_SYS_RAWIO"}


def test_the_agent_gets_time_to_finish_a_prepare_in_flight() -> None:
    assert int(single(service(AGENT_UNIT), "TimeoutStopSec")) >= 30
