"""
What the disk tier knows, apart from how it acts: the index of saved caches,
which model each backend runs, the measured speeds, and counters.  The
scheduler plans against it (L{Catalog.lookup}); the status page reads it.

Pure code: no I/O, no Twisted.
"""

from __future__ import annotations

import attrs

from proxycache.cache._entries import Index, MetaEntry
from proxycache.routing import BRANCH_RETURN_ODDS, DiskMatch, Fingerprint, Request, SlotView, Speeds

# A branch's own part at most this share of what it shares with content that survives it (a
# sibling's question and answer after a long context, a regenerate's new answer) is a short
# tail: never saved, whatever the measured speeds say (they swing with the machine's load, and
# such a branch seldom comes back).  llama-server alone loses it too.  A save on a request's path
# would delay it; one in the background would still hold the slot the next sibling reuses in
# place, and block llama.cpp's loop while it writes the whole file for a few tokens.
SHORT_TAIL_SHARE = 1 / 16


@attrs.define
class Counters:
    saves: int = 0
    save_failures: int = 0
    saved_bytes: int = 0
    restores: int = 0
    restore_failures: int = 0
    restored_tokens: int = 0
    ineffective_restores: int = 0
    dropped_unusable: int = 0  # saved caches dropped: their file is gone, damaged, or refused for good
    evicted_entries: int = 0
    saves_skipped_low_space: int = 0  # free space under the headroom
    model_changes: int = 0  # a backend came up with other weights or another build than before
    stray_files: int = 0  # slot cache files with no meta, found at start
    cross_backend_restores: int = 0  # files one backend wrote, restored on another


