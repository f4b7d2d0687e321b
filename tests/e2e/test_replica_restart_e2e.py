"""A scheduler replica killed and started again while tenants place and release.

Eight client threads place (whole GPUs, VFs, mdevs) and release through two
scheduler replicas on one Valkey; each keeps what it got READY for a moment,
then releases it. Mid-run the replica holding the reaper lease is killed with
SIGKILL and, a few seconds later, started again under its name and on its
port: it rebuilds its live model from the store's change feed. The dead
leader's lease runs out and the housekeeper begins a new term on one of the
replicas (a full reconcile of every host); all of it under load, while the
agents go on heartbeating to the other replica (so the reconciler also
revisits every host whose inventory the load changes, round after round).

The acceptance point it guards: an outside audit never sees an acknowledged
READY placement turn PENDING, and no tenant's Release of a placement it holds
READY is refused. The reconciler once took a placement being prepared for a
lost one: READY flipped back to PENDING for 0.5-3 s ("prepared ... again: the
host had lost it") and its tenant's Release was refused ABORTED ("is
pending") meanwhile. Two independent witnesses look for it:

* a watcher thread reads every host's ``placement_states`` hash with a plain
  redis client every 20 ms and checks that each placement a client holds
  READY (and has not begun to release) is ``ready`` there;
* every client Release of a placement it holds must succeed. A call the killed
  replica never answered (UNAVAILABLE while it is down) is retried on the
  other replica, and so is one that timed out; as either may have begun the
  release, a retry that finds it already gone (NOT_FOUND) or still being
  finished (ABORTED "releasing", waited out) has succeeded too. Anything else,
  ABORTED "pending" first of all, is a refusal. (A Place the dead replica does
  not answer is not retried: the client's next request goes to the other
  replica, and the reaper frees whatever the dead one left PENDING.)

Placements must come back READY in every phase (both replicas before the
kill, the survivor alone, each replica after the restart, the new reaper
term) for the test to prove anything. Then the clients stop, the independent
auditor must find store and hosts clean (placements stranded by the kill
reaped), everything is released and nothing may be left.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from tessera.scheduler.local_cluster import LocalCluster
from tessera.scheduler.store import schema
from tessera.v1 import placement_pb2, scheduler_pb2, scheduler_pb2_grpc

from .auditor import audit, read_store
from .test_store_crash_e2e import CONVERGE_S, HOSTS, SCHEDULER_FLAGS, wait_clean
from .test_store_crash_e2e import request as placement_request

CLIENTS = 8
#: A client releases its oldest placement once it holds this many ...
MAX_HELD = 3
#: ... or once it held it this long (seconds, drawn per placement).
HOLD_S = (0.2, 0.8)
#: How often the watcher reads the store: well under the 0.5 s the bug lasted.
WATCH_EVERY_S = 0.02
BEFORE_KILL_S = 5.0
#: The survivor serves alone this long (plus the restart's own seconds); the
#: dead leader's 10 s lease then runs out about when the victim is back.
DOWN_S = 4.0
#: Load after the new reaper term began: its full reconcile runs under it.
NEW_TERM_S = 5.0
#: Load on both replicas again after the restart.
BOTH_AGAIN_S = 5.0
#: Bound on the wait for the new term: the dead leader's lease (10 s) runs out
#: and a replica's next round (1 s) takes it.
NEW_TERM_WITHIN_S = 30.0
#: Bound on settling one Release: a release the killed replica began sits
#: RELEASING until the new leader's reaper finishes it (10 s lease, 6 s patience).
RELEASE_SETTLE_S = 30.0
RPC_TIMEOUT_S = 10.0
#: The replica killed and restarted: started first, so it holds the reaper lease.
VICTIM = "scheduler-0"
JOB = schema.BACKGROUND_JOB


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, list[str]]]:
    with LocalCluster(tmp_path_factory.mktemp("restart")) as c:
        c.start_valkey(appendfsync="always")
        addresses = [c.start_scheduler(VICTIM, *SCHEDULER_FLAGS)]
        # The victim must lead, so that its death moves the reaper lease:
        # it takes the lease before the second replica exists.
        wait_for_lease(c.redis_url, 15)
        addresses.append(c.start_scheduler("scheduler-1", *SCHEDULER_FLAGS))
        # Agents know one registry by address; on the survivor, their
        # heartbeats (and the reconciles a changed inventory triggers) go on
        # through the outage. Each would otherwise wait out its channel's
        # reconnect backoff after the restart, its host lease (20 s) at risk.
        c.scheduler_address = addresses[1]
        for host_id, fixture in HOSTS.items():
            c.start_agent(host_id, c.build_fake_host(fixture, host_id))
        c.wait_for_hosts(set(HOSTS))
        yield c, addresses


# -- the reaper lease --------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One term of the reaper lease: who holds it, under which fencing token."""

    owner: str
    token: int


