"""What each command does: call the scheduler (or work offline) and show the result.

Every command returns its exit code (see the parser's epilog): 0 done, 1 the
scheduler refused or failed it, 2 the user's input is wrong, 3 the scheduler
could not be reached in time.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import grpc

from tessera.client.paging import all_hosts, all_placements
from tessera.scheduler.cli import tables
from tessera.scheduler.cli.config import Settings
from tessera.scheduler.cli.output import Output
from tessera.scheduler.cli.request_flags import request_from_args
from tessera.scheduler.cli.values import read_password
from tessera.security.certs import browser_bundle, create_ca, issue
from tessera.security.identity import SCHEDULER_DNS_NAME
from tessera.security.tls import TlsDir, load_material, sync_channel
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

#: The codes that say the request itself is wrong: the user's mistake, exit 2.
_USAGE_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})
#: The codes that say the scheduler was not there (in time): worth a retry, exit 3.
_UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def rpc_exit_code(code: grpc.StatusCode) -> int:
    """The exit code for a call the scheduler answered with ``code``."""
    if code in _USAGE_CODES:
        return 2
    if code in _UNREACHABLE_CODES:
        return 3
    return 1


class SchedulerCommands:
    """The commands that talk to the scheduler, over one channel."""

    def __init__(self, settings: Settings, out: Output) -> None:
        tls = TlsDir(settings.tls_dir) if settings.tls_dir is not None else None
        self._stub = scheduler_pb2_grpc.SchedulerStub(
            sync_channel(settings.scheduler, tls, SCHEDULER_DNS_NAME)
        )
        self._timeout = settings.timeout
        self._out = out

    def run(self, opts: argparse.Namespace) -> int:
        """Carry ``opts.command`` out."""
        handler = getattr(self, f"_{opts.command}")
        result: int = handler(opts)
        return result

    def _place(self, opts: argparse.Namespace) -> int:
        r = self._stub.Place(
            scheduler_pb2.PlaceRequest(request=request_from_args(opts)), timeout=self._timeout
        )
        self._placements(r, [r.placement])
        return 0

    def _explain(self, opts: argparse.Namespace) -> int:
        e = self._stub.Explain(
            scheduler_pb2.ExplainRequest(request=request_from_args(opts)), timeout=self._timeout
        )
        if self._out.structured:
            self._out.message(e)
        else:
            self._out.line(e.summary)
            table = tables.placements_table([e.placement], wide=self._out.wide)
            if e.placeable and table is not None:
                self._out.table(table)
            for v in e.verdicts:
                self._out.line(f"  {v.plugin}: rejected {v.rejected} ({'; '.join(v.reasons)})")
        # As grep does: 0 it would be placed, 1 it would not.
        return 0 if e.placeable else 1

    def _list(self, opts: argparse.Namespace) -> int:
        request = scheduler_pb2.ListPlacementsRequest(tenant=opts.tenant, host_id=opts.host)
        placements = list(all_placements(self._stub, request, timeout=self._timeout))
        self._placements(scheduler_pb2.ListPlacementsResponse(placements=placements), placements)
        return 0

    def _hosts(self, opts: argparse.Namespace) -> int:
        listed = scheduler_pb2.ListHostsResponse(
            hosts=list(all_hosts(self._stub, timeout=self._timeout))
        )
        if self._out.structured:
            self._out.message(listed)
        else:
            self._out.table(tables.hosts_table(listed.hosts, wide=self._out.wide))
        return 0

    def _get(self, opts: argparse.Namespace) -> int:
        g = self._stub.GetPlacement(
            scheduler_pb2.GetPlacementRequest(placement_id=opts.id), timeout=self._timeout
        )
        self._placements(g, [g])
        if not self._out.structured:
            self._out.line(f"state {tables.state_word(g.state)}: {g.message or '-'}")
            if self._out.wide:
                self._out.table(tables.history_table(g))
        return 0

    def _release(self, opts: argparse.Namespace) -> int:
        rel = self._stub.Release(
            scheduler_pb2.ReleaseRequest(placement_id=opts.id), timeout=self._timeout
        )
        if self._out.structured:
            self._out.message(rel)
        else:
            self._out.line(f"released {rel.placement.placement_id} on {rel.placement.host_id}")
        return 0

    def _host(self, opts: argparse.Namespace) -> int:
        """``tessera host ACTION ID``: one line of outcome (a table for a drain)."""
        out = self._out
        if opts.action == "cordon":
            h = self._stub.CordonHost(
                scheduler_pb2.CordonHostRequest(host_id=opts.id, reason=opts.reason),
                timeout=self._timeout,
            )
            text = f"cordoned {h.host_id}" + (f": {h.cordon_reason}" if h.cordon_reason else "")
            out.answer(h, text)
        elif opts.action == "uncordon":
            h = self._stub.UncordonHost(
                scheduler_pb2.UncordonHostRequest(host_id=opts.id), timeout=self._timeout
            )
            text = f"uncordoned {h.host_id} (schedulable: {tables.schedulable(h)})"
            out.answer(h, text)
        elif opts.action == "drain":
            # Each placement is torn down on the host first: allow for many.
            d = self._stub.DrainHost(
                scheduler_pb2.DrainHostRequest(host_id=opts.id, reason=opts.reason),
                timeout=max(self._timeout, 600),
            )
            if out.structured:
                out.message(d)
            else:
                table = tables.drain_table(d)
                if table is not None:
                    out.table(table)
                out.line(tables.drain_summary(d))
            # Non-zero while placements remain, so "drain && forget" stops there.
            return 1 if d.failed else 0
        else:
            f = self._stub.ForgetHost(
                scheduler_pb2.ForgetHostRequest(host_id=opts.id, force=opts.force),
                timeout=self._timeout,
            )
            dropped = f.dropped_placement_ids
            text = f"forgot {f.host_id}" + (
                f"; dropped {len(dropped)} placement(s): {' '.join(dropped)}" if dropped else ""
            )
            out.answer(f, text)
        return 0

    def _placements(self, answer: Any, placements: list[placement_pb2.Placement]) -> None:
        """The scheduler's ``answer`` as a document, or its placements as a table."""
        if self._out.structured:
            self._out.message(answer)
            return
        table = tables.placements_table(placements, wide=self._out.wide)
        if table is None:
            self._out.line("(no placements)")
        else:
            self._out.table(table)


