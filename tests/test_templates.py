"""Personalised text: placeholders parsed, rendered per contact with defaults, never run."""

from __future__ import annotations

import pytest

from shared.domain.errors import ValidationFailed
from shared.domain.templates import Placeholder, parse


def test_text_without_placeholders_is_not_a_template() -> None:
    assert parse("Hello everyone { not one }") is None


def test_placeholders_render_from_the_contact_with_defaults() -> None:
    t = parse("Hi {{ name | friend }}, {{city|your town}} at {{address}}: {{plan}}!")
    assert t is not None
    assert t.keys == {"name", "city", "address", "plan"}
    ann = {"name": "Ann", "fields": {"city": "Berlin", "plan": "gold"}}
    assert t.render("+4915", ann) == "Hi Ann, Berlin at +4915: gold!"
    nobody = {"name": "", "fields": {}}
    assert t.render("+4916", nobody) == "Hi friend, your town at +4916: !"
    # An erased contact: every placeholder takes its default, its address too.
    assert t.render("(erased)", None) == "Hi friend, your town at : !"


def test_a_value_is_put_in_as_it_is_never_read_as_a_template() -> None:
    t = parse("{{name}}")
    assert t is not None
    evil = {"name": "{{address}} {% import os %} ${7*7} {{7*7}}", "fields": {}}
    assert t.render("secret", evil) == "{{address}} {% import os %} ${7*7} {{7*7}}"


@pytest.mark.parametrize(
    ("text", "kind", "words"),
    [
        ("Hi {{name", "template_unclosed", "character 4"),
        ("Hi {{name}} and {{city", "template_unclosed", "character 17"),
        ("{{ 7*7 }}", "template_key", "names no field"),
        ("{{__class__}}", "template_key", "names no field"),
        ("{{Name}}", "template_key", "names no field"),
        ("{{}}", "template_key", "names no field"),
        ("{{city | a {{b}}", "template_default", "plain text"),
        ("{{city | " + "x" * 201 + "}}", "template_default", "200"),
    ],
)
def test_a_malformed_placeholder_is_refused_saying_where(text: str, kind: str, words: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse(text)
    [error] = caught.value.errors
    assert (error.field, error.type) == ("content.text", kind)
    assert words in error.message


def test_defaults_keep_their_inner_spaces() -> None:
    t = parse("{{ city |  the  big city  }}")
    assert t is not None
    assert t.parts == (Placeholder("city", "the  big city"),)