def lease_term(client: redis.Redis) -> Term | None:
    """The current reaper term as the store has it (None: nobody holds the lease)."""
    value = client.get(schema.lease(JOB))
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    owner, token = text.rsplit(" ", 1)
    return Term(owner, int(token))


def wait_for_lease(redis_url: str, timeout_s: float) -> Term:
    """Block until some replica holds the reaper lease."""
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        while (term := lease_term(client)) is None:
            assert time.monotonic() < deadline, f"no replica took the reaper lease in {timeout_s}s"
            time.sleep(0.1)
        return term
    finally:
        client.close()


def wait_for_new_term(client: redis.Redis, after: Term, timeout_s: float) -> Term:
    """Block until a replica holds the lease under a larger token than ``after``."""
    deadline = time.monotonic() + timeout_s
    while True:
        term = lease_term(client)
        if term is not None and term.token > after.token:
            return term
        assert time.monotonic() < deadline, (
            f"the reaper lease did not move in {timeout_s}s after its holder died "
            f"(before {after}, now {term})"
        )
        time.sleep(0.1)


def restart_scheduler(c: LocalCluster, name: str, address: str) -> str:
    """Start a killed replica again under its name, on its port.

    The same port, because the agents know their registry by address only.
    ``--listen`` given again overrides the free port ``start_scheduler`` asks
    for (the last one wins).
    """
    assert c.processes[name].poll() is not None, f"{name} is still running"
    port = address.rsplit(":", 1)[1]
    again = c.start_scheduler(name, *SCHEDULER_FLAGS, "--listen", f"127.0.0.1:{port}")
    assert again == address, f"{name} came back at {again}, not {address}"
    return again


# -- the tenants ------------------------------------------------------------------


@dataclass(eq=False)
class Route:
    """A client's way to one replica; ``alive`` False once the test killed it."""

    replica: str
    channel: grpc.Channel
    stub: scheduler_pb2_grpc.SchedulerStub
    alive: bool = True


@dataclass(frozen=True)
class Refusal:
    """A Release of a placement the client held READY that did not succeed."""

    at_s: float
    placement_id: str
    code: str
    detail: str


