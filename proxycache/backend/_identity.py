"""
Which model a llama-server runs, as far as saved KV files care.

File name, size, shape and build are the same for two models with different
weights of the same shape (a fine-tune, a re-upload in place): only the weights
tell them apart.  So the identity also folds in what the weights answer to a
fixed probe, and, when the proxy can see the model file, a digest of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# A fixed prompt, greedy, one token, not cached: its top next-token log-probabilities
# come from the weights alone.  Rounded, so that float noise does not change them.
PROBE_BODY: dict[str, Any] = {
    "prompt": "proxycache model identity probe: the quick brown fox jumps over",
    "n_predict": 1,
    "temperature": 0,
    "n_probs": 5,
    "cache_prompt": False,
    # llama.cpp leaves the probabilities out when the token it picked is not complete
    # UTF-8 (a lone byte): pick a letter.  The probabilities it reports are the raw ones.
    "grammar": "root ::= [a-z]",
}
PROBE_DECIMALS = 1
FILE_SAMPLE_BYTES = 1024 * 1024  # hashed from each end of the model file


def probe_answer(reply: Any) -> list[list[float]] | None:
    """The top (token id, rounded log-probability) pairs of a C{/completion} probe reply, by id."""
    try:
        top = reply["completion_probabilities"][0]["top_logprobs"]
        return sorted([int(t["id"]), round(float(t["logprob"]), PROBE_DECIMALS)] for t in top)
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def file_digest(path: str) -> str | None:
    """
    Blocking (run it in a thread): size, mtime and the first and last MiB of
    the model file, when this host can see it; None when it cannot.
    """
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            digest = hashlib.blake2b(f"{info.st_size}:{info.st_mtime_ns}".encode(), digest_size=16)
            digest.update(f.read(FILE_SAMPLE_BYTES))
            if info.st_size > FILE_SAMPLE_BYTES:
                f.seek(max(FILE_SAMPLE_BYTES, info.st_size - FILE_SAMPLE_BYTES))
                digest.update(f.read(FILE_SAMPLE_BYTES))
    except OSError:
        return None
    return digest.hexdigest()


def model_identity(
    props: dict, models: dict | None, probe: list[list[float]] | None = None, file: str | None = None
) -> str:
    """
    What must match for a saved KV file to be restorable: the weights (their
    answer to the probe, the file's digest), their shape and file name, and the
    llama.cpp build (its KV file format can change between builds).
    """
    meta = {}
    if isinstance(models, dict):
        for model in models.get("data") or []:
            if isinstance(model, dict) and isinstance(model.get("meta"), dict):
                meta = model["meta"]
                break
    facts = {
        "model_path": Path(str(props.get("model_path", ""))).name,
        "build_info": props.get("build_info"),
        "meta": {k: meta.get(k) for k in ("vocab_type", "n_vocab", "n_ctx_train", "n_embd", "n_params", "size")},
        "probe": probe,
        "file": file,
    }
    return hashlib.blake2b(json.dumps(facts, sort_keys=True).encode(), digest_size=8).hexdigest()
