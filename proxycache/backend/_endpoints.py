"""
Where the HTTP client connects for a backend's URL.

Twisted's Agent connects through C{HostnameEndpoint}, which reports a refused
connection only when its timer for the next address fires, 0.3 s later, even
when there is one address: every request to a dead backend would wait that
long before it fails over, and so would every look the monitor takes at it.
An IP address has one address to try: it is connected to directly.

And the HTTP client's factory logs "Starting factory" and "Stopping factory"
for each connection it makes: quietened, or they fill the daemon's log.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


@implementer(IAgentEndpointFactory)
@attrs.frozen
class BackendEndpoints:
    reactor: Any
    tls: BrowserLikePolicyForHTTPS = attrs.Factory(BrowserLikePolicyForHTTPS)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint
        try:
            address = ipaddress.ip_address(uri.host.decode("ascii"))
        except (UnicodeDecodeError, ValueError):  # a host name: perhaps several addresses
            endpoint = HostnameEndpoint(self.reactor, uri.host, uri.port)
        else:
            direct = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
            endpoint = direct(self.reactor, str(address), uri.port)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return _Quiet(endpoint)


@implementer(IStreamClientEndpoint)
@attrs.frozen
class _Quiet:
    endpoint: IStreamClientEndpoint

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        if hasattr(protocolFactory, "noisy"):
            protocolFactory.noisy = False
        return self.endpoint.connect(protocolFactory)
