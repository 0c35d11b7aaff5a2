"""What may go to one recipient on a provider with a 24-hour conversation window, decided at
its send (``services.dispatcher.conversation``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.dispatcher.channels.base import MediaRef, OutboundMessage, Permanent
from services.dispatcher.conversation import message_for, rule_for
from shared.domain.lifecycle import ChannelKind

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
IMG = (MediaRef(1, "https://api.test/media/1", "image/jpeg", "k1"),)
MESSAGE = OutboundMessage(7, "Hello", IMG)
TEMPLATE = {
    "name": "welcome",
    "language": "de",
    "components": [
        {"type": "header", "parameters": [{"type": "image", "media_id": 9}]},
        {"type": "body", "parameters": [{"type": "text", "text": "{{name | friend}}"}]},
        {
            "type": "button",
            "sub_type": "url",
            "index": 1,
            "parameters": [{"type": "text", "text": "{{code}}"}],
        },
    ],
}


def contact(hours_ago: float | None, **more: Any) -> dict[str, Any]:
    wrote = None if hours_ago is None else (NOW - timedelta(hours=hours_ago)).isoformat()
    return {"last_inbound_at": wrote, **more}


def test_kinds_without_a_window_have_no_rule() -> None:
    for kind in (ChannelKind.TELEGRAM, ChannelKind.LINE, ChannelKind.WEBHOOK, ChannelKind.SMTP):
        assert rule_for(kind, {"text": "x"}, {}) is None


@pytest.mark.parametrize("kind", [ChannelKind.WHATSAPP, ChannelKind.MESSENGER])
def test_free_form_goes_inside_the_window_and_fails_outside_without_a_way_to_reach(
    kind: ChannelKind,
) -> None:
    rule = rule_for(kind, {"text": "Hello", "media_ids": [1]}, {})
    assert rule is not None
    assert message_for(rule, MESSAGE, "a", contact(23.9), NOW) == MESSAGE
    for outside in (contact(24.1), contact(None), None):
        refused = message_for(rule, MESSAGE, "a", outside, NOW)
        assert isinstance(refused, Permanent)
        assert "outside the 24-hour conversation window" in refused.reason
        assert not refused.unreachable
    assert "last wrote in at 2026-11-26 11:54 UTC" in str(
        message_for(rule, MESSAGE, "a", contact(24.1), NOW)
    )


def test_whatsapp_sends_the_template_rendered_for_each_recipient_outside_the_window() -> None:
    rule = rule_for(
        ChannelKind.WHATSAPP,
        {"text": "Hello", "media_ids": [1], "template": TEMPLATE},
        {9: "https://api.test/media/9?signature=x"},
    )
    assert rule is not None
    assert rule.needs_contact
    out = message_for(rule, MESSAGE, "+49151", contact(30, name="", fields={"code": "A1"}), NOW)
    assert isinstance(out, OutboundMessage)
    assert (out.text, out.media) == (None, ())
    assert out.template == {
        "name": "welcome",
        "language": {"code": "de"},
        "components": [
            {
                "type": "header",
                "parameters": [
                    {"type": "image", "image": {"link": "https://api.test/media/9?signature=x"}}
                ],
            },
            {"type": "body", "parameters": [{"type": "text", "text": "friend"}]},
            {
                "type": "button",
                "parameters": [{"type": "text", "text": "A1"}],
                "sub_type": "url",
                "index": "1",
            },
        ],
    }
    # Inside the window the free-form message goes, not the template.
    assert message_for(rule, MESSAGE, "+49151", contact(1), NOW) == MESSAGE


def test_a_template_alone_goes_to_everyone_inside_the_window_or_not() -> None:
    rule = rule_for(ChannelKind.WHATSAPP, {"template": TEMPLATE}, {9: "u"})
    assert rule is not None
    for wrote in (contact(1, fields={"code": "A"}), contact(None, fields={"code": "B"})):
        out = message_for(rule, OutboundMessage(7, None), "+49151", wrote, NOW)
        assert isinstance(out, OutboundMessage)
        assert out.template is not None


def test_human_agent_reaches_those_who_wrote_within_seven_days_and_no_one_after() -> None:
    rule = rule_for(ChannelKind.INSTAGRAM, {"text": "Hi", "message_tag": "HUMAN_AGENT"}, {})
    assert rule is not None
    inside = message_for(rule, MESSAGE, "1", contact(2), NOW)
    assert isinstance(inside, OutboundMessage)
    assert inside.tag is None, "inside the window: messaging_type UPDATE"
    tagged = message_for(rule, MESSAGE, "1", contact(24 * 6.9), NOW)
    assert isinstance(tagged, OutboundMessage)
    assert tagged.tag == "HUMAN_AGENT"
    late = message_for(rule, MESSAGE, "1", contact(24 * 7.1), NOW)
    assert isinstance(late, Permanent)
    assert "a message tag other than HUMAN_AGENT" in late.reason


def test_a_tag_with_no_time_limit_reaches_even_one_who_never_wrote() -> None:
    rule = rule_for(ChannelKind.MESSENGER, {"text": "Hi", "message_tag": "ACCOUNT_UPDATE"}, {})
    assert rule is not None
    out = message_for(rule, MESSAGE, "1", contact(None), NOW)
    assert isinstance(out, OutboundMessage)
    assert out.tag == "ACCOUNT_UPDATE"


def test_a_contacts_values_are_fitted_to_what_a_parameter_may_hold_or_fail_that_recipient() -> None:
    template = {
        "name": "t",
        "language": "en",
        "components": [
            {"type": "header", "parameters": [{"type": "text", "text": "{{city}}"}]},
            {"type": "body", "parameters": [{"type": "text", "text": "Hi {{name}}"}]},
        ],
    }
    rule = rule_for(ChannelKind.WHATSAPP, {"template": template}, {})
    assert rule is not None
    spaced = contact(None, name="Ann\tB      C", fields={"city": "Rome"})
    out = message_for(rule, OutboundMessage(7, None), "+49151", spaced, NOW)
    assert isinstance(out, OutboundMessage)
    assert out.template is not None
    assert out.template["components"][1]["parameters"][0]["text"] == "Hi Ann B    C"
    long_city = contact(None, fields={"city": "x" * 61})
    refused = message_for(rule, OutboundMessage(7, None), "+49151", long_city, NOW)
    assert isinstance(refused, Permanent)
    assert refused.reason == (
        "template parameter components[0].parameters[0] is 61 characters for this recipient; "
        "at most 60"
    )
    no_city = message_for(rule, OutboundMessage(7, None), "+49151", contact(None), NOW)
    assert isinstance(no_city, Permanent)
    assert "is empty for this recipient" in no_city.reason