def certs(opts: argparse.Namespace, out: Output) -> int:
    """``tessera certs ca|issue|show|p12``: what was written, or who a directory is."""
    doc: dict[str, Any]
    if opts.action == "ca":
        create_ca(opts.dir, days=opts.days)
        doc = {"ca": str(opts.dir)}
        text = f"created a CA in {opts.dir} (keep {opts.dir / 'ca-key.pem'} offline)"
    elif opts.action == "issue":
        identity = issue(
            opts.ca,
            opts.role,
            opts.name,
            opts.out,
            days=opts.days,
            dns_names=opts.dns,
            ip_addresses=opts.ip,
        )
        doc = {"identity": identity.uri, "dir": str(opts.out)}
        text = f"issued {identity.uri} into {opts.out}"
    elif opts.action == "p12":
        identity = browser_bundle(opts.dir, opts.out, read_password(opts.password_file))
        doc = {"identity": identity.uri, "file": str(opts.out)}
        text = f"wrote {identity.uri} into {opts.out}"
    else:
        material = load_material(opts.dir)
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(material.not_after))
        doc = {"identity": material.identity.uri, "expires": expires}
        text = f"{material.identity.uri} (expires {expires})"
    out.answer(doc, text)
    return 0


def plan(opts: argparse.Namespace, out: Output) -> int:
    """``tessera plan``: a batch placed offline, no store or agents."""
    from tessera.scheduler.core.engine.batch import BatchSettings
    from tessera.scheduler.planning import load_inventories, load_requests, plan_offline

    report = plan_offline(
        load_inventories(opts.hosts),
        load_requests(opts.requests),
        sequential=opts.sequential,
        settings=BatchSettings(time_limit_s=opts.time_limit, workers=opts.workers, seed=opts.seed),
    )
    if out.structured:
        out.document(report.to_json())
        return 0
    table = tables.placements_table(report.placements, wide=out.wide)
    out.table(table) if table is not None else out.line("(no placements)")
    for rid, reasons in report.unplaced:
        out.line(f"unplaced {rid}: {reasons[0]}")
        for reason in reasons[1:]:
            out.line(f"  {reason}")
    r = report.result
    out.line(
        f"{len(report.placements)} placed, {len(report.unplaced)} unplaced; solver {r.status}, "
        f"objective {r.objective} (bound {r.bound}, greedy {r.greedy_objective}), "
        f"{r.columns} columns{'' if r.solved else ' (no model)'}, {r.wall_s:.2f}s"
    )
    return 0
