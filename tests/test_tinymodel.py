"""
The generated models' KV geometry (issue 24): presets whose slot files take
what a 7B- and a 30B-class model's take per token, checked against a real save.
"""

from __future__ import annotations

import pytest

from proxycache.tinymodel import BENCH, KV_7B, KV_30B, TINY, ensure_model


def test_presets_have_the_kv_bytes_per_token_of_their_class():
    assert KV_7B.kv_bytes_per_token == 128 * 1024  # 32 layers x 8 KV heads x 128 x (K, V) x f16
    assert KV_30B.kv_bytes_per_token == 256 * 1024
    # the existing models keep their geometry and their cached file names
    assert (TINY.kv_bytes_per_token, BENCH.kv_bytes_per_token) == (512, 4096)
    assert TINY.filename == "tiny-llama-e64-l2-h4-f128-s1-v4.gguf"


@pytest.mark.parametrize("shape", [KV_7B], ids=["kv7b"])
def test_a_real_save_takes_the_presets_bytes_per_token(shape, llama_factory, models_dir):
    llama = llama_factory(model=ensure_model(models_dir, shape), slots=1, ctx_per_slot=1024)
    reply = llama.post_json("/completion", {"prompt": "word " * 60, "n_predict": 1, "id_slot": 0})
    assert reply["timings"]["prompt_n"] > 100
    saved = llama.post_json("/slots/0?action=save", {"filename": "geometry.bin"})
    per_token = saved["n_written"] / saved["n_saved"]
    # the file is the KV cache plus a small header
    assert shape.kv_bytes_per_token <= per_token < shape.kv_bytes_per_token * 1.01, saved
