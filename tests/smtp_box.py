"""A real SMTP server on loopback (aiosmtpd) that keeps what it receives and misbehaves on request."""

from __future__ import annotations

import asyncio
from collections import Counter
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from bench.ports import free_port


class Mailbox:
    """aiosmtpd handler: refuses ``refuse`` mailboxes with 550, answers 451 to each mailbox
    ``transient_first`` times, and keeps every accepted message.
    """

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.refuse: set[str] = set()
        self.transient_first = 0
        self.tries: Counter[str] = Counter()
        #: Seconds the server sits on a message before answering DATA (a stalled relay).
        self.stall_seconds = 0.0
        #: Sessions that greeted (EHLO), and those that ended with QUIT (a polite close).
        self.greetings = 0
        self.quits = 0

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: Any,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 No such user here"
        self.tries[address] += 1
        if self.tries[address] <= self.transient_first:
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: Any,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        self.greetings += 1
        session.host_name = hostname
        return responses

    async def handle_QUIT(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Session, envelope: Envelope
    ) -> str:
        self.quits += 1
        return "221 Bye"

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Session, envelope: Envelope
    ) -> str:
        if self.stall_seconds:
            await asyncio.sleep(self.stall_seconds)
        content = (
            envelope.content
            if isinstance(envelope.content, bytes)
            else str(envelope.content).encode()
        )
        self.messages.append(message_from_bytes(content, policy=policy.default))
        self.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"


def authenticator(
    server: Any, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        b"news",
        b"s3cret-pass",
    )
    return AuthResult(success=ok, handled=False)


def start(mailbox: Mailbox, **kwargs: Any) -> Controller:
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port(), **kwargs)
    controller.start()
    return controller
