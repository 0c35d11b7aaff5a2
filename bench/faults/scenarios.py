"""The scenarios: each sends a real broadcast through real processes and injects one fault
mid-send; ``run_scenario`` then waits for the end and checks it (``checks.verify``).
"""

from __future__ import annotations

import json
import math
import re
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench.faults.checks import Verdict, settle, verify
from bench.faults.servers import PrivatePostgres, PrivateRabbit
from bench.faults.system import STOP_SECONDS, Layout, Progress, ScenarioFailed, System, wait_for

#: Provider calls in flight per dispatcher process (the repeat bound is counted in these).
MAX_IN_FLIGHT = 128
#: Sends of one channel under way per dispatcher process (the default).
CHANNEL_MAX_IN_FLIGHT = 64


@dataclass(frozen=True)
class Scale:
    """How big and how long.

    Parameters:
      recipients: recipients of the scenario (split over several broadcasts in
        ``two-schedulers``).
      send_seconds: the provider's latency is set so that the send would take about this
        long without faults (if the machine keeps up), so faults land mid-send whatever the
        size.
      outage_seconds: how long the provider is down in ``provider-down``.
      storm_seconds: how long the provider answers 429 in ``throttle-storm``.
      deadline_seconds: longest a scenario's broadcasts may take to complete.
      broadcasts: broadcasts due at once in ``two-schedulers``.
      lease_seconds: ``BCAST_LEASE_SECONDS``: how long the rows of a killed dispatcher wait
        before they are taken back (the send timeout is set to the most it allows).
      postgres_down_seconds: how long Postgres stays stopped in ``restart-postgres`` (0: a
        fast shutdown and a start at once).
    """

    recipients: int = 100_000
    send_seconds: float = 40.0
    outage_seconds: float = 30.0
    storm_seconds: float = 20.0
    deadline_seconds: float = 600.0
    broadcasts: int = 5
    lease_seconds: float = 12.0
    postgres_down_seconds: float = 0.0

    def latency_ms(self, processes: int) -> float:
        """The provider latency that paces ``processes`` dispatcher processes (each with at
        most ``CHANNEL_MAX_IN_FLIGHT`` sends of the channel under way) to the send's rate.
        """
        rate = self.recipients / self.send_seconds
        return round(1000.0 * CHANNEL_MAX_IN_FLIGHT * processes / rate, 1)


