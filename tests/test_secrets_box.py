"""The secrets box: sealed values are recognisable, readable with any configured key, and a
value no key opens is a clear error that never carries the value.
"""

from __future__ import annotations

import logging

import pytest
from pydantic import SecretStr, ValidationError

import shared.secrets_box as secrets_box
from shared.domain.channels import open_config, redact_config, seal_config
from shared.domain.errors import ValidationFailed
from shared.domain.lifecycle import ChannelKind
from shared.secrets_box import SEALED_PREFIX, SecretKeyError, SecretsBox, is_sealed, new_key
from shared.settings import Settings

A, B = new_key(), new_key()
SECRET = "a-very-secret-value-0001"


def test_sealed_values_carry_the_prefix_and_open_again() -> None:
    box = SecretsBox([A])
    sealed = box.seal(SECRET)
    assert sealed.startswith(SEALED_PREFIX)
    assert SECRET not in sealed
    assert box.seal(SECRET) != sealed, "every seal is fresh"
    assert box.open(sealed) == SECRET


def test_plain_legacy_values_are_read_as_they_are() -> None:
    assert SecretsBox([A]).open(SECRET) == SECRET
    assert SecretsBox([]).open(SECRET) == SECRET
    assert not is_sealed(SECRET)


def test_every_key_decrypts_and_only_the_first_encrypts() -> None:
    old = SecretsBox([A]).seal(SECRET)
    both = SecretsBox([B, A])
    assert both.open(old) == SECRET
    new = both.seal(SECRET)
    assert SecretsBox([B]).open(new) == SECRET
    with pytest.raises(SecretKeyError):
        SecretsBox([A]).open(new)


def test_reseal_moves_values_to_the_first_key_and_leaves_current_ones_alone() -> None:
    both = SecretsBox([B, A])
    moved = both.reseal(SecretsBox([A]).seal(SECRET))
    assert moved is not None
    assert SecretsBox([B]).open(moved) == SECRET
    assert both.reseal(moved) is None
    plain = both.reseal(SECRET)
    assert plain is not None
    assert SecretsBox([B]).open(plain) == SECRET


def test_a_wrong_key_is_a_clear_error_without_the_value() -> None:
    sealed = SecretsBox([A]).seal(SECRET)
    with pytest.raises(SecretKeyError) as caught:
        SecretsBox([B]).open(sealed)
    message = str(caught.value)
    assert "BCAST_SECRET_KEYS" in message
    assert "add the key" in message
    assert SECRET not in message
    assert sealed not in message
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_without_keys_values_stay_plain_and_sealed_ones_say_what_to_set(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(secrets_box, "_warned_plain", False)
    with caplog.at_level(logging.WARNING, logger="shared.secrets_box"):
        box = SecretsBox([])
        SecretsBox([])
    warned = [r for r in caplog.records if "plain text" in r.getMessage()]
    assert len(warned) == 1, "one warning per process"
    assert not box.enabled
    assert box.seal(SECRET) == SECRET
    with pytest.raises(SecretKeyError, match="BCAST_SECRET_KEYS is not set"):
        box.open(SecretsBox([A]).seal(SECRET))
    with pytest.raises(RuntimeError, match="no key"):
        box.reseal(SECRET)


def test_settings_take_a_comma_separated_list_and_refuse_a_bad_key_without_echoing_it() -> None:
    settings = Settings(secret_keys=SecretStr(f" {B} ,{A},"))
    assert settings.secret_key_list() == [B, A]
    assert Settings(secret_keys=SecretStr("")).secret_key_list() == []
    with pytest.raises(ValidationError) as caught:
        Settings(secret_keys=SecretStr(f"{A},not-a-key-but-a-password"))
    text = str(caught.value)
    assert "key 2 of 2 is not a valid key" in text
    assert "bcast secrets new-key" in text
    assert "not-a-key-but-a-password" not in text
    assert A not in text
    assert A not in repr(settings)


@pytest.mark.parametrize(
    ("kind", "config", "secret_key"),
    [
        (ChannelKind.WEBHOOK, {"url": "http://x.test/h", "secret": SECRET}, "secret"),
        (ChannelKind.TELEGRAM, {"bot_token": "123:abc", "api_base_url": "http://t"}, "bot_token"),
        (ChannelKind.WHATSAPP, {"access_token": SECRET, "phone_number_id": "1"}, "access_token"),
        (ChannelKind.SMTP, {"host": "h", "password": SECRET, "username": "u"}, "password"),
    ],
)
def test_configs_are_sealed_per_kind_and_redacted_as_before(
    kind: ChannelKind, config: dict[str, str], secret_key: str
) -> None:
    box = SecretsBox([A])
    sealed = seal_config(kind, config, box)
    assert is_sealed(sealed[secret_key])
    assert {k: v for k, v in sealed.items() if k != secret_key} == {
        k: v for k, v in config.items() if k != secret_key
    }
    assert open_config(kind, sealed, box) == config
    assert redact_config(kind, sealed) == redact_config(kind, config)


def test_an_smtp_channel_without_a_password_has_nothing_to_seal() -> None:
    config = {"host": "h", "password": None, "username": None}
    assert seal_config(ChannelKind.SMTP, config, SecretsBox([A])) == config


def test_without_keys_a_secret_that_looks_sealed_is_refused() -> None:
    with pytest.raises(ValidationFailed) as caught:
        seal_config(
            ChannelKind.WEBHOOK,
            {"url": "http://x.test/h", "secret": SEALED_PREFIX + "x" * 20},
            SecretsBox([]),
        )
    assert caught.value.errors[0].field == "config.secret"
