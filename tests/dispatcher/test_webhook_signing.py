"""A webhook body's signature and JSON encoding, as a receiver checks them."""

from __future__ import annotations

import hashlib
import hmac
import json

from services.dispatcher.channels.http import json_body
from services.dispatcher.channels.webhook import keyed, sign


def expected(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def test_a_keyed_hmac_signs_each_body_as_the_secret_itself_does() -> None:
    mac = keyed(b"s3cret")
    bodies = [b'{"to":"a"}', b'{"to":"b"}', b"", b'{"to":"a"}']
    got = [sign(mac, body) for body in bodies]
    assert got == [expected(b"s3cret", body) for body in bodies]
    assert got == [sign(b"s3cret", body) for body in bodies]
    assert got[0] == got[3] != got[1], "signing one body leaves nothing behind for the next"


def test_json_bodies_are_compact_utf8_and_escape_what_json_must() -> None:
    values = [
        "+15550001234",
        'quote " and \\ back',
        "line\nbreak",
        "naïve ✓",
        7,
        2.5,
        None,
        True,
        {"z": 1, "a": [1, 2, {"b": None}], "text": "ü\u2028"},
    ]
    for value in values:
        raw = json_body(value)
        assert json.loads(raw) == value
        assert raw == json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    assert json_body("naïve") == '"naïve"'.encode()
    assert json_body({"b": [1, 2], "a": "x"}) == b'{"b":[1,2],"a":"x"}', "keys keep their order"