def base_settings(scale: Scale) -> dict[str, str]:
    """Settings of every bcast process in every scenario (the rest are the defaults)."""
    return {
        "BCAST_SCHEDULER_POLL_SECONDS": "0.5",
        # A lost message or start is handed out again after this (60 s by default).
        "BCAST_STALL_SECONDS": "10",
        # Recovery from a dead dispatcher waits for its leases to run out; a run stops
        # starting calls a send timeout + 1 s before its lease could.
        "BCAST_LEASE_SECONDS": f"{scale.lease_seconds:g}",
        "BCAST_SEND_TIMEOUT_SECONDS": f"{scale.lease_seconds / 2 - 1:g}",
        "BCAST_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
        "BCAST_CHANNEL_MAX_IN_FLIGHT": str(CHANNEL_MAX_IN_FLIGHT),
        # At least ~40 batches, so several are running on each dispatcher when a fault hits.
        "BCAST_BATCH_SIZE": str(min(500, max(50, scale.recipients // 40))),
    }


class Run:
    """One scenario under way: its system, its broadcasts and what it did.

    Parameters:
      system: the running system.
      scale: size and durations.
      verdict: where events and problems go.
      layout: the processes it started with.
    """

    def __init__(self, system: System, scale: Scale, verdict: Verdict, layout: Layout) -> None:
        self.system = system
        self.scale = scale
        self.verdict = verdict
        self.layout = layout
        self.broadcast_ids: list[int] = []
        self.tag_ids: list[int] = []
        self.created_at: float | None = None
        self.started = time.monotonic()
        #: Dispatcher worker processes killed outright (their calls under way may repeat).
        self.killed_workers = 0

    @property
    def expected(self) -> int:
        return self.scale.recipients

    def left(self) -> float:
        """Seconds left before the scenario's deadline."""
        begun = self.created_at if self.created_at is not None else self.started
        return max(1.0, begun + self.scale.deadline_seconds - time.monotonic())

    def event(self, text: str) -> None:
        p = self.system.progress(self.broadcast_ids) if self.broadcast_ids else None
        at = time.monotonic() - (self.created_at or self.started)
        done = f"{p.final}/{self.expected} final" if p is not None else "database out of reach"
        self.verdict.events.append(f"{at:7.1f} s  {text}  ({done})")

    def launch(self, tag_ids: list[int] | None = None) -> int:
        """Create a broadcast to be sent now (through the API)."""
        if self.created_at is None:
            self.created_at = time.monotonic()
        broadcast_id = self.system.create_broadcast(tag_ids)
        self.broadcast_ids.append(broadcast_id)
        return broadcast_id

    def wait_share(self, share: float) -> Progress:
        return self.system.wait_progress(self.broadcast_ids, self.expected, share, self.left())

    def hold(self, seconds: float) -> None:
        """Keep a fault in place for ``seconds`` (the fault's length, not a wait for an effect)."""
        time.sleep(seconds)

    def wait_completed(self) -> float:
        """Wait for every broadcast to complete; seconds from the first creation."""

        def completed() -> bool:
            p = self.system.progress(self.broadcast_ids)
            return p is not None and all(s == "completed" for s in p.statuses)

        wait_for("every broadcast to complete", completed, self.left(), every=0.1)
        assert self.created_at is not None
        return time.monotonic() - self.created_at


@dataclass(frozen=True)
class Scenario:
    """A fault and where it lands.

    Parameters:
      name: the CLI value.
      what: one line for the report.
      act: starts the broadcast(s) and injects the fault; returns when the fault is over.
      layout: the processes started before ``act``.
      settings: extra settings of every bcast process (on top of ``base_settings``).
      parts: tags the contacts are spread over (one broadcast per tag).
    """

    name: str
    what: str
    act: Callable[[Run], None]
    layout: Layout = field(default_factory=Layout)
    settings: Callable[[Scale], dict[str, str]] = lambda _: {}
    parts: Callable[[Scale], int] = lambda _: 1


# --- 1. kill -9 a dispatcher, three times ----------------------------------------------------


#: A dispatcher log line (one JSON object) saying a batch run ended, and when (ISO 8601 UTC:
#: later times sort later).
RUN_ENDED = re.compile(r'^\{"time": "([^"]+)".* run ended ', re.MULTILINE)


def _busiest(system: System) -> str | None:
    """The running dispatcher that ended a batch run most recently: it went on with the
    broadcast's next batch, so it holds batches now. None if none has ended one yet.
    """
    last: dict[str, str] = {}
    for name in system.procs.running:
        if name.startswith("dispatcher-"):
            ended = RUN_ENDED.findall(system.procs.log(name))
            if ended:
                last[name] = ended[-1]
    return max(last, key=lambda n: last[n]) if last else None


def kill_dispatcher(run: Run) -> None:
    """At 15%, 40% and 65% of the send, kill -9 the dispatcher that is running batches (its
    parent and worker processes: the whole process group), and start a replacement.
    """
    system = run.system
    run.launch()
    for kill, share in enumerate((0.15, 0.40, 0.65), start=1):
        run.wait_share(share)
        victim = wait_for(
            "a dispatcher to be running batches", partial(_busiest, system), run.left(), 0.1
        )
        pids = system.procs.kill(victim)
        run.killed_workers += run.layout.processes
        run.event(f"kill -9 {victim} (running batches): process group {sorted(pids)} gone")
        replacement = f"dispatcher-r{kill}"
        system.start_dispatcher(replacement, run.layout)
        system.wait_dispatcher_ready(replacement, run.layout.processes)
        run.event(f"replacement {replacement} ready")


# --- 2. restart RabbitMQ ---------------------------------------------------------------------


def restart_rabbitmq(run: Run) -> None:
    run.launch()
    run.wait_share(0.3)
    run.event("RabbitMQ: stopping the node")
    began = time.monotonic()
    run.system.rabbit.restart()
    run.event(f"RabbitMQ: node up again after {time.monotonic() - began:.1f} s")


# --- 3. restart Postgres ---------------------------------------------------------------------


def restart_postgres(run: Run) -> None:
    system = run.system
    broadcast_id = run.launch()
    run.wait_share(0.3)
    run.event("Postgres: fast shutdown")
    began = time.monotonic()
    system.pg.stop("fast")
    if run.scale.postgres_down_seconds:
        run.hold(run.scale.postgres_down_seconds)
    system.pg.start()
    run.event(f"Postgres: accepting connections again after {time.monotonic() - began:.1f} s")

    def api_answers() -> bool:
        try:
            return system.client().get(f"/v1/broadcasts/{broadcast_id}").status_code == 200
        except Exception:
            return False

    # The API's own connections died with the server: it must answer again by itself.
    wait_for("the API to answer after the restart", api_answers, 60, every=0.2)
    run.event("the API answers again")


# --- 4. the provider is down -----------------------------------------------------------------


def outage_budget(scale: Scale) -> dict[str, str]:
    """Retries that outlast the outage: every wait is at least half the base (the backoff's
    floor), so ``max_attempts - 1`` waits add up to more than the outage and no recipient
    runs out of attempts while the provider is down.
    """
    base = min(8.0, max(1.0, scale.outage_seconds / 4))
    attempts = math.ceil(scale.outage_seconds / (base / 2)) + 2
    return {
        "BCAST_RETRY_BASE_SECONDS": f"{base:g}",
        "BCAST_RETRY_MAX_SECONDS": f"{base:g}",
        "BCAST_MAX_ATTEMPTS": str(attempts),
    }


def provider_down(run: Run) -> None:
    """Half the outage with connections refused (the provider's port closed, open connections
    cut), half answering 503 to everything, then back to normal.
    """
    system = run.system
    run.launch()
    run.wait_share(0.2)
    system.provider_listening(False)
    run.event("provider: port closed (connections refused)")
    run.hold(run.scale.outage_seconds / 2)
    system.sim_hook(error_ratio=1.0)
    system.provider_listening(True)
    run.event("provider: listening again, answering 503 to everything")
    run.hold(run.scale.outage_seconds / 2)
    system.sim_hook()
    run.event("provider: back to normal")


# --- 5. a 429 storm --------------------------------------------------------------------------


def throttle_storm(run: Run) -> None:
    system = run.system
    run.launch()
    run.wait_share(0.2)
    system.sim_hook(throttle_ratio=0.9, retry_after=1.0)
    run.event("provider: 90% of requests answered 429, Retry-After 1 s")
    run.hold(run.scale.storm_seconds)
    system.sim_hook()
    run.event("provider: back to normal")


# --- 6. kill -9 the scheduler between claim and publish --------------------------------------


def kill_scheduler(run: Run) -> None:
    """Publishers blocked by the broker (its memory alarm), so the scheduler claims the
    broadcast (in_progress, outbox row, committed) and then hangs in the publish; kill -9 it
    there. Clear the alarm, start a new scheduler; kill -9 that one mid-send too.
    """
    system = run.system
    system.rabbit.block_publishers(True)
    try:
        broadcast_id = run.launch()

        def claimed_not_published() -> bool:
            rows = system.sql(
                "SELECT b.status, (SELECT count(*) FROM dispatch_outbox o "
                "WHERE o.broadcast_id = b.id) FROM broadcast b WHERE b.id = %s",
                (broadcast_id,),
            )
            return bool(rows) and rows[0] == ("in_progress", 1)

        wait_for("the scheduler to claim the broadcast", claimed_not_published, 60, every=0.005)
        wait_for(
            "the scheduler's publish to be blocked by the broker",
            lambda: system.rabbit.blocked_connections(system.vhost) > 0,
            60,
            every=0.05,
        )
        pids = system.procs.kill("scheduler-1")
        run.event(
            f"kill -9 scheduler-1 {sorted(pids)}: claim committed (in_progress, outbox row), "
            "publish blocked by the broker"
        )
        outbox = system.sql(
            "SELECT count(*) FROM dispatch_outbox WHERE broadcast_id = %s", (broadcast_id,)
        )[0][0]
        copied = system.sql(
            "SELECT count(*) FROM delivery WHERE broadcast_id = %s", (broadcast_id,)
        )[0][0]
        depths = system.rabbit.queue_depths(system.vhost)
        run.event(
            f"after the kill: outbox rows {outbox}, start messages queued "
            f"{depths.get('bcast_start', 0)}, deliveries copied {copied}"
        )
        if outbox != 1 or copied:
            run.verdict.problems.append(
                f"the kill did not land between claim and publish: outbox rows {outbox}, "
                f"deliveries copied {copied}"
            )
    finally:
        system.rabbit.block_publishers(False)
    system.start_scheduler("scheduler-2")
    run.event("publishers unblocked, scheduler-2 started")
    run.wait_share(0.5)
    pids = system.procs.kill("scheduler-2")
    run.event(f"kill -9 scheduler-2 {sorted(pids)} mid-send")
    system.start_scheduler("scheduler-3")
    run.event("scheduler-3 started")


# --- 7. two schedulers race ------------------------------------------------------------------


def two_schedulers(run: Run) -> None:
    """Several broadcasts (one per tag) made due in one statement, two schedulers racing for
    them (and relaying and sweeping side by side all along).
    """
    system = run.system
    ids = [system.create_broadcast([tag], later=True) for tag in run.tag_ids]
    run.broadcast_ids.extend(ids)
    run.created_at = time.monotonic()
    system.sql("UPDATE broadcast SET send_at = now() WHERE id = ANY(%s)", (ids,))
    run.event(f"{len(ids)} broadcasts due at once")


def started_once(run: Run) -> None:
    """Each broadcast was started by exactly one of the schedulers."""
    starts: Counter[int] = Counter()
    by: dict[int, list[str]] = {}
    for name in ("scheduler-1", "scheduler-2"):
        # The scheduler's lifecycle lines: {"event": "started", "broadcast_id": 1, ...} per
        # broadcast (or "broadcast_ids" for a claim of many; a scenario starts few).
        for line in run.system.procs.log(name).splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or entry.get("event") != "started":
                continue
            ids = entry.get("broadcast_ids") or [entry.get("broadcast_id")]
            for broadcast_id in ids:
                if isinstance(broadcast_id, int):
                    starts[broadcast_id] += 1
                    by.setdefault(broadcast_id, []).append(name)
    for broadcast_id in run.broadcast_ids:
        if starts[broadcast_id] != 1:
            run.verdict.problems.append(
                f"broadcast {broadcast_id} started {starts[broadcast_id]} times"
            )
    run.event(
        "started by: "
        + ", ".join(f"{b}: {by.get(b, ['nobody'])[0]}" for b in sorted(run.broadcast_ids))
    )


# --- 8. SIGTERM everything -------------------------------------------------------------------


#: Exit codes of a clean stop: 0, or the SIGTERM itself, which uvicorn (the API) raises again
#: once it has shut down gracefully, so its supervisor sees why it ended.
CLEAN_EXITS = (0, -signal.SIGTERM)


def sigterm_all(run: Run) -> None:
    """SIGTERM every bcast process at once (API, scheduler, dispatchers; not the simulator,
    which plays the provider and keeps the count), check each exits cleanly in time, start
    them all again.
    """
    system = run.system
    procs = system.procs
    run.launch()
    run.wait_share(0.35)
    names = [n for n in procs.running if n != "simulator"]
    for name in names:
        procs.terminate(name)
    signalled = time.monotonic()
    run.event(f"SIGTERM to {', '.join(names)}")
    for name in names:
        code = procs.wait_exit(name, max(1.0, signalled + STOP_SECONDS - time.monotonic()))
        took = time.monotonic() - signalled
        if code is None:
            run.verdict.problems.append(f"{name} did not exit within {STOP_SECONDS:g} s")
        elif code not in CLEAN_EXITS:
            run.verdict.problems.append(f"{name} exited with {code}")
        if "Traceback" in procs.log(name):
            run.verdict.problems.append(f"{name} logged a traceback while stopping")
        run.event(f"{name} exited with {code}, {took:.1f} s after the signal")
    held = system.sql(
        "SELECT count(*) FROM delivery WHERE broadcast_id = ANY(%s) AND status = 'sending'",
        (run.broadcast_ids,),
    )[0][0]
    if held:
        run.verdict.problems.append(f"{held} rows still held (sending) after every process left")
    run.event(f"everything stopped; rows still held: {held}")
    system.start_api("api.2")
    system.start_scheduler("scheduler-1.2")
    for i in range(1, run.layout.dispatchers + 1):
        system.start_dispatcher(f"dispatcher-{i}.2", run.layout)
    run.event("all started again")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "kill-dispatcher",
            "kill -9 a dispatcher (parent and workers) 3 times mid-send, a replacement each time",
            kill_dispatcher,
        ),
        Scenario("restart-rabbitmq", "restart the RabbitMQ node mid-send", restart_rabbitmq),
        Scenario(
            "restart-postgres",
            "restart Postgres mid-send (fast shutdown, start)",
            restart_postgres,
        ),
        Scenario(
            "provider-down",
            "the provider refuses connections, then answers 503, then is back",
            provider_down,
            settings=outage_budget,
        ),
        Scenario("throttle-storm", "the provider answers 429 to 90% for a while", throttle_storm),
        Scenario(
            "kill-scheduler",
            "kill -9 the scheduler between claim and publish, and again mid-send",
            kill_scheduler,
        ),
        Scenario(
            "two-schedulers",
            "two schedulers race for several broadcasts due at once",
            two_schedulers,
            layout=Layout(schedulers=2),
            parts=lambda scale: scale.broadcasts,
        ),
        Scenario(
            "sigterm-all",
            "SIGTERM every bcast process mid-send, start them all again",
            sigterm_all,
        ),
    )
}
#: Checks a scenario adds after its broadcasts completed.
AFTER: dict[str, Callable[[Run], None]] = {"two-schedulers": started_once}


