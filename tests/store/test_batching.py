"""Scripts called in one turn of the event loop share a pipeline; each caller gets its answer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from tessera.scheduler.store.batching import MAX_BATCH, MAX_IN_FLIGHT, ScriptBatcher

from ..conftest import Runner

# Appends its argument to a list and answers the list's length; refuses "bad".
APPEND = """
if ARGV[1] == 'bad' then return redis.error_reply('refused ' .. ARGV[1]) end
redis.call('RPUSH', KEYS[1], ARGV[1])
return redis.call('LLEN', KEYS[1])
"""


def connections_named(url: str, name: str) -> int:
    with redis.Redis.from_url(url) as admin:
        return sum(1 for c in admin.client_list() if c.get("name") == name)


def test_calls_of_one_turn_leave_together_in_call_order_each_with_its_reply(
    valkey_url: str, arun: Runner
) -> None:
    async def body() -> None:
        client = aioredis.Redis.from_url(valkey_url, client_name="batched")
        try:
            await client.delete("order")
            batcher = ScriptBatcher(client)
            append = client.register_script(APPEND)
            replies = await asyncio.gather(
                *(batcher.run(append, keys=["order"], args=[str(i)]) for i in range(50))
            )
            assert sorted(replies) == list(range(1, 51))
            # Fifty callers at once: the first went alone, at once; the other
            # forty-nine, queued behind it, as one pipeline on one connection,
            # in call order (the lone call may run before or after them).
            written = await client.lrange("order", 0, -1)
            assert [w for w in written if w != b"0"] == [str(i).encode() for i in range(1, 50)]
            assert connections_named(valkey_url, "batched") <= 2
        finally:
            await client.aclose()

    arun(body())


def test_a_failing_script_fails_its_own_caller_only(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        batcher = ScriptBatcher(redis_client)
        append = redis_client.register_script(APPEND)
        replies = await asyncio.gather(
            *(batcher.run(append, keys=["l"], args=[a]) for a in ("a", "bad", "b")),
            return_exceptions=True,
        )
        assert sorted([replies[0], replies[2]]) == [1, 2]  # type: ignore[type-var]
        assert isinstance(replies[1], redis.exceptions.ResponseError)
        assert "refused bad" in str(replies[1])

    arun(body())


def test_a_lone_call_and_a_turn_bigger_than_one_batch_both_get_through(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        batcher = ScriptBatcher(redis_client)
        append = redis_client.register_script(APPEND)
        assert await batcher.run(append, keys=["lone"], args=["x"]) == 1
        n = MAX_BATCH * 2 + 3
        replies = await asyncio.gather(
            *(batcher.run(append, keys=["big"], args=[str(i)]) for i in range(n))
        )
        assert sorted(replies) == list(range(1, n + 1))

    arun(body())


def test_a_caller_that_goes_away_leaves_the_others_their_answers(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        batcher = ScriptBatcher(redis_client)
        append = redis_client.register_script(APPEND)
        calls = [
            asyncio.ensure_future(batcher.run(append, keys=["c"], args=[str(i)])) for i in range(3)
        ]
        await asyncio.sleep(0)  # every call is queued for this turn's batch
        calls[1].cancel()
        answered = {await calls[0], await calls[2]}
        with pytest.raises(asyncio.CancelledError):
            await calls[1]
        # Each its own answer (the first went alone, the others as one
        # pipeline: the two sends may run either way round).
        assert len(answered) == 2 and answered <= {1, 2, 3}
        # Sent all the same, as a command already written would have been.
        assert await redis_client.llen("c") == 3

    arun(body())


def test_a_server_that_lost_its_scripts_under_a_batch_still_answers_every_caller(
    valkey_url: str, arun: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart between the pipeline's script load and its commands: NOSCRIPT for all.

    redis-py loads a pipeline's scripts once, outside its retry; the retry on a
    new connection then finds an empty script cache. Emulated at the client's
    boundary with the server: the first send empties the cache and drops.
    """

    async def body() -> None:
        client = aioredis.Redis.from_url(
            valkey_url, retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=6)
        )
        admin = aioredis.Redis.from_url(valkey_url)
        try:
            await admin.delete("restarted")
            batcher = ScriptBatcher(client)
            incr = client.register_script("#!lua\nreturn redis.call('INCR', KEYS[1])")
            send = Pipeline._execute_pipeline
            restarts = [1]

            async def restart_once(
                self: Pipeline, conn: Any, commands: Any, raise_on_error: bool
            ) -> Any:
                if restarts:
                    restarts.pop()
                    await admin.script_flush()
                    raise redis.exceptions.ConnectionError("the server restarted")
                return await send(self, conn, commands, raise_on_error)

            monkeypatch.setattr(Pipeline, "_execute_pipeline", restart_once)
            replies = await asyncio.gather(
                *(batcher.run(incr, keys=["restarted"], args=[]) for _ in range(3))
            )
            assert sorted(replies) == [1, 2, 3]
        finally:
            await client.aclose()
            await admin.aclose()

    arun(body())


