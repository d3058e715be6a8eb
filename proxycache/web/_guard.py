"""
Refuse a request body on its headers.

Twisted reads a whole request body (to a temporary file when large) before
any handler runs, so a check in the handler comes after a 300 MiB upload has
been stored.  L{GuardedRequest} decides as soon as the headers are in: a web
page's request that L{BrowserPolicy} refuses (its C{Origin} or C{Host})
answers 403, an over-limit C{Content-Length} 413 and a body without a valid
API key 401, and the connection is closed without reading the body; a chunked
body is cut off as soon as it passes the limit.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import RESPONSES
from twisted.web.iweb import INonQueuedRequestFactory
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import implementer

from proxycache.config import Config
from proxycache.web._auth import authorize
from proxycache.web._browsers import BrowserPolicy
from proxycache.web._errors import ApiError
from proxycache.web._shapes import ANTHROPIC, OPENAI

log = Logger()


class _Discard:
    """Where a refused body goes."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:  # a request without a body is still parsed after its refusal
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


def _error_body(request: Request, error: ApiError) -> bytes:
    # The path is not parsed yet: every Anthropic client sends anthropic-version.
    shape = ANTHROPIC if request.requestHeaders.hasHeader(b"anthropic-version") else OPENAI
    return shape.body(error)


class GuardedRequest(Request):
    def __init__(
        self, *args: Any, max_body_bytes: int, api_keys: tuple[str, ...], browsers: BrowserPolicy, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_body_bytes = max_body_bytes
        self.api_keys = api_keys
        self.browsers = browsers
        self.refused = False
        self._received = 0

    def gotLength(self, length: int | None) -> None:
        chunked = length is None and self.requestHeaders.hasHeader(b"transfer-encoding")
        has_body = chunked or bool(length)
        refused = self.browsers.refusal(self.requestHeaders, self.getHost())
        if refused is not None:  # every request, with a body or not: GET /status too
            self._refuse(refused)
        elif length is not None and length > self.max_body_bytes:
            self._refuse(_too_large(self.max_body_bytes))
        elif has_body:
            try:
                authorize(self, self.api_keys)
            except ApiError as e:
                self._refuse(e)
        if not self.refused:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:  # chunked: no length was announced
            self._refuse(_too_large(self.max_body_bytes))
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if not self.refused:
            super().process()

    def _refuse(self, error: ApiError) -> None:
        self.refused = True
        self.content = _Discard()  # type: ignore[assignment]
        body = _error_body(self, error)
        head = [f"HTTP/1.1 {error.status} {RESPONSES[error.status].decode()}".encode(),
                b"Content-Type: application/json", b"Content-Length: %d" % len(body), b"Connection: close"]
        head += [f"{name}: {value}".encode() for name, value in error.headers]
        log.info("refused a request on its headers: {status} {message}", status=error.status, message=error.message)
        assert self.channel is not None and self.channel.transport is not None
        self.channel.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.channel.loseConnection()


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes", "invalid_request_error", "body_too_large")


@implementer(INonQueuedRequestFactory)
@attrs.frozen
class GuardedRequests:
    """A C{Site.requestFactory} of L{GuardedRequest}s."""

    max_body_bytes: int
    api_keys: tuple[str, ...]
    browsers: BrowserPolicy = BrowserPolicy()

    def __call__(self, channel: Any) -> GuardedRequest:
        return GuardedRequest(
            channel, max_body_bytes=self.max_body_bytes, api_keys=self.api_keys, browsers=self.browsers
        )


def guarded_site(resource: IResource, config: Config, reactor: IReactorTime | None = None) -> Site:
    """
    C{resource} served as the daemon serves it: each request judged on its
    headers first (L{GuardedRequests}), no form parsing, no tracebacks in error pages.
    """
    site = Site(
        resource,
        reactor=reactor,
        requestFactory=GuardedRequests(
            config.max_body_bytes, config.api_keys + config.admin_keys if config.api_keys else (),
            BrowserPolicy(config.cors_origins, config.allowed_hosts),
        ),
        # Every body is JSON whatever its Content-Type says (as llama-server reads it): a form is
        # not parsed into request.args first, nor a bad one answered with Twisted's bare 400.
        parsePOSTFormSubmission=False,
    )
    site.displayTracebacks = False
    return site