class Load:
    """Client threads placing and releasing through the replicas until stopped.

    ``held`` is the contract with the watcher: a placement is in it from the
    moment its Place answered READY until just before its Release is sent.

    Args:
        c: the cluster.
        addresses: the replicas' addresses; the i-th is ``scheduler-<i>``.
    """

    def __init__(self, c: LocalCluster, addresses: list[str]) -> None:
        self._c = c
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.held: dict[str, float] = {}  # placement id -> when READY came back
        self.acks: list[tuple[float, str]] = []  # (when READY came back, through which replica)
        self.codes: Counter[str] = Counter()
        self.refusals: list[Refusal] = []
        self.finished_elsewhere = 0  # releases an earlier, unanswered call had done
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.routes = [self._route(f"scheduler-{i}", a) for i, a in enumerate(addresses)]
        self._old_routes: list[Route] = []
        self._threads = [threading.Thread(target=self._run, args=(k,)) for k in range(CLIENTS)]

    def _route(self, replica: str, address: str) -> Route:
        channel = self._c.channel(address)
        return Route(replica, channel, scheduler_pb2_grpc.SchedulerStub(channel))

    def now(self) -> float:
        """Seconds since the load began."""
        return time.monotonic() - self.t0

    def killing(self, replica: str) -> None:
        """Say ``replica`` is about to die: its unanswered calls are not refusals."""
        for route in self.routes:
            if route.replica == replica:
                route.alive = False

    def restarted(self, replica: str, address: str) -> None:
        """Reach a restarted replica on a fresh channel.

        The old channel would wait out its reconnect backoff first; calls
        still on it fail as calls to the dead replica.
        """
        for i, route in enumerate(self.routes):
            if route.replica == replica:
                self._old_routes.append(route)
                self.routes[i] = self._route(replica, address)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join()

    def close(self) -> None:
        for route in [*self.routes, *self._old_routes]:
            route.channel.close()

    def held_ids(self) -> set[str]:
        with self.lock:
            return set(self.held)

    def made(self, replica: str = "", after: float = 0.0, before: float = float("inf")) -> int:
        """READY placements answered in ``[after, before)`` (through ``replica``)."""
        with self.lock:
            return sum(
                1 for t, r in self.acks if after <= t < before and (not replica or r == replica)
            )

    def _run(self, k: int) -> None:
        rng = random.Random(k)
        mine: deque[tuple[str, float]] = deque()  # (placement id, release after)
        n = 0
        try:
            while not self.stop.is_set():
                n += 1
                first = (n + k) % len(self.routes)  # alternate between the replicas
                if mine and (len(mine) >= MAX_HELD or mine[0][1] <= time.monotonic()):
                    pid, _ = mine.popleft()
                    with self.lock:
                        # Before the call: from here on RELEASING or gone is
                        # what the watcher would rightly see.
                        del self.held[pid]
                    self.release(pid, first)
                    continue
                placed = self.place(f"restart-{k}-{n}", rng, first)
                if placed is None:
                    time.sleep(0.05)  # full, or that replica is down: no busy loop
                else:
                    mine.append((placed, time.monotonic() + rng.uniform(*HOLD_S)))
        except Exception as err:  # a crashed client thread must fail the test, not vanish
            with self.lock:
                self.errors.append(f"client {k}: {err!r}")

    def place(self, rid: str, rng: random.Random, first: int) -> str | None:
        """One Place; the placement id if it came back READY."""
        route = self.routes[first]
        try:
            answer = route.stub.Place(
                scheduler_pb2.PlaceRequest(request=placement_request(rid, rng)),
                timeout=RPC_TIMEOUT_S,
            )
        except grpc.RpcError as err:
            with self.lock:
                self.codes[f"place/{err.code().name}{'' if route.alive else ' (killed)'}"] += 1
            return None
        placement = answer.placement
        with self.lock:
            if placement.state != placement_pb2.PLACEMENT_STATE_READY:
                self.codes[f"place/OK {placement_pb2.PlacementState.Name(placement.state)}"] += 1
                return None
            self.codes["place/OK"] += 1
            self.acks.append((self.now(), route.replica))
            self.held[placement.placement_id] = time.monotonic()
        return placement.placement_id

    def release(self, pid: str, first: int) -> None:
        """Release a placement the client held READY; record it if that fails.

        A call the killed replica did not answer, or one that timed out, may
        have begun the release: it is retried on the next replica, and from
        then on NOT_FOUND (done) or ABORTED "releasing" (being finished: wait)
        are answers to that earlier call, not refusals.
        """
        deadline = time.monotonic() + RELEASE_SETTLE_S
        began_maybe = False
        attempt = 0
        while True:
            route = self.routes[(first + attempt) % len(self.routes)]
            attempt += 1
            try:
                route.stub.Release(
                    scheduler_pb2.ReleaseRequest(placement_id=pid), timeout=RPC_TIMEOUT_S
                )
                with self.lock:
                    self.codes["release/OK"] += 1
                return
            except grpc.RpcError as err:
                code, detail = err.code(), err.details() or ""
            unanswered = code == grpc.StatusCode.UNAVAILABLE and not route.alive
            with self.lock:
                self.codes[f"release/{code.name}{' (killed)' if unanswered else ''}"] += 1
            settling = time.monotonic() < deadline
            if (unanswered or code == grpc.StatusCode.DEADLINE_EXCEEDED) and settling:
                began_maybe = True
                continue
            if began_maybe and code == grpc.StatusCode.NOT_FOUND:
                with self.lock:
                    self.finished_elsewhere += 1
                return
            finishing = code == grpc.StatusCode.ABORTED and "releasing" in detail
            if began_maybe and finishing and settling:
                time.sleep(0.2)  # the reaper finishes it once a new term begins
                continue
            with self.lock:
                self.refusals.append(Refusal(self.now(), pid, code.name, detail))
            return


