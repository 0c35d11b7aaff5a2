"""The retry policy: one pure function from a provider's answer to a row's next state.

Nothing here touches a clock, a database or a random generator: ``decide`` takes the jitter
as a number, so every case is a line in a table (tests/dispatcher/test_retry.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.dispatcher.channels.base import Outcome, Permanent, Sent
from shared.domain.lifecycle import DeliveryStatus
from shared.values import value

#: Largest exponent of the backoff's doubling; past it the ceiling (``max_seconds``) rules.
MAX_DOUBLINGS = 60


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to try one recipient.

    Parameters:
      max_attempts: attempts (provider calls that may have reached the recipient) before a
        transient failure becomes final.
      base_seconds: the first backoff's scale; each further attempt doubles its ceiling.
      max_seconds: the longest backoff.
      throttle_seconds: the wait when a provider throttles the channel without saying how long.
    """

    max_attempts: int
    base_seconds: float
    max_seconds: float
    throttle_seconds: float = 1.0

    def backoff(self, attempts: int, jitter: float) -> float:
        """Seconds before the next attempt after ``attempts`` failed ones: half the base, plus
        ``jitter`` (0 to 1) of an exponentially growing ceiling ("full jitter"), so the
        retries of many recipients spread out instead of returning together.
        """
        doublings = min(max(attempts - 1, 0), MAX_DOUBLINGS)
        ceiling = min(self.max_seconds, self.base_seconds * 2.0**doublings)
        return min(self.max_seconds, self.base_seconds / 2 + jitter * ceiling)


@value
class Decision:
    """A row's next state after one provider call."""

    status: DeliveryStatus
    #: For ``queued``: seconds before the next attempt.
    delay: float | None = None
    #: False: the attempt does not count (the provider throttled the whole channel).
    attempt_used: bool = True
    reason: str | None = None
    #: The metrics outcome: sent, failed, partial, retry, throttled or held (stopped between
    #: the parts of a message).
    label: str = "sent"


#: What every accepted call comes to (made once: a send makes enough records as it is).
SENT = Decision(DeliveryStatus.SENT)


def decide(
    policy: RetryPolicy, outcome: Outcome, *, attempts: int, parts_before: int, jitter: float
) -> Decision:
    """The next state of a row whose ``attempts``-th attempt ended with ``outcome``.

    ``parts_before``: parts of a several-call message accepted by earlier attempts. A failure
    that comes after any part was accepted is ``partial``: the recipient got something.
    """
    if isinstance(outcome, Sent):
        return SENT
    parts = max(parts_before, outcome.parts_done)
    if isinstance(outcome, Permanent):
        return _final(outcome.reason, parts)
    if outcome.refused and outcome.by_provider:
        # The broadcast pauses; the attempt counts, so a recipient whose own refusal was
        # taken for everyone's fails after the last one instead of pausing it at each resume.
        if attempts >= policy.max_attempts:
            return _final(f"gave up after {attempts} attempts: {outcome.reason}", parts)
        return Decision(DeliveryStatus.QUEUED, reason=outcome.reason, label="held")
    if outcome.held_back or outcome.refused:
        return Decision(
            DeliveryStatus.QUEUED, attempt_used=False, reason=outcome.reason, label="held"
        )
    if outcome.throttled:
        return Decision(
            DeliveryStatus.QUEUED,
            delay=outcome.retry_after
            if outcome.retry_after is not None
            else policy.throttle_seconds,
            attempt_used=False,
            reason=outcome.reason,
            label="throttled",
        )
    if attempts >= policy.max_attempts:
        return _final(f"gave up after {attempts} attempts: {outcome.reason}", parts)
    return Decision(
        DeliveryStatus.QUEUED,
        delay=max(outcome.retry_after or 0.0, policy.backoff(attempts, jitter)),
        reason=outcome.reason,
        label="retry",
    )


def _final(reason: str, parts: int) -> Decision:
    if parts > 0:
        return Decision(
            DeliveryStatus.PARTIAL,
            reason=f"{parts} part(s) delivered, then: {reason}",
            label="partial",
        )
    return Decision(DeliveryStatus.FAILED, reason=reason, label="failed")
