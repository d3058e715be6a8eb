"""
The cost model, in seconds: what a save, a restore and a prefill take, so that
no save or restore lands on a request's path unless it buys more time than it
costs (issue 24).

- A save or a restore moves the slot's file: its size is the tokens times the
  KV bytes per token (layers x KV heads x head size), learnt from saves and
  restores, over the measured write or read bandwidth.
- A prefill costs more per token the further into the context the token sits
  (attention): the time of the token at position n is fitted as a + b*n from
  llama.cpp's timings (prompt_n tokens computed after cache_n reused, in
  prompt_ms), so computing positions [start, end) takes
  a*(end - start) + b*(end^2 - start^2)/2.

Pure code: no I/O, no Twisted.
"""

from __future__ import annotations

import attrs

# Running estimates move this far towards each new measurement.
SMOOTHING = 0.3
# Each prefill measurement counts this much less than the one after it (the fit follows load changes).
PREFILL_DECAY = 0.9
# Measurements smaller than these are dominated by fixed costs: ignored.
MIN_MEASURED_READ_BYTES = 1_000_000
MIN_MEASURED_PREFILL_TOKENS = 256
# A restore costs a round trip or two on top of reading the file; so does a save (until measured).
RESTORE_OVERHEAD_SECONDS = 0.05
SAVE_OVERHEAD_SECONDS = 0.05
MIN_MEASURED_WRITE_BYTES = 1_000_000
# A save on a request's path costs that request its time for certain; what it buys (a restore
# instead of a recompute) only if the branch it keeps comes back, which a regenerate or a
# sibling question seldom does: judged as if every other one did.
BRANCH_RETURN_ODDS = 0.5


@attrs.define
class PrefillFit:
    """
    Least squares fit of a prefill's seconds to a*x1 + b*x2, x1 the tokens
    computed and x2 the sum of their positions, measurements decaying.
    """

    s11: float = 0.0
    s12: float = 0.0
    s22: float = 0.0
    s1y: float = 0.0
    s2y: float = 0.0

    def add(self, start: int, end: int, seconds: float) -> None:
        x1, x2 = end - start, _positions(start, end)
        for name in ("s11", "s12", "s22", "s1y", "s2y"):
            setattr(self, name, getattr(self, name) * PREFILL_DECAY)
        self.s11 += x1 * x1
        self.s12 += x1 * x2
        self.s22 += x2 * x2
        self.s1y += x1 * seconds
        self.s2y += x2 * seconds

    def solve(self) -> tuple[float, float] | None:
        """(a, b), both >= 0; None before any measurement."""
        if self.s11 <= 0:
            return None
        det = self.s11 * self.s22 - self.s12 * self.s12
        # Measurements all at one context length cannot tell a from b: a flat rate fits them.
        if det > 1e-9 * self.s11 * self.s22:
            a = (self.s1y * self.s22 - self.s2y * self.s12) / det
            b = (self.s2y * self.s11 - self.s1y * self.s12) / det
            if a >= 0 and b >= 0:
                return a, b
            if a < 0 and self.s22 > 0:
                return 0.0, max(0.0, self.s2y / self.s22)
        return max(0.0, self.s1y / self.s11), 0.0


def _positions(start: int, end: int) -> float:
    """The sum of the positions start .. end - 1, as an integral (the per-token cost is linear in it)."""
    return (end * end - start * start) / 2