def repeat_bound(run: Run) -> tuple[int, str]:
    """Repeats allowed: the calls that can have been under way in the worker processes
    killed outright.
    """
    if not run.killed_workers:
        return 0, "no sending process was killed: 0"
    return (
        MAX_IN_FLIGHT * run.killed_workers,
        f"BCAST_MAX_IN_FLIGHT {MAX_IN_FLIGHT} x {run.killed_workers} worker processes killed",
    )


def run_scenario(
    pg: PrivatePostgres, rabbit: PrivateRabbit, name: str, scale: Scale, logs: Path
) -> Verdict:
    """Run one scenario on a fresh database and vhost of the private servers; the verdict
    says what happened and which rule, if any, was broken.
    """
    scenario = SCENARIOS[name]
    settings = {**base_settings(scale), **scenario.settings(scale)}
    verdict = Verdict(scenario=name, recipients=scale.recipients, logs=str(logs))
    system = System(pg, rabbit, name, logs, settings)
    run = Run(system, scale, verdict, scenario.layout)
    try:
        _drive(run, scenario)
        verdict.repeat_bound, verdict.bound_rule = repeat_bound(run)
        if run.broadcast_ids:
            try:
                verify(system, verdict, run.broadcast_ids, scale.recipients)
            except Exception as exc:
                verdict.problems.append(f"checking failed: {type(exc).__name__}: {exc}")
    finally:
        system.close()
    return verdict


