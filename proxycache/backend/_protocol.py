"""
What the rest of the proxy needs from a backend: the one interface behind
which every llama-server specific lives.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse

from proxycache.backend._llama import Description


class Backend(Protocol):
    @property
    def name(self) -> str: ...

    url: str

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[bytes, list[bytes]] | None = None,
        timeout: float | None = None,
    ) -> "Deferred[IResponse]":
        """Any request, its body left unread."""

    def generate(self, path: str, body: dict[str, Any], slot: int, timeout: float) -> "Deferred[IResponse]":
        """A generating request pinned to slot C{slot}, its body left unread."""

    async def call(self, method: str, path: str, payload: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
        """A JSON call: (status, decoded body or None)."""

    async def slot_action(self, index: int, action: str, filename: str | None, timeout: float) -> dict[str, Any]:
        """Save, restore or erase slot C{index}'s KV cache."""

    async def slots(self) -> list[dict[str, Any]] | None:
        """The server's own view of its slots, when it shows them."""

    async def describe(self, probe: bool = True) -> Description | None:
        """Properties and model identity, once it answers; C{probe}: ask the weights again."""

    async def wait_until_idle(self, index: int) -> dict[str, Any] | None:
        """Slot C{index} as the server shows it once the server itself reports it idle."""
