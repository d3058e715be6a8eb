"""
A request body sent compressed (C{Content-Encoding}).

SDKs and proxies may gzip a large request.  Read as it is, it was refused as
"not valid UTF-8"; a gzip body is decoded here, no larger than
C{--max-body-bytes} once decoded (a few kilobytes can inflate to gigabytes:
decoding stops one byte past the limit), and any other encoding is a 415.
"""

from __future__ import annotations

import zlib

from proxycache.web._errors import ApiError, bad_request

GZIP = (b"gzip", b"x-gzip")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes once decoded", "invalid_request_error",
                    "body_too_large")


class TooLarge(Exception):
    """A body that decodes to more than the limit asked for (when not the client's limit)."""


def decoded_body(
    encoding: bytes | None, body: bytes, limit: int, too_large: type[Exception] | None = None
) -> bytes:
    """
    C{body} as sent with C{Content-Encoding: encoding}, decoded.

    @param too_large: raised instead of the 413 when it decodes to more than
        C{limit} bytes.
    @raise ApiError: 415 for an encoding other than gzip, 413 when it decodes
        to more than C{limit} bytes, 400 when it is not gzip.
    """
    name = (encoding or b"").strip().lower()
    if name in (b"", b"identity"):
        return body
    if name not in GZIP:
        raise ApiError(415, f"Content-Encoding {name.decode('ascii', 'replace')!r} is not supported: send the body "
                       "as it is or gzip-compressed", "invalid_request_error", "unsupported_encoding")
    out: list[bytes] = []
    size = 0
    rest = body
    try:
        while rest:  # a gzip body may be several members, one after another
            decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
            chunk = decoder.decompress(rest, limit + 1 - size)
            size += len(chunk)
            out.append(chunk)
            if size > limit or decoder.unconsumed_tail:
                raise too_large() if too_large is not None else _too_large(limit)
            if not decoder.eof:
                raise bad_request("request body is not valid gzip: it ends early", "invalid_gzip")
            rest = decoder.unused_data
    except zlib.error as e:
        raise bad_request(f"request body is not valid gzip: {e}", "invalid_gzip")
    return b"".join(out)