def _drive(run: Run, scenario: Scenario) -> None:
    """Set the scenario up, let it act, wait for the end; problems go to the verdict."""
    system, verdict = run.system, run.verdict
    try:
        system.open(scenario.layout)
        layout = scenario.layout
        system.latency_ms = run.scale.latency_ms(layout.dispatchers * layout.processes)
        system.sim_hook()
        run.tag_ids = system.make_audience(run.scale.recipients, scenario.parts(run.scale))
        scenario.act(run)
        verdict.seconds = round(run.wait_completed(), 1)
        verdict.completed = True
        run.event("every broadcast completed")
        settle(system, run.broadcast_ids)
        if scenario.name in AFTER:
            AFTER[scenario.name](run)
    except ScenarioFailed as exc:
        verdict.problems.append(str(exc))
    except Exception as exc:
        verdict.problems.append(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    if run.created_at is not None and verdict.seconds is None:
        verdict.seconds = round(time.monotonic() - run.created_at, 1)
    for proc, code in system.procs.dead().items():
        how = (
            f"by a {signal.Signals(-code).name} the suite did not send"
            if code < 0
            else f"with exit code {code}"
        )
        verdict.problems.append(f"{proc} ended by itself, {how}")
    verdict.wall_seconds = round(time.monotonic() - run.started, 1)
