"""Loopback ports for the simulators, servers and metrics endpoints a benchmark or test starts."""

from __future__ import annotations

import secrets
import socket

#: Ports are picked below the kernel's ephemeral range (32768-60999 by default), never by
#: binding port 0: a port the kernel handed out that way is in the ephemeral range, and any of
#: the hundreds of client connections a starting process makes (to Postgres, RabbitMQ, a
#: simulator) may take it as its own local port before the server binds it; the server then
#: fails with "Address already in use". Kept low enough that RabbitMQ's CLI ports
#: (distribution port + 10000 and up) stay in range too.
LOW, HIGH = 20_000, 30_000


class NoFreePort(RuntimeError):
    """No port in the range could be bound."""


def free_port(low: int = LOW, high: int = HIGH) -> int:
    """A loopback port nobody listens on, outside the ephemeral range."""
    for _ in range(200):
        port = low + secrets.randbelow(high - low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise NoFreePort(f"no free loopback port between {low} and {high}")
