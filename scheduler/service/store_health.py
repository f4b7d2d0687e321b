"""Serve NOT_SERVING while the state store does not answer.

Every call the scheduler serves reads or writes the store, so while the store
is down, frozen or refusing us (a changed password), the scheduler cannot do
its job. Its gRPC health must say so: a load balancer or orchestrator then
sends callers to another replica instead of letting them wait for
UNAVAILABLE. :class:`StoreHealthWatcher` PINGs the store every couple of
seconds with a short timeout (a frozen store accepts connections and never
answers: only a timeout tells) and flips every health service name between
SERVING and NOT_SERVING, logging each transition once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from tessera.scheduler.store.safety import cluster_info_field, node_client, sentinel_pool

log = logging.getLogger("tessera.scheduler.store_health")


class HealthStatusSetter(Protocol):
    """What the watcher needs of grpc_health's ``HealthServicer``."""

    async def set(self, service: str, status: int) -> None:
        """Set the serving status of ``service`` (``""`` is the whole server)."""


class StoreHealthWatcher:
    """PINGs the store and mirrors the outcome in the gRPC health service.

    The server starts SERVING (the store was checked before it started), so
    the watcher starts from there and only acts on a change.

    Args:
        client: the scheduler's store client; the watcher probes through a
            client of its own with the same connection settings.
        health: the server's health servicer.
        names: every service name to flip, ``""`` (the server) included.
        interval_s: seconds between probes.
        timeout_s: how long one PING may take before the store counts as
            unreachable.
    """

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        health: HealthStatusSetter,
        names: Sequence[str],
        *,
        interval_s: float = 2.0,
        timeout_s: float = 1.0,
    ) -> None:
        # A client of its own, on the same server with the same credentials
        # and TLS: a probe must not wait for a connection of the busy pool,
        # and must fail at once (no retries) so the log says why, not only
        # "no answer". Of a cluster, its default node (the one it was given).
        # Of a cluster, the node it was given: it must also say the cluster
        # is whole (every slot served), or the store counts as down.
        self._cluster = isinstance(client, RedisCluster)
        if isinstance(client, RedisCluster):
            client = node_client(client.get_default_node())
        pool = client.connection_pool
        # Behind Sentinel: asked on every probe where the primary is, so that
        # connections to a primary since replaced (a planned failover leaves
        # it accepting writes until Sentinel demotes it) are dropped within
        # one interval, not whenever they next fail.
        self._sentinel_pool = sentinel_pool(client)
        self._client = aioredis.Redis(
            connection_pool=aioredis.ConnectionPool(
                connection_class=pool.connection_class,
                max_connections=2,
                **{
                    **pool.connection_kwargs,
                    "retry": Retry(NoBackoff(), 0),
                    "socket_connect_timeout": timeout_s,
                    "socket_timeout": timeout_s,
                },
            )
        )
        self._health = health
        self._names = tuple(names)
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._serving = True
        self._problem: str | None = None

    @property
    def serving(self) -> bool:
        """Whether the last probe found the store answering."""
        return self._serving

    @property
    def problem(self) -> str | None:
        """Why the last probe found the store unusable; None when it answered."""
        return self._problem

    async def probe(self) -> str | None:
        """PING the store once.

        Returns:
            None if it answered in time, else why not (for the log).
        """
        if self._sentinel_pool is not None:
            try:
                async with asyncio.timeout(self._timeout_s):
                    # redis-py's Sentinel pool has no type hints.
                    await self._sentinel_pool.get_master_address()  # type: ignore[no-untyped-call]
            except (TimeoutError, RedisError, OSError) as err:
                # The primary may still answer: the PING below decides health.
                log.debug("the Sentinels did not say where the primary is: %s", err)
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.ping()
                if self._cluster:
                    info: Any = await self._client.cluster("INFO")
                    state = cluster_info_field(info, "cluster_state")
                    if state != "ok":
                        return f"the cluster's state is {state or 'unknown'}, not ok"
        except TimeoutError:
            return f"no answer to PING within {self._timeout_s:g} s"
        except (RedisError, OSError) as err:
            return " ".join(str(err).split()) or type(err).__name__
        return None

    async def _set(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            await self._health.set(name, status)
        self._serving = serving

    async def check(self) -> None:
        """Probe once and flip the health status if it changed."""
        problem = await self.probe()
        self._problem = problem
        # Each flip carries its state: the log's repeat filter never holds a
        # change of state back, however often the store comes and goes.
        if problem is None and not self._serving:
            await self._set(True)
            log.warning("the store answers again: health is SERVING", extra={"state": "SERVING"})
        elif problem is not None and self._serving:
            await self._set(False)
            log.error(
                "the store is unusable (%s): health is NOT_SERVING",
                problem,
                extra={"state": "NOT_SERVING", "reason": problem},
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Probe every ``interval_s`` until ``stop`` is set, then close.

        Args:
            stop: set when the server shuts down; the caller then sets the
                final NOT_SERVING itself.
        """
        try:
            while not stop.is_set():
                await self.check()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._interval_s)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the probe's connections (``run`` does it when it ends)."""
        await self._client.aclose(close_connection_pool=True)
