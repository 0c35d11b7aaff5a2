"""Where bcast may connect on a workspace's behalf: public internet addresses only.

A channel's config names a host (a webhook URL, a provider's ``api_base_url``, an SMTP
server). Left unchecked, any workspace could point it at the machine's own services, the
cloud's metadata address or the private network and read their answers back. So every
connection a channel makes goes through one rule, ``refusal``: an address is allowed only if
it is globally routable. Loopback, private, shared (CGNAT), link-local (the metadata address
169.254.169.254), multicast, reserved, unspecified and documentation ranges are refused, in
IPv4 and IPv6, and IPv6 forms that carry an IPv4 address (mapped, compatible, 6to4, Teredo,
NAT64) are judged by the IPv4 address they carry.

The rule is applied where it cannot be dodged: to the address a socket is about to connect
to, after name resolution (``Egress.check``), so a name that resolves differently later is
caught too. ``check_host`` also refuses literal addresses and local names when a channel is
created, so an operator hears of the mistake at once rather than at the first send.

``BCAST_ALLOW_PRIVATE_TARGETS=true`` turns the rule off: for the local simulator, tests and
the demo only.
"""

from __future__ import annotations

import ipaddress
import socket
import unicodedata
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: What a refused connection says (the operator reads it as a broadcast's pause reason).
ADVICE = "bcast connects only to public internet addresses"
#: Ranges refused by name, beside what the ``ipaddress`` properties cover: deprecated IPv6
#: site-local, the old 6to4 relay anycast, IPv6 documentation (3fff::/20), discard-only.
_DENIED = tuple(
    ipaddress.ip_network(n)
    for n in ("fec0::/10", "192.88.99.0/24", "3fff::/20", "100::/64", "2001:db8::/32")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
#: Names that always mean this machine or a private network, whatever DNS says.
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa")
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class EgressRefused(OSError):
    """A connection to an address the egress rule refuses. An ``OSError``, so whatever
    opens the socket treats it as a failed connection and never sends a byte.
    """

    def __init__(self, host: str, why: str) -> None:
        self.host = host
        self.why = why
        super().__init__(f"{host} is refused: it is {why}; {ADVICE}")


def _carried_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the forms that carry one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # IPv4-compatible ::a.b.c.d (deprecated)
        return ipaddress.IPv4Address(int(ip))
    return None


def refusal(ip: IPAddress) -> str | None:
    """Why a connection to ``ip`` is refused, in a few words, or None when it is allowed."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "a link-local address"
        carried = _carried_ipv4(ip)
        if carried is not None:
            why = refusal(carried)
            return f"{why} (carried in IPv6)" if why else None
    if any(ip in net for net in _DENIED if net.version == ip.version):
        return "a reserved address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "not a public internet address"
    return None


def parse_literal(host: str) -> IPAddress | None:
    """The address ``host`` spells, in any form a resolver would accept (``127.1``,
    ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``[::1]``, ``::ffff:127.0.0.1``), or None
    when it is a name.
    """
    # Fullwidth digits and ideographic dots are read as the ASCII ones, as URL parsers do.
    text = unicodedata.normalize("NFKC", host).replace("\u3002", ".").strip().strip("[]")
    text = text.rstrip(".")
    if "%" in text:  # a zone id: judged by the address before it
        text = text.split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text and all(c in "0123456789abcdefABCDEFxX." for c in text):
        try:
            # inet_aton takes every legacy IPv4 form: decimal, octal, hex, fewer parts.
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


@dataclass(frozen=True)
class Egress:
    """The egress rule of one process.

    Parameters:
      allow_private: connect anywhere (``BCAST_ALLOW_PRIVATE_TARGETS``; simulators only).
    """

    allow_private: bool = False

    def check(self, address: str, host: str | None = None) -> None:
        """Raise ``EgressRefused`` unless a socket may connect to ``address`` (an IP address,
        as resolved); ``host`` is the name the config gave, for the message.
        """
        if self.allow_private:
            return
        ip = parse_literal(address)
        if ip is None:
            raise EgressRefused(host or address, "not an address")
        why = refusal(ip)
        if why is not None:
            shown = address if not host or host == address else f"{host} ({address})"
            raise EgressRefused(shown, why)

    def check_host(self, host: str) -> None:
        """Raise ``EgressRefused`` for a host that is refused whatever DNS says: a literal
        address the rule refuses, or a name that always means a local machine. Names are
        judged again by the addresses they resolve to when a connection is made.
        """
        if self.allow_private:
            return
        ip = parse_literal(host)
        if ip is not None:
            self.check(str(ip), host)
            return
        name = host.strip().rstrip(".").lower()
        if name in _LOCAL_NAMES or name.endswith(_LOCAL_SUFFIXES) or "." not in name:
            raise EgressRefused(host, "a local name")

    def socket(self, addr_info: tuple[object, ...]) -> socket.socket:
        """A socket for one ``getaddrinfo`` result, made only if its address is allowed: the
        last check before a connection, whatever resolved the name.
        """
        family, type_, proto, _, sockaddr = addr_info
        assert isinstance(sockaddr, tuple)
        self.check(str(sockaddr[0]))
        return socket.socket(family, type_, proto)  # type: ignore[arg-type]
