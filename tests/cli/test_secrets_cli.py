"""``bcast secrets`` as an operator runs it: new keys, and rotation from one key to another
with counts printed, a second run that changes nothing, and clear errors without secrets.
"""

from __future__ import annotations

import os

from cryptography.fernet import Fernet

from shared.domain.channels import SECRET_KEYS
from shared.secrets_box import SecretsBox, new_key
from tests.cli.test_cli import run
from tests.secret_rows import PLAIN_CONFIGS, SecretRows

A, B = new_key(), new_key()


def env_for(rows: SecretRows, keys: str | None) -> dict[str, str]:
    env = {**os.environ, "BCAST_DATABASE_URL": rows.url}
    env.pop("BCAST_SECRET_KEYS", None)
    if keys is not None:
        env["BCAST_SECRET_KEYS"] = keys
    return env


def all_plain_secrets(rows: SecretRows) -> list[str]:
    secrets = [c[k] for kind, c in PLAIN_CONFIGS.items() for k in SECRET_KEYS[kind]]
    return [*secrets, *rows.signing_keys.values()]


def test_new_key_prints_a_usable_key() -> None:
    made = run("secrets", "new-key", env=dict(os.environ))
    assert made.returncode == 0, made.stderr
    Fernet(made.stdout.strip())


def test_rotate_from_a_to_b_then_run_with_b_alone(secret_rows: SecretRows) -> None:
    secret_rows.add(SecretsBox([A]), workspaces=2)
    secret_rows.add(SecretsBox([A]), workspaces=1, plain=True)

    rotated = run("secrets", "rotate", "--batch-size", "3", env=env_for(secret_rows, f"{B},{A}"))
    assert rotated.returncode == 0, rotated.stderr
    assert "channels: 12 re-encrypted, 0 already current, 0 unreadable" in rotated.stdout
    assert "workspaces: 3 re-encrypted, 0 already current, 0 unreadable" in rotated.stdout
    secret_rows.assert_readable_with(SecretsBox([B]))

    again = run("secrets", "rotate", env=env_for(secret_rows, B))
    assert again.returncode == 0, again.stderr
    assert "channels: 0 re-encrypted, 12 already current, 0 unreadable" in again.stdout
    assert "workspaces: 0 re-encrypted, 3 already current, 0 unreadable" in again.stdout


def test_a_wrong_key_is_a_clear_error_that_names_rows_not_secrets(
    secret_rows: SecretRows,
) -> None:
    secret_rows.add(SecretsBox([A]), workspaces=1)
    before = secret_rows.stored()
    wrong = run("secrets", "rotate", env=env_for(secret_rows, new_key()))
    assert wrong.returncode == 1
    assert "channels: 0 re-encrypted, 0 already current, 4 unreadable" in wrong.stdout
    assert "cannot be decrypted with any key in BCAST_SECRET_KEYS" in wrong.stderr
    assert f"channel ids {', '.join(map(str, sorted(secret_rows.channels)))}" in wrong.stderr
    assert "Add the key they were encrypted with" in wrong.stderr
    output = wrong.stdout + wrong.stderr
    assert "Traceback" not in output
    for secret in all_plain_secrets(secret_rows):
        assert secret not in output
    assert secret_rows.stored() == before


def test_rotate_without_a_key_or_with_a_malformed_one_says_what_to_do(
    secret_rows: SecretRows,
) -> None:
    unset = run("secrets", "rotate", env=env_for(secret_rows, None))
    assert unset.returncode == 2
    assert "BCAST_SECRET_KEYS is not set" in unset.stderr
    assert "bcast secrets new-key" in unset.stderr

    malformed = run("secrets", "rotate", env=env_for(secret_rows, f"{A},my-password-123"))
    assert malformed.returncode == 2
    assert "BCAST_SECRET_KEYS: key 2 of 2 is not a valid key" in malformed.stderr
    assert "my-password-123" not in malformed.stdout + malformed.stderr
    assert A not in malformed.stdout + malformed.stderr
    assert "Traceback" not in malformed.stderr