# -- the outside watcher ----------------------------------------------------------


@dataclass
class Sighting:
    """A held placement seen in a state other than ready, first and last seen."""

    placement_id: str
    state: str
    first_s: float
    last_s: float


class Watcher(threading.Thread):
    """Reads the store from outside every ``WATCH_EVERY_S``: held means ready.

    A placement a client holds READY must read ``ready`` in its host's
    ``placement_states`` hash; ``pending`` is the bug this test guards, any
    other state (or none) a loss. A placement whose release began while the
    store was being read is not judged (the client's Release is).
    """

    def __init__(self, redis_url: str, load: Load) -> None:
        super().__init__(name="watcher")
        self._redis_url = redis_url
        self._load = load
        self.stop = threading.Event()
        self.polls = 0
        self.checks = 0
        self.sightings: dict[tuple[str, str], Sighting] = {}
        self.errors: list[str] = []

    def run(self) -> None:
        client = redis.Redis.from_url(self._redis_url, decode_responses=True)
        hosts = sorted(HOSTS)
        try:
            while not self.stop.is_set():
                with self._load.lock:
                    watched = set(self._load.held)
                pipe = client.pipeline(transaction=False)
                for h in hosts:
                    pipe.hgetall(schema.placement_states(h))
                states: dict[str, str] = {}
                for found in pipe.execute():
                    states.update(found)
                at = self._load.now()
                with self._load.lock:
                    # Still held after the read: its Release was not sent
                    # before the read, so ready is the only right answer.
                    judged = watched & self._load.held.keys()
                self.polls += 1
                self.checks += len(judged)
                for pid in judged:
                    state = states.get(pid, "(gone)")
                    if state != "ready":
                        seen = self.sightings.setdefault((pid, state), Sighting(pid, state, at, at))
                        seen.last_s = at
                time.sleep(WATCH_EVERY_S)
        except Exception as err:  # the watcher going blind must fail the test
            self.errors.append(repr(err))
        finally:
            client.close()

    def flips(self, state: str) -> list[Sighting]:
        """Sightings of held placements in ``state``, in time order."""
        return sorted(
            (s for s in self.sightings.values() if s.state == state), key=lambda s: s.first_s
        )

    def losses(self) -> list[Sighting]:
        """Sightings of held placements neither ready nor pending."""
        return sorted(
            (s for s in self.sightings.values() if s.state != "pending"), key=lambda s: s.first_s
        )


