"""Secrets at rest: channel credentials and media signing keys, encrypted with the keys in
``BCAST_SECRET_KEYS``.

A stored secret is either ``enc:v1:<Fernet token>`` or, from before encryption was turned on
(or while it is off), the plain value. The first key encrypts; every key is tried to decrypt,
so a new key can be put first while values encrypted with the old one stay readable until
``bcast secrets rotate`` has re-encrypted them (docs/secrets.md).

Without keys, values are stored plain and a warning is logged once per process: a dev box
works without setup, and production sets the keys.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: Marks an encrypted value; ``v1`` is Fernet (AES-128-CBC with HMAC-SHA256).
SEALED_PREFIX = "enc:v1:"
SETTING = "BCAST_SECRET_KEYS"
_UNREADABLE = (
    f"a stored secret cannot be decrypted with any key in {SETTING}; add the key it was "
    "encrypted with (after the one that encrypts now) and try again"
)


class SecretKeyError(Exception):
    """A stored secret cannot be decrypted with the configured keys. The message says what to
    change and never carries the value.
    """


def new_key() -> str:
    """A fresh key for ``BCAST_SECRET_KEYS`` (32 random bytes, URL-safe base64)."""
    return Fernet.generate_key().decode()


def is_sealed(stored: str) -> bool:
    """True when ``stored`` is an encrypted value rather than a legacy plain one."""
    return stored.startswith(SEALED_PREFIX)


_warned_plain = False


def _warn_plain_once() -> None:
    global _warned_plain
    if not _warned_plain:
        _warned_plain = True
        log.warning(
            "%s is not set: channel secrets and media signing keys are stored in plain text. "
            "Set it (make a key with `bcast secrets new-key`) and run `bcast secrets rotate`.",
            SETTING,
        )


class SecretsBox:
    """Seals and opens secret values.

    Parameters:
      keys: Fernet keys; the first seals, all are tried to open. Empty: values are stored
        plain (with one warning per process) and only plain values can be read.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self._primary = Fernet(keys[0]) if keys else None
        self._all = MultiFernet([Fernet(k) for k in keys]) if keys else None
        if not keys:
            _warn_plain_once()

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretsBox:
        return cls(settings.secret_key_list())

    @property
    def enabled(self) -> bool:
        """True when values are encrypted on write."""
        return self._primary is not None

    def seal(self, value: str) -> str:
        """The stored form of ``value``: encrypted with the first key, or plain without keys."""
        if self._primary is None:
            return value
        return SEALED_PREFIX + self._primary.encrypt(value.encode()).decode()

    def open(self, stored: str) -> str:
        """The plain value of a stored one; a legacy plain value is returned as it is."""
        if not is_sealed(stored):
            return stored
        if self._all is None:
            raise SecretKeyError(
                f"a stored secret is encrypted but {SETTING} is not set; set it to the key(s) "
                "the secrets were encrypted with"
            )
        try:
            return self._all.decrypt(stored[len(SEALED_PREFIX) :].encode()).decode()
        except InvalidToken:
            raise SecretKeyError(_UNREADABLE) from None

    def reseal(self, stored: str) -> str | None:
        """``stored`` encrypted with the first key, or None when it already is. Raises
        ``SecretKeyError`` when it cannot be decrypted, ``RuntimeError`` without keys.
        """
        if self._primary is None or self._all is None:
            raise RuntimeError(f"{SETTING} is not set: there is no key to encrypt with")
        if not is_sealed(stored):
            return self.seal(stored)
        token = stored[len(SEALED_PREFIX) :].encode()
        try:
            self._primary.decrypt(token)
        except InvalidToken:
            pass
        else:
            return None
        try:
            return SEALED_PREFIX + self._all.rotate(token).decode()
        except InvalidToken:
            raise SecretKeyError(_UNREADABLE) from None


@lru_cache(maxsize=1)
def get_secrets_box() -> SecretsBox:
    """The process-wide box, made from the settings once."""
    return SecretsBox.from_settings(get_settings())
