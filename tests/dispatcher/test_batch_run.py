"""The engine and its send loop in this process, against the real database and the provider
simulator on loopback: leases, pauses, throttles and stops, with no dramatiq in the way.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from bench.ports import free_port
from services.dispatcher import metrics, snapshot
from services.dispatcher.batch_run import claim_limit
from services.dispatcher.engine import Taken
from services.dispatcher.jobs import load_job
from services.dispatcher.ratelimit import SlotCache, Slots
from services.dispatcher.recorder import Recorder
from services.dispatcher.retry import RetryPolicy
from services.dispatcher.runtime import Runtime, RuntimeClosed, RuntimeMiddleware
from services.simulator.app import SIMULATOR, HookConfig, Simulator, make_app, max_in_window
from shared import delivery_store as store
from shared.db.engine import libpq_url
from shared.domain.lifecycle import DeliveryStatus
from shared.settings import Settings
from tests.conftest import Api

WAIT = 30.0


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
    return result


@pytest.fixture(scope="module")
def simulator() -> Iterator[tuple[str, Simulator]]:
    """The provider simulator, served from a thread of this process."""
    app = make_app()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    port = free_port()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", app[SIMULATOR]
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(
        settings.model_copy(
            update={
                "lease_seconds": 6.0,
                "send_timeout_seconds": 2.0,
                "retry_base_seconds": 0.2,
                "retry_max_seconds": 1.0,
                "dispatcher_db_connections": 3,
            }
        )
    )
    rt.open()
    yield rt
    rt.close()


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as c:
        yield c


class Sending:
    """A broadcast being sent through one simulated webhook, and what the provider saw."""

    def __init__(self, rt: Runtime, conn: psycopg.Connection[Any], hook: str, sim: Simulator):
        self.rt, self.conn, self.hook, self.sim = rt, conn, hook, sim
        self.id = 0

    def arrivals(self) -> list[float]:
        return [r["t"] for r in self.sim.hook(self.hook).records]

    def rows(self) -> dict[str, int]:
        return dict(
            self.conn.execute(
                "SELECT status, count(*) FROM delivery WHERE broadcast_id = %s GROUP BY status",
                (self.id,),
            ).fetchall()
        )

    def batches(self) -> list[tuple[Any, ...]]:
        return self.conn.execute(
            "SELECT id, state, extract(epoch FROM due_at - now()) FROM delivery_batch "
            "WHERE broadcast_id = %s ORDER BY id",
            (self.id,),
        ).fetchall()

    def status(self) -> str:
        row = self.conn.execute("SELECT status FROM broadcast WHERE id = %s", (self.id,)).fetchone()
        assert row is not None
        return str(row[0])

    def adopt_first(self) -> None:
        """Hand the first batch to the engine, as a ``send_batch`` message would."""
        self.adopt(self.batches()[0][0])

    def adopt(self, batch_id: int) -> None:
        """As the relay would hand the batch out and a ``send_batch`` message reach here."""
        self.conn.execute(
            "UPDATE delivery_batch SET state = 'queued', published_at = now() "
            "WHERE id = %s AND state = 'ready'",
            (batch_id,),
        )
        assert self.rt.call(self.rt.engine.adopt(batch_id)) is Taken.TAKEN


@pytest.fixture
def sending(
    api: Api,
    runtime: Runtime,
    conn: psycopg.Connection[Any],
    simulator: tuple[str, Simulator],
) -> Callable[..., Sending]:
    base, sim = simulator

    def make(n: int, *, rate: float, batch_size: int = 500, **hook: Any) -> Sending:
        name = f"h-{secrets.token_hex(4)}"
        secret = secrets.token_urlsafe(16)
        sim.configure(name, HookConfig(secret=secret, **hook))
        channel = api.channel(
            config={"url": f"{base}/hooks/{name}", "secret": secret}, rate_limit_per_second=rate
        )
        account = api.account(channel["id"])
        conn.execute(
            "INSERT INTO contact (workspace_id, account_id, address) "
            "SELECT %s, %s, 'r-' || i FROM generate_series(1, %s) AS i",
            (api.workspace_id, account["id"], n),
        )
        b = api.broadcast(channel["id"])
        conn.execute(
            "UPDATE broadcast SET status = 'in_progress', started_at = now() WHERE id = %s",
            (b["id"],),
        )
        runtime.settings = runtime.settings.model_copy(update={"batch_size": batch_size})
        assert runtime.call(snapshot.start(runtime, b["id"])) == n
        s = Sending(runtime, conn, name, sim)
        s.id = b["id"]
        return s

    return make


def test_one_message_sends_a_whole_broadcast_batch_after_batch(sending: Any) -> None:
    s = sending(25, rate=1000, batch_size=10)
    assert len(s.batches()) == 3
    s.adopt_first()  # one message: the run goes on with the broadcast's next batches itself
    wait_for("the broadcast to complete", lambda: s.status() == "completed")
    assert s.rows() == {"sent": 25}
    assert len({r["key"] for r in s.sim.hook(s.hook).records}) == 25
    wait_for("the run to end", lambda: not s.rt.engine.runs)


def expire_lease(conn: psycopg.Connection[Any], broadcast_id: int) -> None:
    conn.execute(
        "UPDATE delivery_batch SET lease_expires_at = now() - interval '1 second' "
        "WHERE broadcast_id = %s",
        (broadcast_id,),
    )


def test_a_run_that_cannot_renew_its_lease_stops_calling_in_time_and_loses_nothing(
    sending: Any,
    conn: psycopg.Connection[Any],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Renewals fail (the database refuses them); everything else works.
    monkeypatch.setattr(
        store, "renew", lambda *a, **kw: store.One(store.Query("SELECT no_renewal()"), bool)
    )
    s = sending(300, rate=40, latency_ms=1500)
    dropped_before = metrics.RESULTS_DROPPED.labels("webhook")._value.get()
    lost_before = metrics.LEASES_LOST._value.get()
    with caplog.at_level(logging.WARNING):
        s.adopt_first()
        wait_for("calls to be under way", lambda: len(s.arrivals()) >= 10)
        wait_for(
            "the lease to run out",
            lambda: (
                conn.execute(
                    "SELECT lease_expires_at < now() FROM delivery_batch WHERE broadcast_id = %s",
                    (s.id,),
                ).fetchone()
                == (True,)
            ),
        )
        # The sweeper takes the batch and the rows it held back, as it would from a dead
        # dispatcher; another run may send them from now on.
        taken = store.run(conn, store.take_back(republish_after=60))
        taken_at = time.time()
        # (The sweep is global: batches other tests left behind may come back with it.)
        assert taken.batches >= 1
        back = conn.execute(
            "SELECT state, run_token FROM delivery_batch WHERE broadcast_id = %s", (s.id,)
        ).fetchall()
        assert back == [("ready", None)], "this run's batch was taken back"
        wait_for("the run to end", lambda: not s.rt.engine.runs)
    # The run started its last call early enough for it to end before the lease could run
    # out: nothing it held was called after the rows were taken back, and every answer it got
    # was written while the rows were still its own.
    assert [t for t in s.arrivals() if t > taken_at] == []
    assert metrics.LEASES_LOST._value.get() == lost_before + 1
    assert metrics.RESULTS_DROPPED.labels("webhook")._value.get() == dropped_before
    rows = s.rows()
    assert rows["sent"] == len(s.arrivals())
    assert rows["queued"] == 300 - rows["sent"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(re.search(rf"broadcast {s.id}\b.*lease renewal .* failed", m) for m in messages)
    assert any(f"broadcast {s.id} " in m and "could not be renewed in time" in m for m in messages)


def test_answers_that_come_back_after_a_stalled_runs_rows_were_taken_back_are_reported(
    sending: Any, conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    s = sending(300, rate=40, latency_ms=1500)
    dropped_before = metrics.RESULTS_DROPPED.labels("webhook")._value.get()
    s.adopt_first()
    wait_for("calls to be under way", lambda: len(s.arrivals()) >= 20)
    # As if the process had stalled past its lease: the sweeper takes the batch back while
    # calls are at the provider.
    expire_lease(conn, s.id)
    with caplog.at_level(logging.ERROR):
        # (Batches other tests of this database left with an expired lease come back too.)
        assert store.run(conn, store.take_back(republish_after=60)).batches >= 1
        taken = conn.execute(
            "SELECT state FROM delivery_batch WHERE broadcast_id = %s AND run_token IS NULL",
            (s.id,),
        ).fetchall()
        assert taken, "this run's batch was taken back"
        wait_for("the run to end", lambda: not s.rt.engine.runs)
    # Its next renewal told it the batch was no longer its own: it stopped, and the answers
    # of the calls under way were not written (another run sends those rows), but counted
    # and logged with the broadcast's id.
    assert metrics.RESULTS_DROPPED.labels("webhook")._value.get() > dropped_before
    assert s.rows().get("sending", 0) == 0
    assert s.rows().get("sent", 0) < len(s.arrivals())
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"broadcast {s.id} " in m and "taken back by the sweeper" in m for m in messages)
    assert any(f"broadcast {s.id} " in m and "results not written" in m for m in messages)


def test_a_channel_told_to_wait_gives_its_batch_back_until_then(
    sending: Any, conn: psycopg.Connection[Any]
) -> None:
    s = sending(50, rate=10, batch_size=10, throttle_ratio=1.0, retry_after=30)
    s.adopt_first()
    wait_for("the provider's first 429", lambda: s.arrivals())
    # The run does not sit out the 30 s: it gives its batch back, due when the channel is ...
    wait_for("the run to end", lambda: not s.rt.engine.runs)
    first, *rest = s.batches()
    assert first[1] == "ready"
    assert 25 < first[2] <= 31
    assert s.rows() == {"queued": 50}
    assert len(s.arrivals()) <= 2
    # ... and neither it nor the scheduler walks through the broadcast's other batches: they
    # wait for the channel too.
    runs = conn.execute(
        "SELECT count(*) FROM delivery_batch WHERE broadcast_id = %s AND runs > 0", (s.id,)
    ).fetchone()
    assert runs == (1,)
    relayed = store.run(conn, store.relay(per_batch_rate=500, max_window=16, limit=1000))
    assert [b for b, t in relayed if t == s.id] == []
    assert [b[1] for b in rest] == ["ready"] * 4


def test_a_pause_stops_calls_at_once_and_the_rows_come_back(
    sending: Any, conn: psycopg.Connection[Any]
) -> None:
    s = sending(300, rate=40)
    reserved: list[int] = []
    reserve: Callable[..., Awaitable[Slots]] = s.rt.limiter.reserve

    async def counted(*args: Any, **kw: Any) -> Slots:
        got = await reserve(*args, **kw)
        reserved.append(len(got.times))
        return got

    s.rt.limiter.reserve = counted
    s.adopt_first()
    wait_for("sending to be under way", lambda: len(s.arrivals()) >= 10)
    conn.execute("UPDATE broadcast SET status = 'paused' WHERE id = %s", (s.id,))
    paused_at = time.time()
    wait_for("the run to end", lambda: not s.rt.engine.runs)
    assert [t for t in s.arrivals() if t > paused_at + 0.5] == []
    rows = s.rows()
    assert rows.get("sending", 0) == 0
    assert rows["sent"] == len(s.arrivals())
    assert rows["queued"] == 300 - rows["sent"]
    assert [b[1] for b in s.batches()] == ["ready"]
    # Every slot taken for the channel was used by a call, is still at hand, or was counted
    # unused: those of the sends that were waiting for their slot when the pause came.
    [cache] = s.rt._slots.values()
    unused = cache.unused_by
    assert sum(reserved) == len(s.arrivals()) + sum(unused.values()) + len(cache._times)
    assert unused["stopped"] > 0
    # What the run left in the cache is counted once it has passed, without another send.
    wait_for("the run's leftover slots to be counted", lambda: not cache._times, timeout=5)
    assert sum(reserved) == len(s.arrivals()) + sum(cache.unused_by.values())


@pytest.mark.parametrize("claims", [0.3, 2.0], ids=["short-claim", "full-last-claim"])
def test_a_run_takes_no_slots_beyond_its_batchs_last_rows(
    sending: Any, runtime: Runtime, claims: float
) -> None:
    # At 400/s: 0.3 of a claim (one claim short of its limit), or exactly two claims (the last
    # one full, ending on the batch's last row). A block of slots taken ahead (the lane's
    # size) would leave most of it unused, and other processes would wait for the channel
    # meanwhile.
    settings = runtime.settings
    n = int(claim_limit(settings.claim_size, 400, settings.channel_max_in_flight) * claims)
    s = sending(n, rate=400)
    s.adopt_first()
    wait_for("every recipient to be sent", lambda: s.rows().get("sent", 0) == n, timeout=30)
    wait_for("the run to end", lambda: not s.rt.engine.runs)
    [cache] = s.rt._slots.values()
    s.rt.call(asyncio.sleep(0.1))
    s.rt.loop.call_soon_threadsafe(cache.settle)
    s.rt.call(asyncio.sleep(0))
    assert cache.unused_by == {"late": 0, "stopped": 0, "left": 0}
    assert len(s.arrivals()) == n


def test_sends_too_late_for_their_slots_give_them_up_as_late_and_keep_the_limit(
    sending: Any,
) -> None:
    s = sending(120, rate=40)
    s.adopt_first()
    wait_for("sending to be under way", lambda: len(s.arrivals()) >= 5)
    # The process stalls for 0.3 s (a blocking call on its loop): the sends whose slots pass
    # meanwhile wake too late for them.
    s.rt.loop.call_soon_threadsafe(time.sleep, 0.3)
    wait_for("every recipient to be sent", lambda: s.rows().get("sent", 0) == 120, timeout=30)
    [cache] = s.rt._slots.values()
    assert cache.unused_by["late"] > 0
    # None of them was sent late: no second at the provider holds more than the limit.
    assert max_in_window(sorted(s.arrivals()), 1.0) <= 40
    assert len(s.arrivals()) == 120


def test_a_stopping_engine_gives_every_batch_back(sending: Any, runtime: Runtime) -> None:
    s = sending(300, rate=40)
    s.adopt_first()
    wait_for("sending to be under way", lambda: len(s.arrivals()) >= 10)
    runtime.call(runtime.engine.stop(10))
    stopped_at = time.time()
    assert not runtime.engine.runs
    assert [t for t in s.arrivals() if t > stopped_at] == []
    rows = s.rows()
    assert rows.get("sending", 0) == 0
    assert rows["sent"] == len(s.arrivals())
    assert [b[1] for b in s.batches()] == ["ready"]
    taken = runtime.call(runtime.engine.adopt(s.batches()[0][0]))
    assert taken is Taken.STOPPING, "it takes no new work"


def test_a_runtime_told_to_stop_taking_work_gives_every_batch_back_while_still_open(
    sending: Any, runtime: Runtime
) -> None:
    # What a dispatcher does first on SIGTERM, before its worker threads stop.
    s = sending(300, rate=40)
    s.adopt_first()
    wait_for("sending to be under way", lambda: len(s.arrivals()) >= 10)
    runtime.stop_taking_work()
    wait_for("the run to give its batch back", lambda: [b[1] for b in s.batches()] == ["ready"])
    wait_for("the run to end", lambda: not runtime.engine.runs)
    assert not runtime.closed
    rows = s.rows()
    assert rows.get("sending", 0) == 0
    assert rows["sent"] == len(s.arrivals())
    taken = runtime.call(runtime.engine.adopt(s.batches()[0][0]))
    assert taken is Taken.STOPPING, "it takes no new work"


def test_a_failure_while_taking_slots_leaks_no_place_and_gives_the_rows_back(
    sending: Any, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kw: Any) -> Any:
        raise psycopg.OperationalError("the database went away")

    s = sending(20, rate=100)
    monkeypatch.setattr(SlotCache, "take", broken)
    s.adopt_first()
    wait_for("the run to end", lambda: not runtime.engine.runs)
    assert s.arrivals() == []
    assert s.rows() == {"queued": 20}
    assert [b[1] for b in s.batches()] == ["ready"]
    lanes = list(runtime._lanes.values())
    assert lanes
    assert all(lane.used == 0 for lane in lanes), "every lane place came back"
    assert runtime.calls.used == 0


def test_the_middleware_opens_the_runtime_with_the_worker_and_closes_all_of_it(
    settings: Settings,
) -> None:
    from dramatiq import Worker
    from dramatiq.brokers.stub import StubBroker

    threshold = gc.get_threshold()
    broker = StubBroker()
    middleware = RuntimeMiddleware(lambda: settings)
    broker.add_middleware(middleware)
    worker = Worker(broker, worker_threads=1)
    try:
        worker.start()
        rt = middleware.current()
        assert not rt.closed
        assert rt.call(asyncio.sleep(0, "up")) == "up"
        worker.stop()
        assert rt.closed
        assert rt.http.closed
        assert rt.pool.closed
        assert rt.loop.is_closed()
        with pytest.raises(RuntimeClosed):
            middleware.current()
        with pytest.raises(RuntimeClosed):
            rt.call(asyncio.sleep(0))
    finally:
        broker.close()
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_a_pause_and_a_quick_resume_end_the_run_and_the_broadcast_goes_on(
    sending: Any, conn: psycopg.Connection[Any], runtime: Runtime
) -> None:
    s = sending(60, rate=30, latency_ms=1500)
    s.adopt_first()
    wait_for("calls to be under way", lambda: len(s.arrivals()) >= 5)
    conn.execute("UPDATE broadcast SET status = 'paused' WHERE id = %s", (s.id,))
    time.sleep(0.3)  # the resume lands while the calls made before the pause are still out
    conn.execute("UPDATE broadcast SET status = 'in_progress' WHERE id = %s", (s.id,))
    wait_for("the halted run to end", lambda: not runtime.engine.runs, timeout=5)
    # The loop stayed free the whole time: the process answers at once.
    started = time.monotonic()
    runtime.call(asyncio.sleep(0))
    assert time.monotonic() - started < 0.2
    # Resumed: the scheduler hands the batch out again, and it goes on to the end.
    [(batch_id, _)] = store.run(conn, store.relay(per_batch_rate=500, max_window=16, limit=1000))[
        -1:
    ]
    s.adopt(batch_id)
    wait_for("the broadcast to complete", lambda: s.status() == "completed")
    assert s.rows() == {"sent": 60}
    assert len(s.arrivals()) == 60


def test_an_error_in_the_loop_lets_calls_at_the_provider_finish_and_writes_their_answers(
    sending: Any, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = store.claim
    claims = 0

    def second_claim_fails(*args: Any, **kw: Any) -> Any:
        nonlocal claims
        claims += 1
        if claims == 2:
            return store.One(store.Query("SELECT no_such_function()"), bool)
        return real(*args, **kw)

    monkeypatch.setattr(store, "claim", second_claim_fails)
    s = sending(200, rate=100, latency_ms=800)
    s.adopt_first()
    wait_for("the run to end", lambda: not runtime.engine.runs)
    rows = s.rows()
    assert rows.get("sending", 0) == 0, "no call was cut off, no row left held"
    assert rows["sent"] == len(s.arrivals()) > 0
    [(_, state, due_in)] = s.batches()
    assert state == "ready"
    assert 0 < due_in <= 5, "given back, due again shortly"


def test_the_last_results_are_written_even_if_the_database_blinks_as_the_run_ends(
    sending: Any,
    conn: psycopg.Connection[Any],
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = store.record
    blinking = threading.Event()

    def record(*args: Any, **kw: Any) -> Any:
        if blinking.is_set():
            # The database drops the connection under the write.
            return store.One(store.Query("SELECT pg_terminate_backend(pg_backend_pid())"), bool)
        return real(*args, **kw)

    monkeypatch.setattr(store, "record", record)
    s = sending(100, rate=40, latency_ms=1000)
    s.adopt_first()
    wait_for("calls to be under way", lambda: len(s.arrivals()) >= 10)
    blinking.set()
    conn.execute("UPDATE broadcast SET status = 'paused' WHERE id = %s", (s.id,))
    threading.Timer(1.5, blinking.clear).start()
    wait_for("the run to end", lambda: not runtime.engine.runs)
    rows = s.rows()
    assert rows.get("sending", 0) == 0
    assert rows["sent"] == len(s.arrivals())
    assert [b[1] for b in s.batches()] == ["ready"]


def test_a_call_holds_its_place_in_the_call_pool_until_its_answer_is_written(
    sending: Any,
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What a process killed outright can repeat: calls under way, and answers not yet
    # written. Both hold a place, so BCAST_MAX_IN_FLIGHT bounds them together.
    real = store.record_runs
    refusing = threading.Event()

    def record(*args: Any, **kw: Any) -> Any:
        if refusing.is_set():
            return store.One(store.Query("SELECT no_such_function()"), bool)
        return real(*args, **kw)

    monkeypatch.setattr(store, "record_runs", record)
    runtime.calls.size = 5
    s = sending(50, rate=1000, latency_ms=20)
    refusing.set()

    def records() -> list[dict[str, Any]]:
        return s.sim.hook(s.hook).records  # type: ignore[no-any-return]

    def failed_writes() -> int:
        return sum("writing results failed" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING):
        s.adopt_first()
        wait_for(
            "5 calls answered",
            lambda: len(records()) >= 5 and all("status" in r for r in records()[:5]),
        )
        # The answers are in, and the recorder tried (and failed) to write them twice since.
        seen = failed_writes()
        wait_for("two more failed writes", lambda: failed_writes() >= seen + 2)
    assert len(records()) == 5, "no call starts while 5 answers wait for their write"
    assert runtime.calls.used == 5
    refusing.clear()
    wait_for("the broadcast to complete", lambda: s.status() == "completed")
    assert s.rows() == {"sent": 50}
    wait_for("the run to end", lambda: not runtime.engine.runs)
    assert runtime.calls.used == 0


def test_when_the_call_pool_is_the_bottleneck_channels_share_it(
    sending: Any, runtime: Runtime
) -> None:
    runtime.calls.size = 4  # this process makes 4 calls at once, whatever the channels
    a = sending(400, rate=10_000, latency_ms=100)
    b = sending(400, rate=10_000, latency_ms=100)
    a.adopt_first()
    b.adopt_first()

    def while_both_sent() -> tuple[int, int] | None:
        # Calls from one answer's time after both channels send on: a head start of one (its
        # batch was handed over first, its calls hold the pool) says nothing about how the pool
        # is shared. 200 calls (5 s at 4 x 10/s): over fewer, a moment in which one channel is
        # not waiting (claiming its next rows) weighs too much.
        xs, ys = a.arrivals(), b.arrivals()
        if not xs or not ys:
            return None
        since = max(xs[0], ys[0]) + 0.1
        counts = (sum(1 for t in xs if t >= since), sum(1 for t in ys if t >= since))
        return counts if sum(counts) >= 200 else None

    mine, theirs = wait_for("both channels to share the pool a while", while_both_sent)
    share = mine / (mine + theirs)
    assert 0.35 < share < 0.65, share
    # And never more than 4 calls at the providers at once.
    starts = sorted([*a.arrivals(), *b.arrivals()])
    assert max(sum(1 for u in starts if t <= u < t + 0.09) for t in starts) <= 4
    for x in (a, b):
        x.rt.call(x.rt.engine.stop(10))


@pytest.mark.parametrize("bad", ["bad\x00id", "bad\ud800id"])
def test_a_result_the_database_refuses_is_stored_without_its_text_and_holds_back_nothing(
    sending: Any, runtime: Runtime, conn: psycopg.Connection[Any], bad: str
) -> None:
    s = sending(3, rate=100)
    s.adopt_first()
    wait_for("the broadcast to complete", lambda: s.status() == "completed")
    # A run whose pending results include one Postgres refuses (a NUL in a provider's id):
    more = sending(2, rate=100)
    [batch_id] = [b[0] for b in more.batches()]
    conn.execute("UPDATE delivery_batch SET state = 'queued' WHERE id = %s", (batch_id,))
    batch = store.run(conn, store.claim_batch(batch_id, uuid.uuid4(), lease=60))
    assert batch is not None
    first, second = store.run(conn, store.claim(batch, 2))
    job = runtime.call(load_job(runtime, more.id))
    assert job is not None
    recorder = Recorder(runtime, job, batch, RetryPolicy(5, 1.0, 10.0))
    recorder.pending += [
        (store.Record(first.id, DeliveryStatus.SENT, provider_message_id=bad), "sent", False),
        (store.Record(second.id, DeliveryStatus.SENT, provider_message_id="good"), "sent", False),
    ]
    runtime.call(recorder.flush())
    assert recorder.pending == []
    stored = dict(
        conn.execute(
            "SELECT id, provider_message_id FROM delivery WHERE id = ANY(%s)",
            ([first.id, second.id],),
        ).fetchall()
    )
    assert stored == {first.id: None, second.id: "good"}
    assert more.rows() == {"sent": 2}


def test_a_channel_that_cannot_be_used_as_configured_pauses_its_broadcast_with_the_reason(
    sending: Any, conn: psycopg.Connection[Any]
) -> None:
    s = sending(5, rate=100)
    conn.execute(
        "UPDATE channel SET config = config - 'url' "
        "WHERE id = (SELECT channel_id FROM broadcast WHERE id = %s)",
        (s.id,),
    )
    s.adopt_first()
    wait_for("the broadcast to be paused", lambda: s.status() == "paused")
    [(reason,)] = conn.execute(
        "SELECT status_reason FROM broadcast WHERE id = %s", (s.id,)
    ).fetchall()
    assert "cannot be used as configured: its config has no 'url'" in reason
    assert "secret" not in reason
    assert s.arrivals() == []
    assert s.rows() == {"queued": 5}


def test_a_channel_whose_address_the_egress_rule_refuses_pauses_its_broadcast_unsent(
    sending: Any,
    conn: psycopg.Connection[Any],
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The channel was created when its name resolved elsewhere; now it points at loopback.
    s = sending(5, rate=100)
    strict = Runtime(
        settings.model_copy(update={"allow_private_targets": False, "dispatcher_db_connections": 3})
    )
    held_before = REGISTRY.get_sample_value("bcast_broadcasts_held_total") or 0.0
    strict.open()
    try:
        s.rt = strict
        with caplog.at_level(logging.ERROR):
            s.adopt_first()
            wait_for("the broadcast to be paused", lambda: s.status() == "paused")
            wait_for("the run to end", lambda: not strict.engine.runs)
    finally:
        strict.close()
    # Counted and told once, by the run that paused it, with its ids as fields.
    assert REGISTRY.get_sample_value("bcast_broadcasts_held_total") == held_before + 1
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "paused"]
    assert (line.broadcast_id, line.batch_id) == (s.id, s.batches()[0][0])  # type: ignore[attr-defined]
    assert line.reason.startswith("the channel's provider address is refused")  # type: ignore[attr-defined]
    [(reason,)] = conn.execute(
        "SELECT status_reason FROM broadcast WHERE id = %s", (s.id,)
    ).fetchall()
    assert reason.startswith("the channel's provider address is refused: ")
    assert "loopback" in reason
    assert s.arrivals() == []
    assert s.rows() == {"queued": 5}
    [(attempts,)] = conn.execute(
        "SELECT sum(attempts) FROM delivery WHERE broadcast_id = %s", (s.id,)
    ).fetchall()
    assert attempts == 0
