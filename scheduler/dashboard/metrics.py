"""``/metrics``: the scheduler's figures in Prometheus's text format.

Counted as they happen: placements by outcome and form, and the Place
latency histogram (the servicer reports each call, see :meth:`observe_place`).
Read when scraped, from the objects that already keep them: commit outcomes
(the plan applier), agent call errors (the agent gateway), the model's feed
age and resyncs, and each host's capacity and fragmentation (the dashboard's
tiles, derived once per host state, kept as text: :class:`HostSeries`). Every
metric is listed in the README.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import Counter as CounterMetric
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from tessera.scheduler.dashboard.cluster_view import ClusterView
from tessera.scheduler.dashboard.fleet import FORMS, HostTile
from tessera.scheduler.service.cluster_model import ModelStats

#: Place latency buckets, in seconds: a placement takes milliseconds to
#: commit and up to the agent's deadline (30 s) to prepare.
PLACE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class SchedulerMetrics:
    """The scheduler's metrics, in a registry of their own.

    Args:
        view: the cluster as the dashboard reads it (per-host figures).
        commits: commit outcomes so far, by name.
        agent_errors: failed agent calls so far, by (method, status code).
        model: the live model's counters.
        clock_ms: current time in ms (the feed age).
    """

    def __init__(
        self,
        view: ClusterView,
        *,
        commits: Callable[[], Counter[str]],
        agent_errors: Callable[[], Counter[tuple[str, str]]],
        model: Callable[[], ModelStats],
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._view = view
        # A *_created series per counter would double what Prometheus stores
        # for a timestamp it does not use (a process-wide switch).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self._placements = CounterMetric(
            "tessera_placements",
            "Place calls by outcome (the gRPC status code) and form of the devices placed.",
            ["outcome", "form"],
            registry=self.registry,
        )
        self._place_seconds = Histogram(
            "tessera_place_seconds",
            "Time to answer a Place call, from request to placement or refusal.",
            ["outcome"],
            buckets=PLACE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(commits, agent_errors, model, clock_ms))
        self._hosts = HostSeries()

    def observe_place(self, seconds: float, outcome: str, form: str) -> None:
        """Count one Place call: its status code name and the form it placed ("" if none)."""
        self._placements.labels(outcome=outcome, form=form or "none").inc()
        self._place_seconds.labels(outcome=outcome).observe(seconds)

    async def render(self) -> tuple[bytes, str]:
        """The text exposition, and its content type (the model brought up to date first)."""
        tiles, stranded = await self._view.tiles()
        hosts = self._hosts.text(tiles, stranded)
        return generate_latest(self.registry) + hosts.encode(), CONTENT_TYPE_LATEST


class _LiveCollector(Collector):
    """Figures read at scrape time from the objects that keep them."""

    def __init__(
        self,
        commits: Callable[[], Counter[str]],
        agent_errors: Callable[[], Counter[tuple[str, str]]],
        model: Callable[[], ModelStats],
        clock_ms: Callable[[], int],
    ) -> None:
        self._commits = commits
        self._agent_errors = agent_errors
        self._model = model
        self._clock_ms = clock_ms

    def collect(self) -> Iterator[Metric]:
        commits = CounterMetricFamily(
            "tessera_commits",
            "Reservation commits by outcome: COMMITTED, CONFLICT (the store moved on: "
            "planned again), LOST, ...",
            labels=["outcome"],
        )
        for outcome, n in sorted(self._commits().items()):
            commits.add_metric([outcome], n)
        yield commits
        errors = CounterMetricFamily(
            "tessera_agent_call_errors",
            "Failed calls to agents by method and gRPC status code.",
            labels=["method", "code"],
        )
        for (method, code), n in sorted(self._agent_errors().items()):
            errors.add_metric([method, code], n)
        yield errors
        stats = self._model()
        age = GaugeMetricFamily(
            "tessera_feed_age_seconds",
            "Seconds since the model last read the store's change feed (it reads it before "
            "every placement, and every half second while a dashboard page is open).",
        )
        if stats.refreshed_ms:
            age.add_metric([], max(0, self._clock_ms() - stats.refreshed_ms) / 1000)
        yield age
        yield CounterMetricFamily(
            "tessera_model_resyncs", "Full reads of every host by the model.", value=stats.resyncs
        )
        yield CounterMetricFamily(
            "tessera_model_hosts_reloaded",
            "Hosts read again because the change feed named them.",
            value=stats.hosts_reloaded,
        )


def _label(value: str) -> str:
    """A label value as the text format writes it (backslash, quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


#: The per-host families: name, help, and the lines of one host.
_HOST_FAMILIES: tuple[tuple[str, str, Callable[[HostTile, float], list[str]]], ...] = (
    (
        "tessera_host_devices",
        "Devices a host offers to tenants.",
        lambda t, _: [f'{{host="{_label(t.host_id)}"}} {t.devices}'],
    ),
    (
        "tessera_host_devices_used",
        "Devices of a host in use, in any form or by the host itself.",
        lambda t, _: [f'{{host="{_label(t.host_id)}"}} {t.used}'],
    ),
    (
        "tessera_host_units_held",
        "Units held on a host per form: whole groups, VFs, mdevs, MIG instances.",
        lambda t, _: [
            f'{{host="{_label(t.host_id)}",form="{form}"}} {t.by_form.get(form, 0)}'
            for form in FORMS
        ],
    ),
    (
        "tessera_host_gpu_free",
        "Free GPU capacity of a host, in GPUs.",
        lambda t, _: [f'{{host="{_label(t.host_id)}"}} {t.gpu_free!r}'],
    ),
    (
        "tessera_host_gpu_stranded",
        "Free GPU capacity of a host on GPUs partly in use (fragmentation), in GPUs.",
        lambda t, stranded: [f'{{host="{_label(t.host_id)}"}} {stranded!r}'],
    ),
    (
        "tessera_host_schedulable",
        "1 when new placements may land on a host (lease live, not cordoned).",
        lambda t, _: [
            f'{{host="{_label(t.host_id)}",lease="{t.lease}"}} {1 if t.lease == "live" else 0}'
        ],
    ),
)


class HostSeries:
    """The per-host families in the text format, each host's lines kept until its tile changes.

    At 10,000 hosts these are most of ``/metrics`` (90,000 samples). Written
    through prometheus_client's objects they cost half a second of the event
    loop per scrape; a host's lines only change with its tile (remade when
    its state changes), so they are kept as text and joined.
    """

    def __init__(self) -> None:
        self._kept: dict[str, tuple[HostTile, float, tuple[str, ...]]] = {}

    def text(self, tiles: Sequence[HostTile], stranded: Mapping[str, float]) -> str:
        """Every per-host family, its help and type first."""
        per_host: list[tuple[str, ...]] = []
        kept: dict[str, tuple[HostTile, float, tuple[str, ...]]] = {}
        for tile in tiles:
            share = stranded.get(tile.host_id, 0.0)
            found = self._kept.get(tile.host_id)
            if found is None or found[0] is not tile or found[1] != share:
                lines = tuple(
                    "".join(f"{name}{line}\n" for line in lines_of(tile, share))
                    for name, _, lines_of in _HOST_FAMILIES
                )
                found = (tile, share, lines)
            kept[tile.host_id] = found
            per_host.append(found[2])
        self._kept = kept
        out: list[str] = []
        for i, (name, help_text, _) in enumerate(_HOST_FAMILIES):
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
            out.extend(lines[i] for lines in per_host)
        return "".join(out)