@attrs.define
class Speeds:
    """Running estimates of how long slot actions and prefills take here."""

    read_bytes_per_second: float = 400e6
    # The flat rate assumed before any prefill is measured, and the running mean afterwards (for display).
    prefill_tokens_per_second: float = 300.0
    write_bytes_per_second: float = 300e6  # llama.cpp writing a slot file (seen here: 330 MB/s)
    bytes_per_token: float | None = None  # of a slot file, learnt from saves and restores
    # What an action takes on top of moving its file: round trips, the wait for the slot to be idle.
    save_overhead: float = SAVE_OVERHEAD_SECONDS
    restore_overhead: float = RESTORE_OVERHEAD_SECONDS
    fit: PrefillFit = attrs.Factory(PrefillFit)

    # -- measurements ---------------------------------------------------------

    def observe_restore(self, n_read: int, restore_ms: float, n_restored: int = 0, took: float | None = None) -> None:
        """A restore read C{n_read} bytes (C{n_restored} tokens) in C{restore_ms}; C{took} seconds in all."""
        if n_read > MIN_MEASURED_READ_BYTES and restore_ms > 0:
            self.read_bytes_per_second = _smoothed(self.read_bytes_per_second, n_read / (restore_ms / 1000))
        self._observe_size(n_read, n_restored)
        if took is not None and restore_ms >= 0:
            self.restore_overhead = _smoothed(self.restore_overhead, max(0.0, took - restore_ms / 1000))

    def observe_save(self, n_written: int, save_ms: float, n_saved: int = 0, took: float | None = None) -> None:
        """A save wrote C{n_written} bytes (C{n_saved} tokens) in C{save_ms}; C{took} seconds in all."""
        if n_written > MIN_MEASURED_WRITE_BYTES and save_ms > 0:
            self.write_bytes_per_second = _smoothed(self.write_bytes_per_second, n_written / (save_ms / 1000))
        self._observe_size(n_written, n_saved)
        if took is not None and save_ms >= 0:
            self.save_overhead = _smoothed(self.save_overhead, max(0.0, took - save_ms / 1000))

    def _observe_size(self, size: int, tokens: int) -> None:
        if size > 0 and tokens >= MIN_MEASURED_PREFILL_TOKENS:
            per_token = size / tokens
            self.bytes_per_token = per_token if self.bytes_per_token is None else _smoothed(
                self.bytes_per_token, per_token
            )

    def observe_prefill(self, prompt_n: int, prompt_ms: float, cache_n: int = 0) -> None:
        """llama.cpp computed C{prompt_n} tokens after reusing C{cache_n}, in C{prompt_ms}."""
        if prompt_n >= MIN_MEASURED_PREFILL_TOKENS and prompt_ms > 0:
            self.prefill_tokens_per_second = _smoothed(self.prefill_tokens_per_second, prompt_n / (prompt_ms / 1000))
            self.fit.add(cache_n, cache_n + prompt_n, prompt_ms / 1000)

    # -- predictions ------------------------------------------------------------

    def prefill_seconds(self, start: int, end: int) -> float:
        """Computing the prompt's positions C{start} .. C{end} - 1 (nothing if C{end <= start})."""
        if end <= start:
            return 0.0
        fitted = self.fit.solve()
        a, b = fitted if fitted is not None else (1 / self.prefill_tokens_per_second, 0.0)
        return a * (end - start) + b * _positions(start, end)

    def size_of(self, tokens: int) -> float | None:
        """The bytes a slot file of C{tokens} takes, once a save or restore measured it."""
        return None if self.bytes_per_token is None else tokens * self.bytes_per_token

    def save_seconds(self, size: float | None) -> float:
        # An unknown size counts only the fixed costs: writing a token's KV is far cheaper than
        # computing it for any model, and a guess in bytes would be off by 100x between models.
        return (size or 0) / self.write_bytes_per_second + self.save_overhead

    def restore_seconds(self, size: float | None) -> float:
        return (size or 0) / self.read_bytes_per_second + self.restore_overhead

    # -- judgements ---------------------------------------------------------------

    def restore_pays(self, tokens: int, size: int, blocks: int, common_blocks: int, have_blocks: int = 0) -> bool:
        """
        Restoring C{size} bytes holding C{tokens} over C{blocks} blocks, C{common_blocks}
        of them wanted, when the slot would keep C{have_blocks} of them in place anyway:
        does it beat computing the difference?
        """
        per_block = tokens / max(1, blocks)
        recompute = self.prefill_seconds(round(have_blocks * per_block), round(common_blocks * per_block))
        return self.restore_seconds(size) < recompute

    def fork_pays(self, tokens: int, size: float | None, blocks: int, common_blocks: int, saved: bool) -> bool:
        """
        Forking a slot holding C{tokens} (about C{size} bytes, None: not known
        yet) over C{blocks} blocks: save it unless C{saved}, restore the file
        elsewhere; against recomputing the C{common_blocks} the request shares.
        """
        save = 0.0 if saved else self.save_seconds(size)
        recompute = self.prefill_seconds(0, round(tokens * common_blocks / max(1, blocks)))
        return save + self.restore_seconds(size) < recompute

    def keep_pays(self, tokens: int, covered: int, saved: bool, odds: float = 1.0) -> bool:
        """
        Is a slot's content of C{tokens}, of which the first C{covered} survive
        elsewhere (in place under the next request, or in a saved file), worth
        keeping: saving it (unless C{saved}) and restoring it later, against
        computing the rest again when its conversation comes back?  A sibling's
        tail of 65 tokens after a 30k-token context is recomputed, not saved.

        C{odds}: how likely it comes back (L{BRANCH_RETURN_ODDS} for a save on
        a request's path).  The save is paid for certain, the restore and the
        recompute it avoids only on a return: keep if save + odds * restore <
        odds * recompute.
        """
        size = self.size_of(tokens)
        save = 0.0 if saved else self.save_seconds(size)
        return save / odds + self.restore_seconds(size) < self.prefill_seconds(covered, tokens)


def _smoothed(estimate: float, measured: float) -> float:
    return (1 - SMOOTHING) * estimate + SMOOTHING * measured
