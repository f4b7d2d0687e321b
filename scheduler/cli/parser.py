"""The command line's grammar: the commands, their flags, and the global options.

The global options (``--scheduler``, ``--tls-dir``, ``--timeout``, ``-o``,
``--config``) are taken anywhere on the line, before or after the command, as
kubectl takes them: every command's parser knows them, with no default of its
own, so one given after the command is kept and one left out does not erase
one given before it.
"""

from __future__ import annotations

import argparse
from importlib import metadata
from pathlib import Path
from typing import NoReturn

from tessera.scheduler.cli import values
from tessera.scheduler.cli.config import OUTPUT_FORMATS
from tessera.scheduler.cli.request_flags import add_request_flags
from tessera.scheduler.flags import seconds
from tessera.security.identity import Role

#: How long a certificate may be valid: up to a century, as X.509 tools allow.
_DAYS = values.whole_number(1, 36_500)

#: ``tessera completion SHELL`` writes a completion script for these.
SHELLS = ("bash", "zsh", "fish", "tcsh")

_EXIT_CODES = """exit codes:
  0  done (explain: the request would be placed)
  1  the scheduler refused or failed it (explain: it would not be placed)
  2  the command line, a file it names, or the request is wrong
  3  the scheduler could not be reached, or did not answer in --timeout
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake told in one line (usage stays one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        """Exit 2 with ``PROG: error: MESSAGE (see PROG --help)`` on standard error."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    """The installed distribution's version."""
    try:
        return metadata.version("tessera-scheduler")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    # Below the top, an option not given must leave no attribute at all, or it
    # would overwrite the value given before the command.
    default = None if top else argparse.SUPPRESS
    group = p.add_argument_group("global options (anywhere on the line)")
    group.add_argument(
        "--scheduler",
        default=default,
        metavar="HOST:PORT",
        help="scheduler address [TESSERA_SCHEDULER, config: scheduler; 127.0.0.1:50051]",
    )
    group.add_argument(
        "--tls-dir",
        type=Path,
        default=default,
        help="mutual TLS: ca.pem, cert.pem (a tenant, frontend, viewer or admin identity), "
        "key.pem [TESSERA_TLS_DIR, config: tls_dir]; without it, plaintext (a scheduler on "
        "loopback)",
    )
    group.add_argument(
        "--timeout",
        type=seconds,
        default=default,
        help="seconds each call to the scheduler may take (a drain: at least 600) "
        "[config: timeout; 60]",
    )
    group.add_argument(
        "-o",
        "--output",
        choices=OUTPUT_FORMATS,
        default=default,
        help="table, wide (more columns), json or yaml (protobuf's JSON mapping) "
        "[TESSERA_OUTPUT, config: output; table]",
    )
    group.add_argument(
        "--config",
        type=Path,
        default=default,
        help="settings file [TESSERA_CONFIG; ~/.config/tessera/config.toml]",
    )


