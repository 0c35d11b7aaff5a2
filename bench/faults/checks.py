"""What a scenario must show at the end, read from Postgres and from the provider simulator.

* completed: every broadcast of the scenario ends ``completed`` within the deadline.
* lost (must be 0): a recipient with no delivery row, a row ``sent`` that the provider never
  accepted, or a request the provider accepted whose row does not say ``sent``.
* repeats: requests for an idempotency key the provider had already accepted. Only calls under
  way in a process killed outright may repeat (the answer came, the process died before
  writing it), so they must stay within ``BCAST_MAX_IN_FLIGHT`` x the worker processes killed.
* stuck (must be 0): batches not ``done`` (nor dropped), outbox rows, rows ``queued`` or
  ``sending``.
* failed (must be 0): no scenario here makes a recipient fail for good (the provider is back
  within the retry budget), so a failed row is a recipient given up on wrongly.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.faults.system import System

#: Delivery statuses that end a recipient's story.
FINAL = ("sent", "failed", "partial", "skipped", "canceled")
#: Longest wait, after the broadcasts completed, for their batches and outbox rows to go (a
#: run that just finished gives its batch back, and the next sweep drops it).
SETTLE_SECONDS = 60.0
#: Repeated keys listed in the report.
SHOWN_REPEATS = 20


@dataclass
class Verdict:
    """The outcome of one scenario, as the table and the JSON report show it."""

    scenario: str
    recipients: int
    #: From the first broadcast's creation to the last one's completion (or to the deadline).
    seconds: float | None = None
    #: The whole scenario: setup, send, checks.
    wall_seconds: float | None = None
    completed: bool = False
    sent: int = 0
    failed: int = 0
    lost: int = 0
    lost_detail: dict[str, Any] = field(default_factory=dict)
    repeats: int = 0
    repeated_keys: dict[str, int] = field(default_factory=dict)
    repeat_bound: int = 0
    bound_rule: str = ""
    stuck: int = 0
    stuck_detail: dict[str, Any] = field(default_factory=dict)
    batches_by_state: dict[str, int] = field(default_factory=dict)
    deliveries_by_status: dict[str, int] = field(default_factory=dict)
    provider: dict[str, int] = field(default_factory=dict)
    #: What the scenario did, and when (the faults it injected, with progress at the time).
    events: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    logs: str = ""

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["result"] = "PASS" if self.passed else "FAIL"
        if self.passed:
            del out["logs"]  # removed with the suite's temp dir
        return out


def settle(system: System, broadcast_ids: list[int]) -> None:
    """Wait (bounded) until no batch of the broadcasts is left and the outbox is empty."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        left = system.try_sql(
            "SELECT (SELECT count(*) FROM delivery_batch WHERE broadcast_id = ANY(%s) "
            "AND state <> 'done') + (SELECT count(*) FROM dispatch_outbox)",
            (broadcast_ids,),
        )
        if left is not None and left[0][0] == 0:
            return
        time.sleep(0.2)


def verify(system: System, verdict: Verdict, broadcast_ids: list[int], expected: int) -> None:
    """Fill ``verdict`` from the database and the simulator, adding a problem for each rule
    broken.
    """
    problems = verdict.problems
    statuses = dict(
        system.sql("SELECT id, status FROM broadcast WHERE id = ANY(%s)", (broadcast_ids,))
    )
    for broadcast_id in broadcast_ids:
        status = statuses.get(broadcast_id, "missing")
        if status != "completed":
            problems.append(f"broadcast {broadcast_id} ended {status}, not completed")
    by_status = {
        str(s): int(n)
        for s, n in system.sql(
            "SELECT status, count(*) FROM delivery WHERE broadcast_id = ANY(%s) GROUP BY status",
            (broadcast_ids,),
        )
    }
    by_state = {
        str(s): int(n)
        for s, n in system.sql(
            "SELECT state, count(*) FROM delivery_batch WHERE broadcast_id = ANY(%s) "
            "GROUP BY state",
            (broadcast_ids,),
        )
    }
    outbox = int(system.sql("SELECT count(*) FROM dispatch_outbox")[0][0])
    verdict.deliveries_by_status = by_status
    verdict.batches_by_state = by_state

    # Every recipient has exactly one row (unique per broadcast and contact), and it is final.
    rows = sum(by_status.values())
    not_final = {s: n for s, n in by_status.items() if s not in FINAL}
    verdict.sent = by_status.get("sent", 0)
    verdict.failed = sum(by_status.get(s, 0) for s in ("failed", "partial"))

    # Both ways between the rows that say sent and the requests the provider accepted.
    sent_ids = {
        str(r[0])
        for r in system.sql(
            "SELECT id FROM delivery WHERE broadcast_id = ANY(%s) AND status = 'sent'",
            (broadcast_ids,),
        )
    }
    records = system.sim_records()
    accepted: set[str] = set()
    repeated: Counter[str] = Counter()
    for record in records:
        key = str(record.get("key"))
        if key in accepted:
            repeated[key] += 1
        elif record.get("status") == 200:
            accepted.add(key)
    sent_not_accepted = sorted(sent_ids - accepted)
    accepted_not_sent = sorted(accepted - sent_ids)
    missing = max(0, expected - rows)
    verdict.lost = missing + len(sent_not_accepted) + len(accepted_not_sent)
    verdict.lost_detail = {
        "recipients_without_a_row": missing,
        "sent_rows_not_accepted_by_the_provider": len(sent_not_accepted),
        "accepted_by_the_provider_not_sent": len(accepted_not_sent),
        "examples": (sent_not_accepted + accepted_not_sent)[:10],
    }
    verdict.repeats = sum(repeated.values())
    verdict.repeated_keys = dict(repeated.most_common(SHOWN_REPEATS))
    statuses_seen = Counter(r.get("status") for r in records)
    verdict.provider = {
        "requests": len(records),
        "accepted": len(accepted),
        "throttled_429": statuses_seen.get(429, 0),
        "unavailable_503": statuses_seen.get(503, 0),
        "bad_signatures": sum(1 for r in records if r.get("signature_ok") is False),
    }
    verdict.stuck_detail = {
        "batches_not_done": {s: n for s, n in by_state.items() if s != "done"},
        "outbox_rows": outbox,
        "deliveries_not_final": not_final,
    }
    verdict.stuck = (
        sum(verdict.stuck_detail["batches_not_done"].values()) + outbox + sum(not_final.values())
    )

    if rows > expected:
        problems.append(f"{rows} delivery rows for {expected} recipients")
    if verdict.lost:
        problems.append(f"lost {verdict.lost}: {verdict.lost_detail}")
    if verdict.repeats > verdict.repeat_bound:
        problems.append(
            f"{verdict.repeats} repeats, more than the bound {verdict.repeat_bound} "
            f"({verdict.bound_rule})"
        )
    if verdict.stuck:
        problems.append(f"stuck: {verdict.stuck_detail}")
    if verdict.failed:
        problems.append(f"{verdict.failed} recipients failed: {by_status}")
    if verdict.provider["bad_signatures"]:
        problems.append(f"{verdict.provider['bad_signatures']} requests with a bad signature")
