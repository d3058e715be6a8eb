"""
What a web page in a browser may do with the proxy: decided on a request's headers.

Without API keys (the default) anything that can reach the port can drive
the proxy, and a browser on the same machine can reach it for any page it
shows.  Two checks keep pages out, the way Ollama and Jupyter do:

  - C{Origin}: browsers send it on every cross-site request that could change
    something (a "simple" C{text/plain} POST included, which needs no
    preflight).  One that C{--cors-origins} does not allow is refused.
    curl, the SDKs and editors send none and are not affected.
  - C{Host}, on a connection that arrived on a loopback address: a page whose
    DNS name was rebound to 127.0.0.1 is same-origin with itself, so it sends
    no foreign C{Origin}; its C{Host} header still names its own domain.  Only
    loopback names (C{localhost}, C{*.localhost}, 127.0.0.0/8, C{[::1]}) and
    C{--allowed-hosts} are accepted there.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web.http_headers import Headers

from proxycache.web._errors import ApiError


def normal_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def host_name(host: str) -> str:
    """The name in a C{Host} header value, without its port: C{[::1]:8081} -> C{::1}."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_loopback_name(name: str) -> bool:
    """Names no DNS answer can point elsewhere: browsers resolve C{*.localhost} to loopback themselves."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def on_loopback(address: Any) -> bool:
    """Whether a connection arrived on a loopback address (a UNIX socket is no browser's target)."""
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return False
    try:
        return ipaddress.ip_address(address.host.partition("%")[0]).is_loopback
    except ValueError:
        return False


def forbidden(message: str, code: str) -> ApiError:
    return ApiError(403, message, "permission_error", code)


@attrs.frozen
class BrowserPolicy:
    """C{--cors-origins} and C{--allowed-hosts}; C{"*"} in either allows any."""

    origins: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()

    def origin_allowed(self, origin: str) -> bool:
        """Whether C{--cors-origins} lets a page of C{origin} call the proxy (and read its answers)."""
        allowed = {normal_origin(o) for o in self.origins}
        return "*" in allowed or normal_origin(origin) in allowed

    def host_allowed(self, host: str) -> bool:
        name = host_name(host)
        allowed = {host_name(h) for h in self.hosts}
        return "*" in allowed or name in allowed or is_loopback_name(name)

    def refusal(self, headers: Headers, local_address: Any) -> ApiError | None:
        """Why a request with C{headers}, arriving on C{local_address}, is refused; None when it is not."""
        hosts = [h.decode("latin-1") for h in headers.getRawHeaders(b"host", [])]
        if on_loopback(local_address):
            for host in hosts:
                if not self.host_allowed(host):
                    return forbidden(
                        f"Host {host!r} is not a name of this machine: proxycache listens on loopback and answers "
                        "only localhost, 127.0.0.1 and [::1] (a page whose DNS name was rebound to this machine "
                        "sends its own name); add it to --allowed-hosts to accept it",
                        "host_not_allowed",
                    )
        for raw in headers.getRawHeaders(b"origin", []):
            origin = raw.decode("latin-1")
            if self.origin_allowed(origin) or self._same_origin(origin, hosts, local_address):
                continue
            return forbidden(
                f"requests from web pages of origin {origin!r} are not allowed: add it to --cors-origins "
                "to let that page use proxycache",
                "origin_not_allowed",
            )
        return None

    def _same_origin(self, origin: str, hosts: list[str], local_address: Any) -> bool:
        """
        A page the proxy served itself (the dashboard): its origin names the
        C{Host} it was loaded from, when that name was checked (loopback) or
        is the operator's.
        """
        if len(hosts) != 1:
            return False
        scheme, _, rest = normal_origin(origin).partition("://")
        host = hosts[0].strip().lower()
        if scheme not in ("http", "https") or rest != host:
            return False
        allowed = {host_name(h) for h in self.hosts} - {"*"}
        return (on_loopback(local_address) and self.host_allowed(host)) or host_name(host) in allowed