class _Commands:
    """Adds commands that all take the global options."""

    def __init__(self, parent: argparse.ArgumentParser, dest: str) -> None:
        self._actions = parent.add_subparsers(dest=dest, required=True, metavar="COMMAND")

    def add(self, name: str, help_text: str) -> argparse.ArgumentParser:
        p = self._actions.add_parser(name, help=help_text, description=help_text)
        _global_options(p, top=False)
        return p


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``tessera``."""
    p = _Parser(
        prog="tessera",
        description="Tessera's command line: place and release devices, see the fleet, "
        "run it (demo, certificates, what-if plans).",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"tessera {version()}")
    _global_options(p, top=True)
    commands = _Commands(p, "command")

    add_request_flags(commands.add("place", "place a request"))
    add_request_flags(commands.add("explain", "where a request would go, or why it cannot"))
    lst = commands.add("list", "list placements")
    lst.add_argument("--tenant", default="")
    lst.add_argument("--host", default="")
    commands.add("hosts", "list registered hosts")
    commands.add("get", "show one placement").add_argument("id")
    commands.add("release", "release a placement").add_argument("id")
    _host_commands(commands.add("host", "cordon, uncordon, drain or forget a host (admin)"))
    _plan_command(commands.add("plan", "place a batch offline (what-if), no store or agents"))
    demo = commands.add("demo", "run a scheduler and three agents on fake hosts")
    demo.add_argument("--workdir", type=Path, help="keep the cluster's files here")
    demo.add_argument(
        "--serve",
        action="store_true",
        help="keep the cluster and its placements running with the dashboard until Ctrl-C",
    )
    demo.add_argument(
        "--http-port",
        type=values.port,
        default=0,
        help="the dashboard's port (default: a free one)",
    )
    _certs_commands(commands.add("certs", "create a CA, issue certificates, show one"))
    completion = commands.add("completion", "a shell completion script: source it from your rc")
    completion.add_argument("shell", choices=SHELLS)
    return p


def _host_commands(host: argparse.ArgumentParser) -> None:
    actions = _Commands(host, "action")
    cordon = actions.add("cordon", "no new placements on the host; its own stay")
    cordon.add_argument("id", help="host id")
    cordon.add_argument("--reason", default="", help="why (shown by tessera hosts)")
    actions.add("uncordon", "let new placements land again").add_argument("id", help="host id")
    drain = actions.add("drain", "cordon, then release every placement on the host")
    drain.add_argument("id", help="host id")
    drain.add_argument("--reason", default="", help="the cordon's reason (default: drained)")
    forget = actions.add("forget", "remove a host without placements from the store")
    forget.add_argument("id", help="host id")
    forget.add_argument(
        "--force",
        action="store_true",
        help="drop its placements too (not torn down: the agent's reconciler does that "
        "if it registers again)",
    )


def _plan_command(plan: argparse.ArgumentParser) -> None:
    plan.add_argument("--hosts", type=Path, required=True, help="directory of inventory JSON files")
    plan.add_argument(
        "--requests", type=Path, required=True, help="YAML/JSON list of PlacementRequest"
    )
    # Before -o: kept so scripts written against it still run.
    plan.add_argument("--json", action="store_true", help="the same as -o json")
    plan.add_argument(
        "--sequential", action="store_true", help="place in priority order, no joint solve"
    )
    plan.add_argument("--time-limit", type=seconds, default=10.0, help="solver seconds")
    plan.add_argument(
        "--workers",
        type=values.whole_number(1, 64),
        default=1,
        help="solver workers (1: deterministic)",
    )
    plan.add_argument(
        "--seed", type=values.whole_number(0, 2**31 - 1), default=0, help="solver random seed"
    )


def _certs_commands(certs: argparse.ArgumentParser) -> None:
    actions = _Commands(certs, "action")
    ca = actions.add("ca", "create a CA in DIR (ca.pem, ca-key.pem)")
    ca.add_argument("dir", type=Path)
    ca.add_argument("--days", type=_DAYS, default=3650)
    iss = actions.add("issue", "issue a key and certificate for one identity")
    iss.add_argument("--ca", type=Path, required=True, help="the CA directory")
    iss.add_argument("--role", required=True, choices=[r.value for r in Role])
    iss.add_argument("--name", required=True, help="host id (agent), tenant name, ...")
    iss.add_argument("--days", type=_DAYS, default=365)
    iss.add_argument("--dns", action="append", default=[], help="extra DNS SAN (repeatable)")
    iss.add_argument("--ip", action="append", default=[], help="extra IP SAN (repeatable)")
    iss.add_argument("out", type=Path, help="directory for ca.pem, cert.pem, key.pem")
    show = actions.add("show", "the identity and expiry of a TLS directory")
    show.add_argument("dir", type=Path)
    p12 = actions.add("p12", "a TLS directory as one PKCS#12 file, to import into a browser")
    p12.add_argument("dir", type=Path, help="the TLS directory (cert.pem, key.pem)")
    p12.add_argument("out", type=Path, help="the .p12 file to write (0600)")
    p12.add_argument(
        "--password-file",
        type=Path,
        required=True,
        help="file whose first line is the bundle's password (- for standard input)",
    )
