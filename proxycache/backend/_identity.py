"""
Which model a llama-server runs, as far as saved KV files care.
"""

from __future__ import annotations

import hashlib
import json
import os


def model_identity(props: dict, models: dict | None) -> str:
    """
    What must match for a saved KV file to be restorable: the weights' shape and
    file, and the llama.cpp build (its KV file format can change between builds).
    """
    meta = {}
    if isinstance(models, dict):
        for model in models.get("data") or []:
            if isinstance(model, dict) and isinstance(model.get("meta"), dict):
                meta = model["meta"]
                break
    facts = {
        "model_path": os.path.basename(str(props.get("model_path", ""))),
        "build_info": props.get("build_info"),
        "meta": {k: meta.get(k) for k in ("vocab_type", "n_vocab", "n_ctx_train", "n_embd", "n_params", "size")},
    }
    return hashlib.blake2b(json.dumps(facts, sort_keys=True).encode(), digest_size=8).hexdigest()
