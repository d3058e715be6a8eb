"""
A request body decoded (gzip) and parsed (JSON) without holding up the reactor.

A body may be up to C{--max-body-bytes} (32 MiB by default); decoding and
parsing one that large on the reactor thread stalls every stream the proxy
relays meanwhile.  A small body is still handled in place (a thread hop costs
more than the parse); a large one, or a gzip body that inflates past the
threshold, is handled in a worker thread.  Errors are the same either way.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from proxycache.web._encoding import TooLarge, decoded_body
from proxycache.web._validate import parse_json_object

# About a millisecond of json.loads: below it the reactor does the work itself.
IN_PLACE_BYTES = 256 * 1024

T = TypeVar("T")


@attrs.frozen
class BodyReader:
    """
    @ivar to_thread: runs a function in a worker thread (C{deferToThread}, or a
        test's executor).
    """

    to_thread: Callable[..., Deferred[Any]] = deferToThread
    in_place_bytes: int = IN_PLACE_BYTES

    async def decoded(self, encoding: bytes | None, raw: bytes, limit: int) -> bytes:
        """C{raw} sent with C{Content-Encoding: encoding}, decoded (L{decoded_body})."""
        return await self._run(lambda body: body, encoding, raw, limit)

    async def json_object(self, encoding: bytes | None, raw: bytes, limit: int) -> dict[str, Any]:
        """C{raw} decoded and parsed as a JSON object (L{parse_json_object})."""
        return await self._run(parse_json_object, encoding, raw, limit)

    async def _run(self, then: Callable[[bytes], T], encoding: bytes | None, raw: bytes, limit: int) -> T:
        if len(raw) <= self.in_place_bytes:
            try:  # inflating is cut off just past the threshold: a small gzip body may hold megabytes
                body = decoded_body(encoding, raw, min(limit, self.in_place_bytes), TooLarge)
            except TooLarge:
                pass
            else:
                return then(body)
        result: T = await self.to_thread(lambda: then(decoded_body(encoding, raw, limit)))
        return result
