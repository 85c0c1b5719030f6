"""HTTP(S) reads of list entries, from the very address the source policy checked.

A library that connects by host name resolves the name again when it connects, and follows
redirects on its own: what it reaches is not what was checked. :func:`fetch` asks
:meth:`~data_prep.policy.SourcePolicy.addresses` for the checked addresses of each hop, opens the
TCP connection to one of them itself, and speaks HTTP over it with the URL's own host in the ``Host``
header and as the TLS server name (so virtual hosts and certificates work as usual). Redirects are
followed by hand, at most :data:`MAX_REDIRECTS`, and every hop is checked like the first.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from urllib.parse import quote, urljoin, urlsplit

from . import __version__
from .policy import NotAllowed, SourcePolicy, numeric_host

MAX_REDIRECTS = 5
TIMEOUT = 30.0  # seconds per connect and per read
REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = f"xtra-ds-data_prep/{__version__}"


class FetchError(OSError):
    """A list entry that could not be had: its host does not resolve, its server cannot be reached or
    answers an error (``status``). A fact about that entry, never about the output; the message names
    its URL. ``transient``: worth another try."""

    def __init__(self, message: str, status: int | None = None, transient: bool = True):
        super().__init__(message)
        self.status, self.transient = status, transient


class TooLarge(Exception):
    """The response is larger than the size limit; reading stopped there."""


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to ``host`` that connects to ``sockaddr`` (already checked) instead of
    resolving ``host`` again."""

    def __init__(self, host: str, port: int, family: int, sockaddr: tuple, timeout: float,
                 tls: ssl.SSLContext | None, tls_name: str):
        super().__init__(host, port, timeout=timeout)
        self.family, self.sockaddr, self.tls, self.tls_name = family, sockaddr, tls, tls_name
        self.default_port = 443 if tls else 80  # the Host header names the port only when it is not this

    def connect(self) -> None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.sockaddr)
            self.sock = self.tls.wrap_socket(sock, server_hostname=self.tls_name) if self.tls else sock
        except BaseException:
            sock.close()
            raise


def _target(url: str) -> str:
    """The request target: path and query, with characters HTTP does not carry percent-encoded."""
    parts = urlsplit(url)
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
    return path + (f"?{quote(parts.query, safe='/%:@!$&()*+,;=~?')}" if parts.query else "")


def _ascii_host(host: str, url: str) -> str:
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise FetchError(f"{url}: the host {host!r} is not a valid name ({e})", transient=False) from None


def _get_once(url: str, addresses: list[tuple], tls: ssl.SSLContext | None, max_bytes: int,
              timeout: float) -> tuple[int, str, bytes]:
    """(status, Location, body) of one GET of ``url`` over the first of ``addresses`` that answers."""
    parts = urlsplit(url)
    host = _ascii_host(parts.hostname or "", url)
    port = parts.port or (443 if tls else 80)
    ip = numeric_host(host)
    tls_name = str(ip) if ip is not None else host.rstrip(".")  # certificates name canonical forms
    last: Exception | None = None
    for family, sockaddr in addresses:
        conn = _PinnedConnection(host, port, family, sockaddr, timeout, tls, tls_name)
        try:
            conn.request("GET", _target(url), headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*"})
            resp = conn.getresponse()
            if resp.status in REDIRECTS:
                return resp.status, resp.getheader("Location") or "", b""
            length = resp.getheader("Content-Length")
            if 200 <= resp.status < 300 and length and length.isdigit() and int(length) > max_bytes:
                raise TooLarge(f"{url}: Content-Length {length} bytes > max_bytes {max_bytes}")
            if not 200 <= resp.status < 300:
                return resp.status, "", b""  # the status says it all; the error page is not read
            body = resp.read(max_bytes + 1)
            if len(body) > max_bytes:
                raise TooLarge(f"{url}: more than max_bytes {max_bytes} bytes")
            return resp.status, "", body
        except (OSError, http.client.HTTPException) as e:  # this address failed: the next one may answer
            last = e
        finally:
            conn.close()
    raise FetchError(f"cannot fetch {url} from {', '.join(str(a[0]) for _, a in addresses)}: "
                     f"{type(last).__name__}: {last}")


def fetch(url: str, policy: SourcePolicy, list_url: str, *, max_bytes: int, tls: ssl.SSLContext,
          timeout: float = TIMEOUT) -> bytes:
    """The body of ``url`` (an http(s) entry of ``list_url``), read only from addresses ``policy`` allows;
    ``tls`` verifies https hops (one context per process: making one loads the CA store).

    Raises :class:`~data_prep.policy.NotAllowed` (the URL or a redirect hop is refused; nothing was
    sent to it), ``FileNotFoundError`` (404, 410), :class:`TooLarge`, or :class:`FetchError` — for
    anything else that goes wrong too: whatever an odd entry provokes is that entry's problem."""
    try:
        return _follow(url, policy, list_url, max_bytes, tls, timeout)
    except (NotAllowed, FileNotFoundError, TooLarge, FetchError):
        raise
    except Exception as e:
        raise FetchError(f"cannot fetch {url}: {type(e).__name__}: {e}", transient=False) from e


def _follow(url: str, policy: SourcePolicy, list_url: str, max_bytes: int, tls: ssl.SSLContext,
            timeout: float) -> bytes:
    """:func:`fetch`, hop by hop."""
    current, chain = url, []
    for _ in range(MAX_REDIRECTS + 1):
        try:
            addresses = policy.addresses(current, list_url)
        except NotAllowed as e:
            if not chain:
                raise
            raise NotAllowed(f"{url} redirects ({' → '.join([*chain, current])}) to a refused source: {e}") from None
        except ValueError as e:  # a malformed URL (a port out of range, …)
            raise FetchError(f"{current}: not a valid URL ({e})", transient=False) from None
        except OSError as e:
            host = urlsplit(current).hostname
            raise FetchError(f"cannot resolve {host} ({current}): {e}") from None
        scheme = urlsplit(current).scheme.lower()
        if scheme not in ("http", "https"):
            raise NotAllowed(f"{url} redirects to {current}, which is not http(s)")
        status, location, body = _get_once(current, addresses, tls if scheme == "https" else None, max_bytes,
                                           timeout)
        if status in REDIRECTS:
            if not location:
                raise FetchError(f"{current}: HTTP {status} without a Location", status=status)
            chain.append(current)
            current = urljoin(current, location)
            continue
        if status in (404, 410):
            raise FileNotFoundError(f"HTTP {status} for {current}")
        if not 200 <= status < 300:
            raise FetchError(f"HTTP {status} for {current}", status=status)
        return body
    raise FetchError(f"{url}: more than {MAX_REDIRECTS} redirects ({' → '.join(chain[:3])} → …)", transient=False)