# -- the test ---------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_replica_killed_and_restarted_never_unreadies_a_held_placement_nor_refuses_its_release(
    cluster: tuple[LocalCluster, list[str]],
) -> None:
    c, addresses = cluster
    survivor = "scheduler-1"
    roots: dict[str, Path] = {h: c.workdir / "hosts" / h for h in HOSTS}
    store = redis.Redis.from_url(c.redis_url)
    load = Load(c, addresses)
    watcher = Watcher(c.redis_url, load)
    watcher.start()
    load.start()
    try:
        time.sleep(BEFORE_KILL_S)  # load on both replicas; the victim leads
        before = lease_term(store)
        assert before is not None, "nobody held the reaper lease before the kill"
        load.killing(VICTIM)
        killed_at = load.now()
        c.kill(VICTIM)
        time.sleep(DOWN_S)  # calls to the dead replica fail; the survivor serves
        restart_scheduler(c, VICTIM, addresses[0])
        load.restarted(VICTIM, addresses[0])
        restarted_at = load.now()
        # The dead leader's lease runs out (before or after the restart);
        # whichever replica takes it begins a new term with a full reconcile
        # of every host. Both replicas and the new term get load for a while.
        after = wait_for_new_term(store, before, NEW_TERM_WITHIN_S)
        new_term_at = load.now()
        time.sleep(max(new_term_at + NEW_TERM_S, restarted_at + BOTH_AGAIN_S) - load.now())
    finally:
        load.join()
        watcher.stop.set()
        watcher.join()
    load_s = load.now()

    try:
        held = load.held_ids()
        # Placements the kill stranded PENDING or RELEASING reaped, store and
        # hosts agreeing, nothing the clients hold lost (judged below, after
        # what this test is about).
        converged, took = wait_clean(c, roots, held, CONVERGE_S)
        # The tenants release what they still hold (judged like any Release),
        # then the store's leftovers: placements the killed replica made READY
        # but never answered for.
        for pid in sorted(held):
            load.release(pid, 1)
        leftovers = read_store(store).placement_ids() - held
        cleanup_refusals: list[str] = []
        for pid in sorted(leftovers):
            try:
                load.routes[1].stub.Release(
                    scheduler_pb2.ReleaseRequest(placement_id=pid), timeout=RPC_TIMEOUT_S
                )
            except grpc.RpcError as err:
                cleanup_refusals.append(f"{pid}: {err.code().name} {err.details()}")
        final = audit(c.redis_url, roots, check_hosts=True, final=True)
    finally:
        load.close()
        store.close()

    made = {
        "before the kill": load.made(before=killed_at),
        f"before the kill via {VICTIM}": load.made(VICTIM, before=killed_at),
        f"survivor alone via {survivor}": load.made(survivor, killed_at, restarted_at),
        f"after the restart via {VICTIM}": load.made(VICTIM, after=restarted_at),
        f"after the restart via {survivor}": load.made(survivor, after=restarted_at),
        "in the new reaper term": load.made(after=new_term_at),
    }
    log_errors = scheduler_log_errors(c)
    print(
        f"load {load_s:.1f}s: kill at {killed_at:.1f}s, restart at {restarted_at:.1f}s, "
        f"reaper term {before.token} -> {after.token} at {new_term_at:.1f}s; "
        f"READY placements {made}; codes {dict(sorted(load.codes.items()))}; "
        f"releases done by an unanswered call {load.finished_elsewhere}; "
        f"watcher {watcher.polls} polls, {watcher.checks} checks; "
        f"converged in {took:.1f}s ({converged.clean}); leftovers released {len(leftovers)}; "
        f"scheduler log errors {len(log_errors)}"
    )
    for line in log_errors[:20]:
        print(f"  {line}")

    assert not load.errors and not watcher.errors, load.errors + watcher.errors
    flipped = watcher.flips("pending")
    assert not flipped, f"acknowledged READY placements seen PENDING by the watcher: {flipped}"
    lost = watcher.losses()
    assert not lost, f"acknowledged READY placements seen neither ready nor pending: {lost}"
    assert not load.refusals, f"Releases of placements held READY refused: {load.refusals}"
    assert not cleanup_refusals, f"leftover placements not released: {cleanup_refusals}"
    # Enough happened in every phase for the above to mean something.
    assert all(made.values()), f"a phase made no READY placement: {made}"
    assert watcher.checks > 0, "the watcher judged nothing"
    # And the cluster is whole: converged after the load, empty after releasing.
    assert converged.clean, converged.text()
    assert not converged.states.get("pending") and not converged.states.get("releasing"), (
        converged.text()
    )
    assert final.clean, final.text()


def scheduler_log_errors(c: LocalCluster) -> list[str]:
    """Lines of the schedulers' logs at ERROR or worse, or part of a traceback."""
    found: list[str] = []
    for log in sorted((c.workdir / "logs").glob("scheduler-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
                found.append(f"{log.name}: {line}")
    return found
