"""What the entries of a URL list may reach, checked on the address a connection would really use.

A list from a crawl may name anything: ``file:///etc/…``, a cloud metadata service, a host on the
private network behind the machine that runs the tool. :class:`SourcePolicy` bounds it twice:

* when the list is read (:meth:`SourcePolicy.refusal`, no network): the entry's scheme must be
  allowed, and a host written as an address — in any spelling the OS resolver accepts
  (``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376``, ``127.1``, ``[::ffff:169.254.169.254]``,
  a trailing dot) — or a metadata name must be a globally routable address;
* when an http(s) entry is fetched (:meth:`SourcePolicy.addresses`): the host is resolved once and
  *every* address it resolves to must be globally routable. The fetch then connects to exactly
  those checked addresses (:mod:`data_prep.fetch`), so a name that resolves elsewhere a moment later
  (DNS rebinding) changes nothing, and each redirect hop is checked the same way.

A host named in ``--allow-sources scheme://host`` (exactly as the list writes it) skips the address
checks: that is how an internal mirror is reached on purpose.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

METADATA_HOSTS = ("metadata.google.internal", "metadata", "instance-data")
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv4 addresses behind a NAT64 gateway


class NotAllowed(Exception):
    """An input the policy refuses; the message says why and how to allow it on purpose."""


def scheme_of(url: str) -> str:
    """The URL's scheme, lowercase; ``file`` for a plain path."""
    return urlsplit(url).scheme.lower() if "://" in url else "file"


def _ipv4_part(text: str) -> int | None:
    """One part of an IPv4 address as inet_aton(3) reads it: 0x… hex, 0… octal, else decimal."""
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text[2:], 16)
    if re.fullmatch(r"0[0-7]*", text):
        return int(text, 8)
    if re.fullmatch(r"[1-9][0-9]*", text):
        return int(text)
    return None


def numeric_host(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host written as a number stands for, normalised as the OS resolver (inet_aton,
    inet_pton) and URL parsers read it; ``None`` for a name. IPv4 may have 1 to 4 parts, each hex,
    octal or decimal, the last one filling the remaining bytes (``127.1`` is 127.0.0.1, ``2130706433``
    too); one trailing dot is ignored; IPv6 may come with brackets and a zone."""
    host = host.strip("[]")
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            return None
    parts = (host[:-1] if host.endswith(".") else host).split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = [_ipv4_part(p) for p in parts]
    if any(v is None for v in values) or any(v > 255 for v in values[:-1]) or values[-1] >= 256 ** (5 - len(parts)):
        return None
    number = 0
    for v in values[:-1]:
        number = number << 8 | v
    return ipaddress.IPv4Address(number << 8 * (5 - len(parts)) | values[-1])


def address_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Why a connection to ``ip`` is refused, as "ADDRESS, a … address" ("" when it is a globally routable
    unicast address). IPv6 forms that carry an IPv4 address (mapped ``::ffff:a.b.c.d``, NAT64, 6to4) are
    judged by it."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:  # the IPv4 address itself, written as IPv6: a socket reaches the IPv4 host
            return address_refusal(ip.ipv4_mapped)
        embedded = ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None)
        if embedded is not None:
            why = address_refusal(embedded)
            return f"{ip}, which leads to {why}" if why else ""
    if ip.is_link_local:
        return f"{ip}, a link-local address (cloud metadata services live there)"
    if ip.is_loopback:
        return f"{ip}, a loopback address (this machine)"
    if ip.is_private:
        return f"{ip}, a private or reserved address"
    if ip.is_multicast or not ip.is_global:
        return f"{ip}, not a globally routable unicast address"
    return ""


def _written(host: str) -> str:
    """A URL's host as ``--allow-sources`` writes it: lowercase, IPv6 in brackets."""
    return f"[{host.lower()}]" if ":" in host else host.lower()


def resolve(host: str, port: int) -> list[tuple]:
    """``(family, sockaddr)`` of every address ``host`` resolves to, through the OS resolver."""
    return [(family, sockaddr) for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


@dataclass(frozen=True)
class SourcePolicy:
    """What the entries of a list may reach: ``allowed`` holds schemes (``https``) and scheme://host
    (``https://images.example.org``, optionally with a port); empty means only the list's own scheme."""

    allowed: tuple[str, ...] = ()

    def named(self, url: str) -> bool:
        """Whether ``url``'s host is allowed by name (``scheme://host`` or ``scheme://host:port``, as written)."""
        if "://" not in url:
            return False
        parts = urlsplit(url)
        names = {a.lower().rstrip("/") for a in self.allowed if "://" in a}
        host = _written(parts.hostname or "")
        netloc = parts.netloc.rsplit("@", 1)[-1].lower()
        return bool(host) and bool({f"{parts.scheme.lower()}://{host}", f"{parts.scheme.lower()}://{netloc}"} & names)

    def refusal(self, url: str, list_url: str) -> str:
        """Why ``url``, named in ``list_url``, may not be read ("" when it may, as far as can be told without
        resolving its host: :meth:`addresses` checks names at fetch time)."""
        try:
            parts = urlsplit(url) if "://" in url else None
            host, _ = (_written(parts.hostname or ""), parts.port) if parts else ("", None)  # a bad port raises
        except ValueError as e:  # never read what cannot even be parsed
            return f"not a valid URL ({e})"
        scheme, by_name = scheme_of(url), self.named(url)
        if host and not by_name:
            ip = numeric_host(host)
            why = address_refusal(ip) if ip is not None else ""
            if why and why.split(",")[0] != host.strip("[]"):
                why = f"{host} is {why}"  # a spelling: say which address it stands for
            if ip is None and host.rstrip(".") in METADATA_HOSTS:
                why = f"{host} is a cloud metadata service name"
            if why:
                return f"{why}; allow it by name with --allow-sources {scheme}://{host} if it is really meant"
        allowed = self.allowed or (scheme_of(list_url),)
        if scheme in (a.lower() for a in allowed) or by_name:
            return ""
        return (f"{scheme}:// is not allowed for entries of {list_url} (allowed: "
                f"{', '.join(allowed)}); pass --allow-sources {scheme} or --allow-sources {scheme}://HOST")

    def addresses(self, url: str, list_url: str) -> list[tuple]:
        """The ``(family, sockaddr)`` a fetch of ``url`` may connect to, all checked; raises
        :class:`NotAllowed` when the URL or any address its host resolves to is refused, and the
        resolver's ``OSError`` when the host does not resolve."""
        why = self.refusal(url, list_url)
        if why:
            raise NotAllowed(why)
        parts = urlsplit(url)
        host, scheme = parts.hostname or "", parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        if not host:
            raise NotAllowed(f"{url} names no host")
        ip = numeric_host(host)
        if ip is not None and ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if ip is not None and ip.version == 4:  # the address the spelling stands for; no resolver asked
            found = [(socket.AF_INET, (str(ip), port))]
        elif ip is not None:  # an IPv6 literal: the OS parses it (zone included), still without a lookup
            found = [(family, sockaddr) for family, _, _, _, sockaddr in
                     socket.getaddrinfo(unquote(host), port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)]
        else:
            found = resolve(host, port)
        if not self.named(url):
            for _, sockaddr in found:
                why = address_refusal(ipaddress.ip_address(sockaddr[0].split("%")[0]))
                if why:
                    raise NotAllowed(f"{host} resolves to {why}; allow it by name with --allow-sources "
                                     f"{scheme}://{_written(host)} if it is really meant")
        return found
