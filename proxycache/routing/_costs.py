"""
The cost model: does restoring a saved cache beat recomputing its prefix?

Pure code: no I/O, no Twisted.
"""

from __future__ import annotations

import attrs

# Running estimates move this far towards each new measurement.
SMOOTHING = 0.3
# Measurements smaller than these are dominated by fixed costs: ignored.
MIN_MEASURED_READ_BYTES = 1_000_000
MIN_MEASURED_PREFILL_TOKENS = 256
# A restore costs a round trip or two on top of reading the file; so does a save.
RESTORE_OVERHEAD_SECONDS = 0.05
SAVE_OVERHEAD_SECONDS = 0.05
MIN_MEASURED_WRITE_BYTES = 1_000_000


@attrs.define
class Speeds:
    """Running estimates that decide whether a restore beats recomputing."""

    read_bytes_per_second: float = 400e6
    prefill_tokens_per_second: float = 300.0
    write_bytes_per_second: float = 300e6  # llama.cpp writing a slot file (seen here: 330 MB/s)

    def observe_restore(self, n_read: int, restore_ms: float) -> None:
        if n_read > MIN_MEASURED_READ_BYTES and restore_ms > 0:
            self.read_bytes_per_second = _smoothed(self.read_bytes_per_second, n_read / (restore_ms / 1000))

    def observe_save(self, n_written: int, save_ms: float) -> None:
        if n_written > MIN_MEASURED_WRITE_BYTES and save_ms > 0:
            self.write_bytes_per_second = _smoothed(self.write_bytes_per_second, n_written / (save_ms / 1000))

    def observe_prefill(self, prompt_n: int, prompt_ms: float) -> None:
        if prompt_n >= MIN_MEASURED_PREFILL_TOKENS and prompt_ms > 0:
            self.prefill_tokens_per_second = _smoothed(self.prefill_tokens_per_second, prompt_n / (prompt_ms / 1000))

    def restore_pays(self, tokens: int, size: int, blocks: int, common_blocks: int) -> bool:
        """Restoring C{size} bytes holding C{tokens} over C{blocks} blocks, C{common_blocks} of them wanted."""
        reused_tokens = tokens * common_blocks / max(1, blocks)
        recompute = reused_tokens / self.prefill_tokens_per_second
        restore = size / self.read_bytes_per_second + RESTORE_OVERHEAD_SECONDS
        return restore < recompute


    def fork_pays(self, tokens: int, size: int | None, blocks: int, common_blocks: int, saved: bool) -> bool:
        """
        Forking a slot holding C{tokens} (about C{size} bytes) over C{blocks}
        blocks: save it unless C{saved}, restore the file elsewhere; against
        recomputing the C{common_blocks} the request shares with it.

        C{size} None: the KV size of a token is not known yet (nothing saved).
        Only the fixed costs count then: writing and reading a token's KV is far
        cheaper than computing it for any model (both grow with the model, the
        computation faster), and a guess in bytes would be off by 100x between
        a test model and a 30B one.
        """
        size_known = size if size is not None else 0
        save = 0.0 if saved else size_known / self.write_bytes_per_second + SAVE_OVERHEAD_SECONDS
        return save + self._restore_seconds(size_known) < self._recompute_seconds(tokens, blocks, common_blocks)

    def _restore_seconds(self, size: int) -> float:
        return size / self.read_bytes_per_second + RESTORE_OVERHEAD_SECONDS

    def _recompute_seconds(self, tokens: int, blocks: int, common_blocks: int) -> float:
        return tokens * common_blocks / max(1, blocks) / self.prefill_tokens_per_second


def _smoothed(estimate: float, measured: float) -> float:
    return (1 - SMOOTHING) * estimate + SMOOTHING * measured
