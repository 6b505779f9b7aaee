"""Write small GGUF files byte by byte for tests: typed metadata, tensors in F32, F16, Q8_0, Q4_0 or Q4_1,
and made-up blocks of other type ids (for refusals).

The writer follows llama.cpp's layout (GGUF v3, little-endian, data aligned to 32 bytes)
and its block quantizers, written here in numpy. ``demo_as_gguf`` turns the demo model's
folder into the GGUF file llama.cpp's converter would make of it: Llama tensor names,
the Q and K projections permuted to its rotary layout, and the tokenizer as tokens,
merges and token types.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

ALIGNMENT = 32
TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q8_1": 9, "Q4_K": 12, "type 99": 99}
# Types written as made-up bytes only: (values per block, bytes per block).
BLOCK_BYTES = {"Q4_K": (256, 144), "Q8_1": (32, 36), "type 99": (32, 18)}

# Metadata value type ids.
U32, I32, F32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(value: Any) -> tuple[int, bytes]:
    """(type id, bytes) of a metadata value: str, bool, int (u32), float (f32), or a list of one of them."""
    if isinstance(value, str):
        return STRING, _string(value)
    if isinstance(value, bool):
        return BOOL, struct.pack("<?", value)
    if isinstance(value, int):
        return U32, struct.pack("<I", value)
    if isinstance(value, float):
        return F32, struct.pack("<f", value)
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return ARRAY, struct.pack("<IQ", STRING, len(value)) + b"".join(_string(v) for v in value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return ARRAY, struct.pack("<IQ", I32, len(value)) + np.asarray(value, dtype="<i4").tobytes()
        return ARRAY, struct.pack("<IQ", F32, len(value)) + np.asarray(value, dtype="<f4").tobytes()
    raise TypeError(f"cannot write metadata value {value!r}")


def quantize_q8_0(x: np.ndarray) -> bytes:
    """llama.cpp's Q8_0 blocks of 32: an f16 scale and 32 int8 values."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.round(blocks * inv[:, None]).astype(np.int8)
    out = np.empty((len(blocks), 34), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.tobytes()


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def quantize_q4_0(x: np.ndarray) -> bytes:
    """llama.cpp's Q4_0 blocks of 32: an f16 scale and 32 4-bit values, (q - 8) * d."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    extreme = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)]
    d = extreme / -8.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(15, (blocks * inv[:, None] + 8.5).astype(np.int8)).astype(np.uint8)
    out = np.empty((len(blocks), 18), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = _pack_nibbles(q)
    return out.tobytes()


def quantize_q4_1(x: np.ndarray) -> bytes:
    """llama.cpp's Q4_1 blocks of 32: f16 scale and minimum and 32 4-bit values, q * d + m."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    d = (hi - lo) / 15.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.minimum(15, ((blocks - lo[:, None]) * inv[:, None] + 0.5).astype(np.int8)).astype(np.uint8)
    out = np.empty((len(blocks), 20), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = lo.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 4:] = _pack_nibbles(q)
    return out.tobytes()


def tensor_bytes(x: np.ndarray, kind: str) -> bytes:
    """The data of ``x`` in ggml type ``kind`` (a made-up payload for raw-only types)."""
    if kind == "F32":
        return x.astype("<f4").tobytes()
    if kind == "F16":
        return x.astype("<f2").tobytes()
    quantizers = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q4_1": quantize_q4_1}
    if kind in quantizers:
        return quantizers[kind](x)
    per_block, nbytes = BLOCK_BYTES[kind]
    return bytes(x.size // per_block * nbytes)


def write_gguf(path: Path, metadata: dict[str, Any], tensors: list[tuple[str, np.ndarray, str]]) -> Path:
    """Write a GGUF v3 file: ``tensors`` are (name, array as rows x cols, ggml type name)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        type_id, raw = _value(value)
        head += _string(key) + struct.pack("<I", type_id) + raw
    blobs, offset = [], 0
    for name, array, kind in tensors:
        data = tensor_bytes(array, kind)
        dims = array.shape[::-1]  # ggml lists the fastest-moving dimension first
        head += _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        head += struct.pack("<IQ", TYPE_IDS[kind], offset)
        padded = data + bytes(-len(data) % ALIGNMENT)
        blobs.append(padded)
        offset += len(padded)
    head += bytes(-len(head) % ALIGNMENT)
    path.write_bytes(head + b"".join(blobs))
    return path


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K permutation (per head: half-split -> interleaved rotary layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def demo_tokenizer_metadata(folder: Path) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata of a demo model folder, as llama.cpp's converter writes it."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if i in special else 1 for i in range(len(tokens))],
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": vocab[cfg["bos_token"]],
        "tokenizer.ggml.eos_token_id": vocab[cfg["eos_token"]], "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": cfg["chat_template"],
    }


def sentencepiece_metadata(vocab_size: int) -> tuple[dict[str, Any], Any]:
    """A SentencePiece BPE tokenizer trained on the demo corpus, as llama.cpp's converter stores it
    (``tokenizer.ggml.model = llama``: pieces, scores, token types), and the trained processor."""
    import io

    import sentencepiece as spm

    from workers.models.demo_tokenizer import read_corpus_text

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(read_corpus_text().splitlines()), model_writer=proto, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    n = sp.get_piece_size()

    def kind(i: int) -> int:  # llama.cpp's token types
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1

    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)],
            "tokenizer.ggml.token_type": [kind(i) for i in range(n)], "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": True}
    return meta, sp


def demo_as_gguf(path: Path, folder: Path, *, types: dict[str, str] | None = None,
                 architecture: str = "llama", permute: bool = True, tokenizer: dict[str, Any] | None = None) -> Path:
    """Write the demo model in ``folder`` as a GGUF file, as llama.cpp's converter would.

    ``types`` maps GGUF tensor names (or ``*`` for every matrix) to a ggml type;
    norms stay F32. ``permute=False`` leaves Q and K in the Hugging Face layout.
    ``tokenizer`` replaces the demo's ``tokenizer.ggml.*`` metadata (the chat template stays).
    """
    import mlx.core as mx

    types = types or {}
    cfg = json.loads((folder / "config.json").read_text())
    weights = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(folder / "model.safetensors")).items()}
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors: list[tuple[str, np.ndarray, str]] = []
    for name, w in weights.items():
        if name == "model.embed_tokens.weight":
            gguf = "token_embd.weight"
        elif name == "lm_head.weight":
            gguf = "output.weight"
        elif name == "model.norm.weight":
            gguf = "output_norm.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            part = _NAMES[rest.removesuffix(".weight")]
            gguf = f"blk.{layer}.{part}.weight"
            if permute and part in ("attn_q", "attn_k"):
                w = permute_rows(w, heads if part == "attn_q" else kv_heads)
        kind = "F32" if w.ndim == 1 else types.get(gguf, types.get("*", "F32"))
        tensors.append((gguf, w, kind))
    arch = architecture
    metadata: dict[str, Any] = {
        "general.architecture": arch, "general.name": "demo as gguf", "general.alignment": ALIGNMENT,
        f"{arch}.block_count": cfg["num_hidden_layers"], f"{arch}.context_length": cfg["max_position_embeddings"],
        f"{arch}.embedding_length": cfg["hidden_size"], f"{arch}.feed_forward_length": cfg["intermediate_size"],
        f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.rope.freq_base": float(cfg["rope_theta"]), f"{arch}.rope.dimension_count": cfg["head_dim"],
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
        **demo_tokenizer_metadata(folder), **(tokenizer or {}),
    }
    return write_gguf(path, metadata, tensors)
