"""
Generate a random-weight llama GGUF so that llama.cpp can run with no download.

The model speaks noise, but everything proxycache cares about is real: the
tokenizer (one token per byte; the tool-call and FIM markers are one token
each), the chat template, prefill cost that grows with the prompt, per-slot KV
caches, and slot save/restore files.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

# Hermes-style tools: llama.cpp (run with --jinja) sees that the template renders
# `tools` and `tool_calls`, and parses <tool_call> JSON out of the answer.
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "Call a tool as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>\n{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "<tool_call>{\"name\": \"{{ call['function']['name'] }}\", "
    "\"arguments\": {{ call['function']['arguments'] | tojson }}}</tool_call>"
    "{% endfor %}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# The tool-call markers are single tokens, as in real Hermes-style models, so that one token can be biased.
TOOL_CALL_TOKENS = ("<tool_call>", "</tool_call>")
EOS_ID = 2
# What makes this noise model call a tool, with `tool_choice: "required"` (llama.cpp's grammar then allows
# text before the call, which noise would write forever, and no end before it): `<tool_call>` wins wherever
# the grammar allows it, so at once, and the end of the answer wins as soon as the call is closed.
FORCE_TOOL_CALL_BIAS = {TOOL_CALL_TOKENS[0]: 50, str(EOS_ID): 100}
# Fill-in-the-middle control tokens, so that llama.cpp's /infill works.
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")


@attrs.frozen
class ModelShape:
    """
    The size of a generated model; prefill cost grows with width and depth.

    C{kv_heads} and C{head_dim} (default: C{heads}, C{embedding // heads}) set the
    KV cache's geometry apart from the width: a slot file takes layers x kv_heads
    x head_dim x 2 (K and V) x 2 bytes (f16) per token, as in a real model of
    that class, while the weights stay tiny (the attention over the context is
    what such a model costs anyway).
    """

    embedding: int = 64
    layers: int = 2
    heads: int = 4
    feed_forward: int = 128
    context: int = 65536
    seed: int = 1
    kv_heads: int | None = None
    head_dim: int | None = None

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def n_head_dim(self) -> int:
        return self.head_dim or self.embedding // self.heads

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes a token takes (f16 K and V), what a slot file grows by."""
        return self.layers * self.n_kv_heads * self.n_head_dim * 2 * 2

    @property
    def filename(self) -> str:
        geometry = "" if self.kv_heads is None and self.head_dim is None else (
            f"-kv{self.n_kv_heads}-d{self.n_head_dim}"
        )
        return (
            f"tiny-llama-e{self.embedding}-l{self.layers}-h{self.heads}"
            f"-f{self.feed_forward}{geometry}-s{self.seed}-v4.gguf"
        )


TINY = ModelShape()
BENCH = ModelShape(embedding=256, layers=4, heads=4, feed_forward=768)
# Another geometry, for "a cache file written by a different model".
OTHER = ModelShape(embedding=96, layers=3, heads=4, feed_forward=192, seed=2)
# The KV geometry of real model classes (for benchmarks where a save takes real seconds), with tiny
# weights: a 7B class (Llama-3-8B, Mistral-7B, Qwen2.5-7B-ish: 32 layers x 8 KV heads x 128, 128 KiB a
# token) and a 30B class (Qwen2.5-32B: 64 layers x 8 KV heads x 128, 256 KiB a token).  No GQA: each
# query head has its own KV head, the cheapest attention for that KV size.
KV_7B = ModelShape(embedding=64, layers=32, heads=8, feed_forward=64, kv_heads=8, head_dim=128)
KV_30B = ModelShape(embedding=64, layers=64, heads=8, feed_forward=64, kv_heads=8, head_dim=128)
PRESETS = {"tiny": TINY, "bench": BENCH, "other": OTHER, "kv7b": KV_7B, "kv30b": KV_30B}


def _vocabulary() -> tuple[list[bytes], list[int]]:
    import gguf

    tokens = [b"<unk>", b"<s>", b"</s>"]
    types = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>".encode())
        types.append(gguf.TokenType.BYTE)
    # SentencePiece writes spaces as U+2581: one token for it keeps a space one token.
    tokens.append("\u2581".encode())
    types.append(gguf.TokenType.NORMAL)
    for token in TOOL_CALL_TOKENS:
        tokens.append(token.encode())
        types.append(gguf.TokenType.USER_DEFINED)
    for token in FIM_TOKENS:
        tokens.append(token.encode())
        types.append(gguf.TokenType.CONTROL)
    return tokens, [int(t) for t in types]


def write_model(path: Path, shape: ModelShape = TINY) -> Path:
    """
    Write a model of C{shape} to C{path} (atomically) and return C{path}.
    """
    import gguf
    import numpy as np

    rng = np.random.default_rng(shape.seed)
    tokens, types = _vocabulary()
    vocab = len(tokens)
    e, f = shape.embedding, shape.feed_forward
    q, kv = shape.heads * shape.n_head_dim, shape.n_kv_heads * shape.n_head_dim  # projection widths

    def weights(*dims: int) -> "np.ndarray":
        return (rng.standard_normal(dims) * 0.02).astype(np.float32)

    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("proxycache random llama")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(e)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(f)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    if shape.head_dim is not None:
        writer.add_key_length(shape.n_head_dim)
        writer.add_value_length(shape.n_head_dim)
    writer.add_rope_dimension_count(shape.n_head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)
    fim = len(tokens) - len(FIM_TOKENS)  # the FIM tokens end the vocabulary
    for offset, key in enumerate((gguf.Keys.Tokenizer.FIM_PRE_ID, gguf.Keys.Tokenizer.FIM_SUF_ID,
                                  gguf.Keys.Tokenizer.FIM_MID_ID)):
        writer.add_uint32(key, fim + offset)

    writer.add_tensor("token_embd.weight", weights(vocab, e))
    writer.add_tensor("output_norm.weight", np.ones(e, dtype=np.float32))
    writer.add_tensor("output.weight", weights(vocab, e))
    for layer in range(shape.layers):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(e, dtype=np.float32))
        writer.add_tensor(f"{block}.attn_q.weight", weights(q, e))
        writer.add_tensor(f"{block}.attn_k.weight", weights(kv, e))
        writer.add_tensor(f"{block}.attn_v.weight", weights(kv, e))
        writer.add_tensor(f"{block}.attn_output.weight", weights(e, q))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(e, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", weights(f, e))
        writer.add_tensor(f"{block}.ffn_up.weight", weights(f, e))
        writer.add_tensor(f"{block}.ffn_down.weight", weights(e, f))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def ensure_model(directory: Path, shape: ModelShape = TINY) -> Path:
    """
    Return the path of a model of C{shape} in C{directory}, generating it once.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / shape.filename
    if not path.exists():
        write_model(path, shape)
    return path
