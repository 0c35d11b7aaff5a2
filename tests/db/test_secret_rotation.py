"""Rotation re-encrypts every channel secret and signing key with the first key, in batches,
legacy plain values included; a second run changes nothing; unreadable rows are reported by id.
"""

from __future__ import annotations

import pytest

from shared.domain.secret_rotation import rotate_secrets
from shared.secrets_box import SecretKeyError, SecretsBox, new_key
from tests.secret_rows import SecretRows

A, B = new_key(), new_key()


def test_rotation_from_a_to_b_then_b_alone_reads_everything(secret_rows: SecretRows) -> None:
    secret_rows.add(SecretsBox([A]), workspaces=3)
    report = rotate_secrets(secret_rows.transaction, SecretsBox([B, A]), batch_size=2)
    assert (report.channels.resealed, report.channels.current) == (12, 0)
    assert (report.workspaces.resealed, report.workspaces.current) == (3, 0)
    assert report.complete
    secret_rows.assert_readable_with(SecretsBox([B]))
    _, keys = secret_rows.stored()
    with pytest.raises(SecretKeyError):
        SecretsBox([A]).open(next(iter(keys.values())))

    before = secret_rows.stored()
    again = rotate_secrets(secret_rows.transaction, SecretsBox([B]), batch_size=5)
    assert (again.channels.resealed, again.channels.current) == (0, 12)
    assert (again.workspaces.resealed, again.workspaces.current) == (0, 3)
    assert secret_rows.stored() == before, "a second run writes nothing"


def test_legacy_plain_rows_are_read_and_then_encrypted(secret_rows: SecretRows) -> None:
    secret_rows.add(SecretsBox([A]), workspaces=1, plain=True)
    configs, keys = secret_rows.stored()
    assert all(not v.startswith("enc:") for v in keys.values())
    assert "webhook-secret-0001" in str(configs)
    report = rotate_secrets(secret_rows.transaction, SecretsBox([A]))
    assert (report.channels.resealed, report.workspaces.resealed) == (4, 1)
    secret_rows.assert_readable_with(SecretsBox([A]))
    assert "webhook-secret-0001" not in str(secret_rows.stored())


def test_rows_no_key_can_read_are_left_alone_and_reported_by_id(
    secret_rows: SecretRows,
) -> None:
    secret_rows.add(SecretsBox([A]), workspaces=1)
    secret_rows.add(SecretsBox([B]), workspaces=1)
    unreadable_channels = sorted(secret_rows.channels)[4:]
    unreadable_workspaces = sorted(secret_rows.signing_keys)[1:]
    before = secret_rows.stored()
    report = rotate_secrets(secret_rows.transaction, SecretsBox([new_key(), A]), batch_size=3)
    assert not report.complete
    assert report.channels.unreadable == unreadable_channels
    assert report.workspaces.unreadable == unreadable_workspaces
    assert (report.channels.resealed, report.workspaces.resealed) == (4, 1)
    after = secret_rows.stored()
    assert {i: after[0][i] for i in unreadable_channels} == {
        i: before[0][i] for i in unreadable_channels
    }


def test_rotation_needs_a_key(secret_rows: SecretRows) -> None:
    with pytest.raises(RuntimeError, match="no key"):
        rotate_secrets(secret_rows.transaction, SecretsBox([]))
