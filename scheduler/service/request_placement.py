"""One request placed: claim its id, plan on the live model, commit, replan on a lost race.

Losing a commit race means planning again on fresher state, a bounded number
of times; the plan applier (:mod:`scheduler.service.plan_applier`) does the
commit and has the host carry the placement out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from tessera.scheduler.core.engine.fastpath import Engine
from tessera.scheduler.core.engine.policies import Policy
from tessera.scheduler.core.plan import Plan, Unschedulable
from tessera.scheduler.core.request import PlacementRequest
from tessera.scheduler.service.cluster_model import LiveCluster
from tessera.scheduler.service.convert import Submitted
from tessera.scheduler.service.errors import ContentionError, NoCapacityError
from tessera.scheduler.service.model_refresh import ModelRefresh
from tessera.scheduler.service.plan_applier import PlanApplier
from tessera.scheduler.service.request_claims import RequestClaims, new_claimant
from tessera.scheduler.store.redis_store import CommitOutcome, StoreError
from tessera.v1 import placement_pb2

log = logging.getLogger(__name__)

#: Commit attempts before giving up with ABORTED. Each lost race means
#: another placement landed on the chosen host; replanning sees it.
MAX_COMMIT_ATTEMPTS = 16


class RequestPlacer:
    """Places one request at a time, and explains where one would go.

    Args:
        model: the replica's live model of the cluster.
        refresh: brings the model up to date before each plan.
        claims: the request-id claims.
        applier: commits plans and has hosts carry them out.
        policy: how Place chooses.
        engine: the placement engine, for Explain.
    """

    def __init__(
        self,
        model: LiveCluster,
        *,
        refresh: ModelRefresh,
        claims: RequestClaims,
        applier: PlanApplier,
        policy: Policy,
        engine: Engine,
    ) -> None:
        self._model = model
        self._refresh = refresh
        self._claims = claims
        self._applier = applier
        self._policy = policy
        self._engine = engine

    async def explain(self, request: PlacementRequest) -> Plan | Unschedulable:
        """Dry run: the plan the request would get now, or why it cannot be placed."""
        await self._refresh.refreshed()
        return self._engine.schedule(self._model.live(), request, explain=True)

    async def place(self, submitted: Submitted) -> placement_pb2.Placement:
        """Place one request and have its host carry it out.

        Idempotent on request_id: a retry gets the placement the first call made.

        Raises:
            RequestIdReusedError: the request_id belongs to another request.
            NoCapacityError: no host can take it.
            ContentionError: every commit lost a race.
            HostOperationError: the agent failed; the reservation is released.
        """
        claimant = new_claimant()
        # The model is brought up to date while the claim is taken: two
        # round trips side by side rather than one after the other.
        refreshed = asyncio.ensure_future(self._refresh.refreshed())
        claiming = asyncio.ensure_future(self._claims.claim(submitted, claimant))
        try:
            existing = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            _drop(refreshed)
            # The claim may be taken on the server all the same (it was sent,
            # or goes with its batch): once it has answered, free it, or every
            # retry of the request is told it is busy until its deadline.
            await asyncio.shield(self._abandon_when_claimed(claiming, submitted, claimant))
            raise
        except BaseException:
            _drop(refreshed)
            raise
        if existing is not None:
            _drop(refreshed)
            return existing
        return await self.place_claimed(submitted, claimant, refreshed)

    async def _abandon_when_claimed(
        self,
        claiming: asyncio.Future[placement_pb2.Placement | None],
        submitted: Submitted,
        claimant: str,
    ) -> None:
        """Free the claim of a call that went away, once the claim has answered."""
        try:
            existing = await claiming
        except Exception:  # refused, or its outcome unknown: left to its deadline
            return
        if existing is None:
            await self._claims.abandon(submitted, claimant)

    async def place_claimed(
        self,
        submitted: Submitted,
        claimant: str,
        refreshed: Awaitable[None] | None = None,
    ) -> placement_pb2.Placement:
        """Plan and commit a request this call has claimed, replanning on lost races.

        Args:
            submitted: the request.
            claimant: this call's claim on its id.
            refreshed: a refresh of the model begun after the call began, for
                the first plan (else one is made).
        """
        try:
            for attempt in range(MAX_COMMIT_ATTEMPTS):
                await (refreshed if refreshed is not None else self._refresh.refreshed())
                refreshed = None
                # Planned without yielding: the live model cannot move under it.
                live = self._model.live()
                result = self._policy.place(live, submitted.request)
                if isinstance(result, Unschedulable):
                    raise NoCapacityError(result.summary, result.reasons())
                record = self._model.record(result.host_id)
                if record is None:  # the engine only plans on hosts the model holds
                    raise StoreError(f"host {result.host_id} planned on but not in the model")
                state = live.hosts[result.host_id]
                commit, placement = await self._applier.commit(submitted, result, claimant, state)
                if commit.outcome is CommitOutcome.COMMITTED:
                    return await self._applier.prepare(placement, record)
                if commit.outcome is CommitOutcome.CONFLICT:
                    # The model is behind the store on this host (or the
                    # store lost it): read it again before the next plan.
                    self._model.mark_stale(result.host_id)
                if commit.outcome is CommitOutcome.LOST:
                    # This call stalled past its claim's deadline and another
                    # took the request over: answer as it does, or claim again.
                    existing = await self._claims.claim(submitted, claimant)
                    if existing is not None:
                        return existing
                log.debug("commit attempt %d lost: %s", attempt + 1, commit.detail)
                # Back off a little so racing replicas do not replan in lockstep.
                await asyncio.sleep(0.002 * (attempt + 1))
            raise ContentionError(
                f"the cluster changed under {MAX_COMMIT_ATTEMPTS} commit attempts; "
                "retry the request"
            )
        except asyncio.CancelledError:
            # The caller went away. A commit it sent has answered by now (the
            # plan applier waits for it, and releases one that landed): a
            # claim still this call's, with nothing committed, is freed.
            await asyncio.shield(self._claims.abandon(submitted, claimant))
            raise
        except (NoCapacityError, ContentionError):
            # Every commit of this call answered, and none landed: the id is
            # free for a retry now rather than once the claim expires. After
            # any other error a commit may have landed; the claim stays for
            # the next caller or the housekeeper to resolve.
            await self._claims.abandon(submitted, claimant)
            raise


def _drop(refreshed: asyncio.Future[None]) -> None:
    """Give up on a refresh nobody will wait for (its round goes on for others)."""
    refreshed.cancel()
    # Finished already, perhaps with an error: seen, so asyncio does not log it.
    refreshed.add_done_callback(lambda f: None if f.cancelled() else f.exception())
