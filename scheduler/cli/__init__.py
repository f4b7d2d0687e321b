"""tessera: the operator and user command line.

tessera demo [--serve]             run a whole cluster on fake hosts, end to end
                                   (--serve: keep it running with the dashboard open)
tessera place --tenant T --gpu 1   place a request: --gpu/--nic/--accelerator N whole devices,
                                   --vf N, --mdev TYPE[:N], --mig PROFILE[:N] (or --file F)
tessera list | hosts               show placements, registered hosts
tessera get ID | release ID        one placement; tear it down
tessera explain --tenant T --gpu 1 where it would go, or why it cannot (exit 1)
tessera host cordon|uncordon|drain|forget ID
                                   take a host out of scheduling, back in, empty it, remove it
tessera plan --hosts DIR --requests FILE [--sequential]
                                   what-if: place a batch offline, no store, no agents
tessera certs ca DIR | issue --ca DIR --role R --name N OUT | show DIR | p12 DIR OUT
                                   a CA and certificates for mutual TLS (p12: for a browser)
tessera completion bash|zsh|fish   a shell completion script

Global options anywhere on the line: --scheduler, --tls-dir, --timeout,
-o table|wide|json|yaml, --config (flags over environment over
~/.config/tessera/config.toml).
"""

from __future__ import annotations

import argparse
import os
import sys

import argcomplete
import grpc

from tessera.client.errors import PagingError
from tessera.scheduler.cli import commands
from tessera.scheduler.cli.config import ConfigError, resolve
from tessera.scheduler.cli.output import Output
from tessera.scheduler.cli.parser import build_parser
from tessera.scheduler.cli.request_flags import RequestFileError
from tessera.security.certs import CertificateError
from tessera.security.tls import TlsConfigError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of tessera: the command's exit code (see ``tessera --help``)."""
    parser = build_parser()
    # Answers the shell's completion request and exits when the shell asks.
    argcomplete.autocomplete(parser)
    opts = parser.parse_args(argv)
    out = Output("json" if getattr(opts, "json", False) else opts.output or "table")
    try:
        if opts.command in _OFFLINE:
            # No scheduler to reach: a broken config file must not stop them.
            return _run_offline(opts, out)
        settings = resolve(opts, os.environ)
        return commands.SchedulerCommands(settings, Output(settings.output)).run(opts)
    except ConfigError as err:
        out.error(f"tessera: {err}")
        return 2
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        out.error(f"tessera: {code.name}: {err.details()}")
        return commands.rpc_exit_code(code)
    except PagingError as err:
        out.error(f"tessera: {err}")
        return 1
    except (RequestFileError, TlsConfigError) as err:
        out.error(f"tessera: {err}")
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `tessera list | head`: the reader left; nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


#: The commands that never call the scheduler, and so read no settings.
_OFFLINE = frozenset({"completion", "demo", "certs", "plan"})


def _run_offline(opts: argparse.Namespace, out: Output) -> int:
    """Carry an offline command out; errors its own inputs can cause are exit 2."""
    if opts.command == "completion":
        out.line(argcomplete.shellcode(["tessera"], shell=opts.shell).rstrip("\n"))
        return 0
    if opts.command == "demo":
        if opts.output not in (None, "table"):
            out.error("tessera demo: -o/--output: the demo prints for a person (table only)")
            return 2
        from tessera.scheduler.demo import run_demo

        return run_demo(opts.workdir, serve=opts.serve, http_port=opts.http_port)
    if opts.command == "certs":
        try:
            return commands.certs(opts, out)
        except (CertificateError, TlsConfigError, OSError) as err:
            out.error(f"tessera certs: {err}")
            return 2
    from tessera.scheduler.core.validation import InvalidRequestError
    from tessera.scheduler.planning import PlanningInputError

    try:
        return commands.plan(opts, out)
    except (PlanningInputError, InvalidRequestError) as err:
        out.error(f"tessera plan: {err}")
        return 2