def test_a_batch_is_one_round_trip_and_a_script_the_server_lacks_is_loaded(
    valkey_url: str, arun: Runner
) -> None:
    """No SCRIPT EXISTS before each batch; NOSCRIPT (a fresh server) loads it once."""

    async def body() -> None:
        client = aioredis.Redis.from_url(valkey_url)
        try:
            await client.delete("fresh")
            await client.script_flush()
            await client.config_resetstat()
            batcher = ScriptBatcher(client)
            append = client.register_script(APPEND + "-- fresh\n")
            for turn in range(3):
                replies = await asyncio.gather(
                    *(batcher.run(append, keys=["fresh"], args=[str(i)]) for i in range(20))
                )
                assert sorted(replies) == list(range(20 * turn + 1, 20 * turn + 21))
            stats = await client.info("commandstats")
            assert "cmdstat_script|exists" not in stats
            assert stats["cmdstat_script|load"]["calls"] <= 20
        finally:
            await client.aclose()

    arun(body())


def test_calls_made_while_sends_are_under_way_wait_and_leave_together(
    redis_client: aioredis.Redis, arun: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_IN_FLIGHT sends, later turns' calls join one pipeline, not one each."""
    # Holds the server for some milliseconds (TIME is frozen inside a script,
    # so it counts instead): the sends before it stay under way meanwhile.
    slow = "local n = 0\nfor i = 1, 3000000 do n = n + i end\nreturn 0"
    sizes: list[int] = []
    execute = Pipeline.execute

    async def counted(self: Pipeline, raise_on_error: bool = True) -> Any:
        sizes.append(len(self.command_stack))
        return await execute(self, raise_on_error)

    monkeypatch.setattr(Pipeline, "execute", counted)

    async def body() -> None:
        batcher = ScriptBatcher(redis_client)
        hold = redis_client.register_script(slow)
        append = redis_client.register_script(APPEND)
        await append(keys=["warm"], args=["0"])  # the script cache holds both
        await hold(keys=["h"], args=[])
        calls = [asyncio.ensure_future(batcher.run(hold, keys=["h"], args=[]))]  # alone
        await asyncio.sleep(0)
        for turn in range(1, 2 + MAX_IN_FLIGHT + 3):
            calls += [
                asyncio.ensure_future(batcher.run(append, keys=["w"], args=[f"{turn}.{i}"]))
                for i in range(3)
            ]
            await asyncio.sleep(0)
        replies = await asyncio.gather(*calls)
        assert sorted(replies[1:]) == list(range(1, len(calls)))
        # The first turn's calls went beside the lone call; the later turns'
        # waited for a send to answer and left in one pipeline.
        assert sizes == [3] * (MAX_IN_FLIGHT - 1) + [len(calls) - 1 - 3 * (MAX_IN_FLIGHT - 1)]

    arun(body())


def test_a_new_event_loop_is_not_held_back_by_sends_left_on_an_old_one(valkey_url: str) -> None:
    """Sends left under way when a loop stopped never answer: a later loop's calls still leave."""
    client = aioredis.Redis.from_url(valkey_url)
    batcher = ScriptBatcher(client)
    append = client.register_script(APPEND)
    first = asyncio.new_event_loop()
    left = [
        first.create_task(batcher.run(append, keys=["l"], args=[str(i)]))
        for i in range(MAX_IN_FLIGHT * 3)
    ]
    first.run_until_complete(asyncio.sleep(0))  # the calls are under way, none answered
    assert not any(call.done() for call in left)

    async def later() -> list[Any]:
        return await asyncio.wait_for(
            asyncio.gather(*(batcher.run(append, keys=["m"], args=["x"]) for _ in range(5))),
            timeout=5,
        )

    assert sorted(asyncio.run(later())) == [1, 2, 3, 4, 5]
    for call in left:
        call.cancel()
    first.run_until_complete(asyncio.gather(*left, return_exceptions=True))
    first.close()


def test_reads_share_a_send_with_scripts_and_answer_as_they_would_alone(
    redis_client: aioredis.Redis, arun: Runner
) -> None:
    async def body() -> None:
        await redis_client.hset("h", mapping={"a": "1", "b": "2"})
        await redis_client.set("s", "text")
        batcher = ScriptBatcher(redis_client)
        append = redis_client.register_script(APPEND)
        replies = await asyncio.gather(
            batcher.run(append, keys=["l"], args=["x"]),  # goes alone, at once
            batcher.command("HMGET", "h", "a", "missing", "b"),
            batcher.command("HGET", "h", "b"),
            batcher.command("HGET", "h", "missing"),
            batcher.command("HGET", "s", "a"),  # the wrong type: its caller only
            batcher.run(append, keys=["l"], args=["y"]),
            return_exceptions=True,
        )
        alone = [
            await redis_client.hmget("h", ["a", "missing", "b"]),
            await redis_client.hget("h", "b"),
            await redis_client.hget("h", "missing"),
        ]
        assert list(replies[1:4]) == alone == [[b"1", None, b"2"], b"2", None]
        assert isinstance(replies[4], redis.exceptions.ResponseError)
        assert "WRONGTYPE" in str(replies[4])
        assert sorted([replies[0], replies[5]]) == [1, 2]  # type: ignore[type-var]
        assert await batcher.command("HGET", "h", "a") == b"1"  # alone too

    arun(body())
