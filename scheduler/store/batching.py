"""Scripts (and reads) called in one turn of the event loop go to the server in one pipeline.

A replica under load has tens of calls in flight, each a Lua script of its
own (a claim, a commit, a lifecycle move). Sent one by one, most of their
cost is the client's, per command: taking a connection, writing, waiting,
reading. Batched the way ioredis's auto-pipelining does it, the calls made
while the event loop runs its ready callbacks leave together on one
connection when that turn ends, and each caller gets its own reply or
error. Nothing waits for a batch to fill: a call made while nothing else is
under way goes out at once, alone. Once :data:`MAX_IN_FLIGHT` sends are under
way, later calls wait for one of them to answer and leave together (a turn
under load holds only a few calls: batches of 7 on average, 20 this way,
each call's share of a send's cost smaller).

Plain commands (the reads that go with them: a request's record, a
placement's payload) are batched the same way. Each script still runs
atomically on the server. The calls of one send run
in the order called; two sends under way at once (each on its own
connection) may run in either order, so a caller that needs its write after
another's waits for that one's answer first (the plan applier does). A
pipeline is not a transaction: one failing script does not undo another.
A call whose caller is cancelled after making it is sent all the same (as a
command already written would be): callers that must know the outcome of a
write shield it, as the plan applier does for commits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

#: Most scripts in one pipeline: a bigger turn's calls go in several.
MAX_BATCH = 256

#: Sends under way at once before further calls wait for one to answer.
MAX_IN_FLIGHT = 2

#: (script, keys, args, future); a plain command has no script and its
#: words as args.
_Call = tuple[AsyncScript | None, Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    """Runs scripts for many callers, each turn's calls in one pipeline.

    Args:
        client: a plain (not cluster) client: a cluster pipeline refuses scripts.
    """

    def __init__(self, client: Redis) -> None:
        self._client = client
        # Typed here: redis-py leaves the plain client's untyped.
        self._execute: Callable[..., Awaitable[Any]] = client.execute_command
        self._queue: list[_Call] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # Sends in progress, kept referenced until done (the loop holds tasks weakly).
        self._sending: set[asyncio.Task[None]] = set()
        # Calls sent alone, not answered yet.
        self._alone = 0
        # A flush is due at the end of this turn.
        self._flush_due = False

    async def run(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run one script with the calls of this turn; its reply, or its error raised.

        With nothing else under way it goes at once, alone: batching pays
        only when calls crowd, and a lone call would otherwise wait a turn.
        """
        return await self._call(script, keys, args)

    async def command(self, *words: Any) -> Any:
        """Run one plain command (``"HGET", key, field``) with the calls of this turn.

        Its reply as the client parses it alone, or its error raised.
        """
        return await self._call(None, (), words)

    async def _call(
        self, script: AsyncScript | None, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Another event loop (a test's): what was under way on the old
            # one will never answer here, and must not hold calls back.
            self._loop, self._queue, self._flush_due = loop, [], False
            self._sending, self._alone = set(), 0
        if not self._queue and not self._sending and not self._alone:
            self._alone += 1
            try:
                return await self._alone_call(script, keys, args)
            finally:
                if self._loop is loop:
                    self._alone -= 1
                    self._schedule()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, future))
        self._schedule()
        return await future

    async def _alone_call(
        self, script: AsyncScript | None, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        if script is None:
            return await self._execute(*args)
        return await script(keys=keys, args=args)

    def _schedule(self) -> None:
        """Flush the queue when this turn ends, unless enough sends are under way.

        While :data:`MAX_IN_FLIGHT` sends are under way, calls wait for one
        of them to answer and then leave together: a replica under load
        sends few big pipelines rather than many of one script each.
        """
        if (
            self._queue
            and not self._flush_due
            and len(self._sending) + self._alone < MAX_IN_FLIGHT
            and self._loop is not None
        ):
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        queue, self._queue = self._queue, []
        loop = asyncio.get_running_loop()
        for start in range(0, len(queue), MAX_BATCH):
            task = loop.create_task(self._send(queue[start : start + MAX_BATCH]))
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._schedule()

    async def _send(self, batch: list[_Call]) -> None:
        try:
            if len(batch) == 1:
                script, keys, args, _ = batch[0]
                replies: list[Any] = [await self._alone_call(script, keys, args)]
            else:
                async with self._client.pipeline(transaction=False) as pipe:
                    for script, keys, args, _ in batch:
                        if script is None:
                            pipe.execute_command(*args)
                            continue
                        # EVALSHA queued as it is, not through the script: a
                        # pipeline told of its scripts asks the server SCRIPT
                        # EXISTS before sending them, a second round trip per
                        # batch. A script the server lacks answers NOSCRIPT
                        # and is run again alone below, which loads it.
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                    replies = list(await pipe.execute(raise_on_error=False))
        except BaseException as err:  # the connection failed: every call gets it
            for *_, future in batch:
                if not future.done():
                    future.set_exception(err if isinstance(err, Exception) else RuntimeError(err))
            if not isinstance(err, Exception):
                raise
            return
        for (script, keys, args, future), first in zip(batch, replies, strict=True):
            answer = first
            if isinstance(answer, NoScriptError) and script is not None and not future.done():
                # The server lost its script cache (a restart or failover
                # between the pipeline's script load and its commands): a
                # script run alone loads it again.
                try:
                    answer = await script(keys=keys, args=args)
                except Exception as err:
                    answer = err
            if future.done():  # its caller went away
                continue
            if isinstance(answer, Exception):
                future.set_exception(answer)
            else:
                future.set_result(answer)