@attrs.define
class Catalog:
    min_ratio: float
    index: Index = attrs.Factory(Index)
    models: dict[str, str] = attrs.Factory(dict)  # backend name -> model identity, once it is up
    speeds: Speeds = attrs.Factory(Speeds)
    counters: Counters = attrs.Factory(Counters)
    max_bytes: int = 0  # the disk budget in force (chosen at start when automatic), 0 = none
    # backend name -> its save directory as the proxy sees it; backends naming one directory share files
    storage: dict[str, str] = attrs.Factory(dict)
    isolate_tenants: bool = False  # restore a tenant's own entries only
    # backend name -> the process its model identity was probed in (its marker, None if it shows
    # none), while no sign of a restart came since: saves and restores happen only there.
    confirmed: dict[str, str | None] = attrs.Factory(dict)

    def readers(self, writer: str, model: str, save_dir: str | None = None) -> frozenset[str]:
        """Backends other than C{writer} that can restore a file it wrote for C{model} (into C{save_dir})."""
        shared = save_dir or self.storage.get(writer)
        return frozenset(
            name for name, runs in self.models.items()
            if name != writer and runs == model and shared is not None and self.storage.get(name) == shared
        )

    def where(self, backend: str) -> str:
        """Where C{backend}'s saves go, as a new entry's key names it: its save directory, else itself."""
        return self.storage.get(backend) or f"backend {backend}"

    def current_model(self, backend: str) -> str | None:
        """What C{backend} runs, if probed in the process that answers now as far as anyone knows."""
        return self.models.get(backend) if backend in self.confirmed else None

    def identity_lost(self, backend: str) -> None:
        """A sign that C{backend} restarted: no save or restore there until its weights are probed again."""
        self.confirmed.pop(backend, None)

    def restorable_on(self, entry: MetaEntry, backend: str) -> bool:
        """Does C{backend}, as it runs now, read C{entry}'s file, written by the same weights?"""
        if self.current_model(backend) != entry.model:
            return False
        if backend == entry.backend:
            return entry.save_dir is None or entry.save_dir == self.storage.get(backend)
        return backend in self.readers(entry.backend, entry.model, entry.save_dir)

    def _saves_work(self, backend: str) -> bool:
        saves_fail = self.counters.save_failures and not self.counters.saves
        return self.models.get(backend) is not None and not saves_fail

    def _size_of(self, tokens: int) -> float | None:
        """A slot file's size for C{tokens}: from measured saves and restores, else the index's average."""
        size = self.speeds.size_of(tokens)
        if size is None and self.index.total_tokens:
            size = tokens * self.index.total_bytes / self.index.total_tokens
        return size

    def fork_pays(self, view: SlotView, common_blocks: int) -> bool:
        """
        The scheduler's cost model for a fork of HOT slot C{view} (L{Plan.fork}):
        save it unless saved, restore the file elsewhere, against recomputing
        the C{common_blocks} the request shares with it.
        """
        if not self._saves_work(view.id.backend):
            return False  # no model known yet, or saves do not work (no --slot-save-path)
        blocks = len(view.fingerprint.blocks)
        tokens = _tokens(view)
        return self.speeds.fork_pays(tokens, self._size_of(tokens), blocks, common_blocks, view.saved)

    def covered_blocks(self, fp: Fingerprint, backend: str) -> int:
        """
        Leading blocks of slot content C{fp} that a saved entry C{backend} can
        restore holds, when C{fp} branches off it (a sibling's entry: the shared
        context, then another question).  An entry C{fp} continues is an earlier
        state of the same conversation: what was added since is its own part,
        saved as before, so that its next turn computes only what is new.
        """
        model = self.models.get(backend)
        if model is None or not fp.blocks:
            return 0
        writers = [name for name, runs in self.models.items() if runs == model]
        found = self.index.best(fp, model, writers, 0.0)
        if found is None or found[1] >= len(found[0].fingerprint.blocks):
            return 0
        return found[1]

    def keep_pays(self, view: SlotView, common_blocks: int) -> bool:
        """
        Is what HOT slot C{view} holds beyond the C{common_blocks} a request
        would keep in place (or beyond what a saved entry holds already) worth a
        save and a restore on that request's path, against computing it again
        (L{Speeds.keep_pays})?
        """
        return self.save_pays(
            view.id.backend, view.fingerprint, _tokens(view), view.saved, common_blocks, on_path=True
        )

    def save_pays(
        self, backend: str, fp: Fingerprint, tokens: int, saved: bool = False, kept_blocks: int = 0,
        on_path: bool = False,
    ) -> bool:
        """
        Is slot content C{fp} of C{tokens} worth saving (its first C{kept_blocks}
        survive anyway)?  C{on_path}: the save would delay a waiting request (an
        eviction, a fork), not run in the background.
        """
        if not self._saves_work(backend):
            return True  # nothing can be saved: keeping it means leaving it in its slot
        blocks = len(fp.blocks)
        covered = max(kept_blocks, self.covered_blocks(fp, backend))
        if not covered:
            return True  # all of it is its own (a conversation's new turns): saved as before
        covered_tokens = round(tokens * covered / max(1, blocks))
        own = tokens - covered_tokens
        if own > covered_tokens:
            # Mostly its own (a conversation behind a shared system prompt): saved as before. Only a
            # tail after a long shared context (a sibling's last question) is judged in time,
            # where a misjudged save costs little either way; measured speeds swing under load.
            return True
        if own <= covered_tokens * SHORT_TAIL_SHARE:
            return False  # a question and answer after what survives: recomputed if it ever comes back
        if self.speeds.bytes_per_token is None:
            return True  # no save measured yet: a longer tail (a team member's own part) is saved as before
        return self.speeds.keep_pays(tokens, covered_tokens, saved, BRANCH_RETURN_ODDS if on_path else 1.0)

    def restore_beats(self, disk: DiskMatch, have_blocks: int) -> bool:
        """Does restoring C{disk} beat reusing C{have_blocks} of it in place and computing the rest?"""
        return self.speeds.restore_pays(disk.tokens, disk.bytes, disk.blocks, disk.common_blocks, have_blocks)

    def backend_up(self, backend: str, model: str, process: str | None = None) -> int:
        """
        C{backend} runs C{model} now, probed in C{process}; returns how many of
        its saved caches another model wrote.
        """
        if self.models.get(backend) not in (None, model):
            self.counters.model_changes += 1
        self.models[backend] = model
        self.confirmed[backend] = process
        return sum(1 for e in self.index if e.backend == backend and e.model != model)

    def lookup(self, request: Request) -> DiskMatch | None:
        """The saved cache worth restoring for C{request}, if any."""
        best = None
        for model in set(self.models.values()):
            writers = [name for name, runs in self.models.items() if runs == model]
            found = self.index.best(
                request.fingerprint, model, writers, self.min_ratio, request.tenant if self.isolate_tenants else None
            )
            if found and (best is None or found[1] > best[1]):
                best = found
        if best is None:
            return None
        entry, common, ratio = best
        blocks = len(entry.fingerprint.blocks)
        if not self.speeds.restore_pays(entry.tokens, entry.bytes, blocks, common):
            return None
        readers = self.readers(entry.backend, entry.model, entry.save_dir)
        return DiskMatch(entry.key, entry.backend, common, ratio, readers,
                         tokens=entry.tokens, bytes=entry.bytes, blocks=blocks)


def _tokens(view: SlotView) -> int:
    return view.tokens or view.fingerprint.words  # about one token a word when not measured
