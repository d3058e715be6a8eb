"""
What the rest of the proxy needs from a backend: the one interface behind
which every llama-server specific lives.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse

from proxycache.backend._actions import IdleSlot, Restored, Saved
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

    async def save_slot(self, index: int, filename: str, timeout: float) -> Saved:
        """
        Save slot C{index}'s KV cache as C{filename} (in the server's save
        directory).  @raise SlotActionFailed: not saved, and why.
        """

    async def restore_slot(self, index: int, filename: str, timeout: float) -> Restored:
        """
        Load C{filename} into slot C{index} (a failed restore leaves the slot
        empty).  @raise SlotActionFailed: not restored, and why.
        """

    async def erase_slot(self, index: int, timeout: float) -> None:
        """Empty slot C{index}'s KV cache.  @raise SlotActionFailed: not erased, and why."""

    async def slots(self) -> list[dict[str, Any]] | None:
        """The server's own view of its slots, when it shows them."""

    async def describe(self, probe: bool = True) -> Description | None:
        """Properties and model identity, once it answers; C{probe}: ask the weights again."""

    async def process(self) -> str | None:
        """What tells the process answering now from another (None: it shows nothing that does)."""

    async def wait_until_idle(self, index: int) -> IdleSlot | None:
        """Slot C{index} as the server shows it once the server itself reports it idle (None: it does not show it)."""
