"""The retry policy, case by case: a provider's answer and the attempts so far -> next state."""

from __future__ import annotations

import pytest

from services.dispatcher.channels.base import Outcome, Permanent, Sent, Transient
from services.dispatcher.retry import Decision, RetryPolicy, decide
from shared.domain.lifecycle import DeliveryStatus as S

POLICY = RetryPolicy(max_attempts=5, base_seconds=2.0, max_seconds=300.0, throttle_seconds=1.0)


@pytest.mark.parametrize(
    ("outcome", "attempts", "parts_before", "jitter", "expected"),
    [
        # Accepted: sent, whatever came before.
        (Sent("m1"), 1, 0, 0.5, Decision(S.SENT)),
        (Sent("m1"), 5, 2, 0.5, Decision(S.SENT)),
        # Refused for good: failed at once, no retry, attempts do not matter.
        (
            Permanent("HTTP 400: bad"),
            1,
            0,
            0.5,
            Decision(S.FAILED, reason="HTTP 400: bad", label="failed"),
        ),
        (
            Permanent("blocked", unreachable=True),
            3,
            0,
            0.0,
            Decision(S.FAILED, reason="blocked", label="failed"),
        ),
        # Refused after some parts of a several-part message were accepted: partial.
        (
            Permanent("image refused", parts_done=2),
            1,
            0,
            0.5,
            Decision(S.PARTIAL, reason="2 part(s) delivered, then: image refused", label="partial"),
        ),
        (
            Permanent("image refused"),
            2,
            1,
            0.5,
            Decision(S.PARTIAL, reason="1 part(s) delivered, then: image refused", label="partial"),
        ),
        # Transient: back to the queue after a backoff of base/2 + jitter * min(max, base * 2^(n-1)).
        (
            Transient("HTTP 503"),
            1,
            0,
            0.0,
            Decision(S.QUEUED, 1.0, reason="HTTP 503", label="retry"),
        ),
        (
            Transient("HTTP 503"),
            1,
            0,
            0.5,
            Decision(S.QUEUED, 2.0, reason="HTTP 503", label="retry"),
        ),
        (
            Transient("HTTP 503"),
            3,
            0,
            1.0,
            Decision(S.QUEUED, 9.0, reason="HTTP 503", label="retry"),
        ),
        # The provider's Retry-After wins when it is longer.
        (
            Transient("HTTP 503", retry_after=30.0),
            1,
            0,
            0.5,
            Decision(S.QUEUED, 30.0, reason="HTTP 503", label="retry"),
        ),
        (
            Transient("HTTP 503", retry_after=0.1),
            2,
            0,
            0.0,
            Decision(S.QUEUED, 1.0, reason="HTTP 503", label="retry"),
        ),
        # The last attempt: final, with how many it took.
        (
            Transient("HTTP 503"),
            5,
            0,
            0.5,
            Decision(S.FAILED, reason="gave up after 5 attempts: HTTP 503", label="failed"),
        ),
        (
            Transient("timeout", parts_done=1),
            5,
            0,
            0.5,
            Decision(
                S.PARTIAL,
                reason="1 part(s) delivered, then: gave up after 5 attempts: timeout",
                label="partial",
            ),
        ),
        # Held back between the parts of a message (a pause): not a failure, no attempt spent,
        # the rest goes when the row is claimed again.
        (
            Transient("held back before part 2 of 3", parts_done=1, held_back=True),
            4,
            0,
            0.5,
            Decision(
                S.QUEUED,
                attempt_used=False,
                reason="held back before part 2 of 3",
                label="held",
            ),
        ),
        # Throttled: the channel's fault, not the recipient's. The attempt does not count, even
        # at the last one, and the wait is what the provider asked (or the default).
        (
            Transient("429", retry_after=7.0, throttled=True),
            5,
            0,
            0.5,
            Decision(S.QUEUED, 7.0, attempt_used=False, reason="429", label="throttled"),
        ),
        (
            Transient("429", throttled=True),
            1,
            0,
            0.5,
            Decision(S.QUEUED, 1.0, attempt_used=False, reason="429", label="throttled"),
        ),
    ],
)
def test_decide(
    outcome: Outcome, attempts: int, parts_before: int, jitter: float, expected: Decision
) -> None:
    assert (
        decide(POLICY, outcome, attempts=attempts, parts_before=parts_before, jitter=jitter)
        == expected
    )


@pytest.mark.parametrize(
    ("attempts", "jitter", "seconds"),
    [
        (1, 0.0, 1.0),  # half the base, always: never a busy retry
        (1, 1.0, 3.0),
        (2, 1.0, 5.0),
        (8, 1.0, 257.0),
        (9, 1.0, 300.0),  # the ceiling rules from here
        (10_000, 1.0, 300.0),  # no overflow however many attempts
        (10_000, 0.0, 1.0),
        (0, 0.5, 2.0),
    ],
)
def test_backoff_grows_to_a_ceiling(attempts: int, jitter: float, seconds: float) -> None:
    assert POLICY.backoff(attempts, jitter) == pytest.approx(seconds)


def test_many_recipients_retrying_at_once_spread_out() -> None:
    delays = [POLICY.backoff(4, j / 100) for j in range(100)]
    assert min(delays) == pytest.approx(1.0)
    assert max(delays) == pytest.approx(1.0 + 0.99 * 16.0)
    assert len(set(delays)) == 100


def test_a_providers_refusal_holds_the_row_and_uses_its_attempt_until_the_last() -> None:
    """The broadcast pauses on a refusal the provider gave (a template, a revoked token); the
    attempt counts, so if the refusal was in fact this recipient's own it fails after its
    last attempt instead of pausing the broadcast at every resume.
    """
    policy = RetryPolicy(max_attempts=3, base_seconds=1, max_seconds=10)
    refused = Transient(
        "WhatsApp 132001: template name does not exist", refused=True, by_provider=True
    )
    held = decide(policy, refused, attempts=2, parts_before=0, jitter=0.5)
    assert (held.status, held.attempt_used, held.label) == (S.QUEUED, True, "held")
    last = decide(policy, refused, attempts=3, parts_before=0, jitter=0.5)
    assert last.status is S.FAILED
    assert last.reason == "gave up after 3 attempts: WhatsApp 132001: template name does not exist"
    # The sender's own refusal (no call was made) spends nothing, however often.
    own = decide(
        policy, Transient("egress refused", refused=True), attempts=3, parts_before=0, jitter=0.5
    )
    assert (own.status, own.attempt_used) == (S.QUEUED, False)
