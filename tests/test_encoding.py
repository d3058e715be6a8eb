"""A compressed request body (proxycache.web._encoding): decoded within the limit, or refused."""

from __future__ import annotations

import gzip

import pytest

from proxycache.web._encoding import decoded_body
from proxycache.web._errors import ApiError


def test_gzip_is_decoded_up_to_the_limit_exactly():
    body = b"x" * 1000
    assert decoded_body(b"gzip", gzip.compress(body), 1000) == body
    assert decoded_body(b" X-GZIP ", gzip.compress(body), 1000) == body
    assert decoded_body(b"gzip", gzip.compress(b"ab") + gzip.compress(b"cd"), 4) == b"abcd"  # two members
    assert decoded_body(None, b"plain", 10) == decoded_body(b"identity", b"plain", 10) == b"plain"


@pytest.mark.parametrize("encoding, body, status", [
    (b"gzip", gzip.compress(b"x" * 1001), 413),
    (b"gzip", gzip.compress(b"x" * 600) + gzip.compress(b"x" * 401), 413),  # the members together
    (b"gzip", gzip.compress(b"\0" * 50_000_000), 413),  # 48 KB that would inflate to 50 MB
    (b"gzip", b"not gzip at all", 400),
    (b"gzip", gzip.compress(b"x" * 100)[:-4], 400),
    (b"br", b"whatever", 415),
    (b"gzip, gzip", b"whatever", 415),
])
def test_what_cannot_be_decoded_within_the_limit_is_refused(encoding, body, status):
    with pytest.raises(ApiError) as caught:
        decoded_body(encoding, body, 1000)
    assert caught.value.status == status
