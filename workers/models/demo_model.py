"""The built-in demo model: a small Llama with seeded random weights.

``write_demo_model`` writes a folder laid out like a downloaded Hugging Face / MLX model
(``config.json``, ``model.safetensors``, tokenizer files, ``generation_config.json``),
so the real ``mlx_lm.load`` path loads it. Weights come from numpy's seeded generator and
the tokenizer from deterministic BPE training on the bundled corpus, so two builds give
byte-identical files. ``ensure_demo_model`` builds a size once into a per-user cache.

The weights are random: the text is nonsense, but shapes, speed and the serving paths
are those of a real model. Special tokens get zero rows in ``lm_head``, so greedy
decoding never emits EOS and always runs to ``max_tokens``.

This module does not import ``mlx``; it writes safetensors itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from workers.models import demo_tokenizer as dtok
from workers.models.store import build_into, build_once, is_model_folder
from workers.models.store import cache_dir as demo_cache_dir

# Bump when the folder's contents change for the same size, seed and corpus.
FORMAT_VERSION = 1
DEFAULT_SEED = 0
MAX_POSITION_EMBEDDINGS = 4096
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5

# Init scales, chosen so greedy output varies instead of looping on one token (about
# 75 distinct tokens in 80 greedy steps for both sizes). Projections use std =
# PROJ_GAIN / sqrt(fan_in), strong enough that attention mixes in context. lm_head
# uses std = LM_HEAD_GAIN / sqrt(hidden), so logits have std ~4: peaked enough to
# look like a model, flat enough that temperature sampling differs from greedy.
EMBED_STD = 1.0
PROJ_GAIN = 2.0
LM_HEAD_GAIN = 4.0

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class DemoSize:
    """Shape of one demo model size."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = 0  # 0: the trained tokenizer's; more: widened (demo_tokenizer.widen_tokenizer)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads


DEMO_SIZES: dict[str, DemoSize] = {
    "demo": DemoSize("demo", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                     intermediate_size=768),
    "demo-small": DemoSize("demo-small", hidden_size=512, num_layers=8, num_heads=8,
                           num_kv_heads=4, intermediate_size=1536),
    # demo's shape with a Llama-3-sized vocabulary, for what scales with it (logits, grammar masks)
    "demo-wide": DemoSize("demo-wide", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                          intermediate_size=768, vocab_size=131_072),
}


def get_demo_size(size: str) -> DemoSize:
    """Return the ``DemoSize`` named ``size``; raise ``ValueError`` naming valid sizes."""
    try:
        return DEMO_SIZES[size]
    except KeyError:
        valid = ", ".join(sorted(DEMO_SIZES))
        raise ValueError(f"unknown demo model size {size!r}; valid sizes: {valid}") from None


def demo_fingerprint(size: str, *, seed: int = DEFAULT_SEED) -> str:
    """Return a short hex digest of everything that decides a demo folder's bytes.

    It covers the size's shape, the seed, the format version, the init scales, the
    corpus hash and the ``tokenizers`` version (its trainer decides the vocab).
    """
    spec = get_demo_size(size)
    payload = {
        "format_version": FORMAT_VERSION,
        "size": {k: v for k, v in dataclasses.asdict(spec).items() if k != "vocab_size" or v},
        "seed": seed,
        "vocab_size": dtok.VOCAB_SIZE,
        "init": [EMBED_STD, PROJ_GAIN, LM_HEAD_GAIN],
        "rope": [MAX_POSITION_EMBEDDINGS, ROPE_THETA, RMS_NORM_EPS],
        "corpus_sha256": dtok.corpus_sha256(),
        "tokenizers": tokenizers.__version__,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()[:12]


def _model_config(spec: DemoSize, vocab_size: int, seed: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": vocab_size,
        "bos_token_id": dtok.BOS_TOKEN_ID,
        "eos_token_id": dtok.EOS_TOKEN_ID,
        "torch_dtype": "float32",
        "mlx_fleet_demo": {
            "size": spec.name,
            "seed": seed,
            "format_version": FORMAT_VERSION,
            "fingerprint": demo_fingerprint(spec.name, seed=seed),
        },
    }


# (name, shape, std); std 0 means "ones" (RMSNorm weights).
_TensorPlan = tuple[str, tuple[int, ...], float]


def _tensor_plan(spec: DemoSize, vocab_size: int) -> list[_TensorPlan]:
    hidden, inter = spec.hidden_size, spec.intermediate_size
    q_width = spec.num_heads * spec.head_dim
    kv_width = spec.num_kv_heads * spec.head_dim
    plan: list[_TensorPlan] = [("model.embed_tokens.weight", (vocab_size, hidden), EMBED_STD)]
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}"
        # Linear weights are (out_features, in_features).
        for name, shape in (
            ("self_attn.q_proj", (q_width, hidden)),
            ("self_attn.k_proj", (kv_width, hidden)),
            ("self_attn.v_proj", (kv_width, hidden)),
            ("self_attn.o_proj", (hidden, q_width)),
            ("mlp.gate_proj", (inter, hidden)),
            ("mlp.up_proj", (inter, hidden)),
            ("mlp.down_proj", (hidden, inter)),
        ):
            plan.append((f"{prefix}.{name}.weight", shape, PROJ_GAIN / shape[1] ** 0.5))
        plan.append((f"{prefix}.input_layernorm.weight", (hidden,), 0.0))
        plan.append((f"{prefix}.post_attention_layernorm.weight", (hidden,), 0.0))
    plan.append(("model.norm.weight", (hidden,), 0.0))
    plan.append(("lm_head.weight", (vocab_size, hidden), LM_HEAD_GAIN / hidden**0.5))
    return plan


def _make_tensor(name: str, shape: tuple[int, ...], std: float, seed: int) -> np.ndarray:
    if std == 0.0:
        return np.ones(shape, dtype="<f4")
    # One stream per tensor name, so a tensor's values do not depend on plan order.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= np.float32(std)
    if name == "lm_head.weight":
        # Logit 0 for special tokens: far below the top logit, so greedy never picks them.
        values[: len(dtok.SPECIAL_TOKENS)] = 0.0
    return values.astype("<f4", copy=False)


def _write_safetensors(path: Path, plan: list[_TensorPlan], seed: int) -> None:
    """Write tensors one at a time in the safetensors layout: u64 header length, JSON
    header, then the raw little-endian data back to back."""
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset_bytes = 0
    for name, shape, _ in plan:
        nbytes = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [offset_bytes, offset_bytes + nbytes]}
        offset_bytes += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, shape, std in plan:
            f.write(_make_tensor(name, shape, std, seed).data)
        f.flush()
        os.fsync(f.fileno())


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _write_contents(folder: Path, spec: DemoSize, seed: int) -> None:
    tokenizer = dtok.train_demo_tokenizer()
    if spec.vocab_size:
        tokenizer = dtok.widen_tokenizer(tokenizer, spec.vocab_size)
    vocab_size = tokenizer.get_vocab_size()
    for name, data in dtok.tokenizer_files(tokenizer).items():
        _write_file(folder / name, data)
    _write_file(folder / "config.json", _json_bytes(_model_config(spec, vocab_size, seed)))
    generation_config = {"bos_token_id": dtok.BOS_TOKEN_ID, "eos_token_id": dtok.EOS_TOKEN_ID,
                         "do_sample": False}
    _write_file(folder / "generation_config.json", _json_bytes(generation_config))
    _write_safetensors(folder / "model.safetensors", _tensor_plan(spec, vocab_size), seed)


def write_demo_model(path: Path, size: str = "demo", *, seed: int = DEFAULT_SEED) -> Path:
    """Write a demo model folder at ``path`` and return ``path``.

    The folder is built in a hidden temporary sibling and renamed into place, so
    ``path`` never shows a half-written model. An existing ``path`` is replaced.
    Raises ``ValueError`` for an unknown ``size``.
    """
    spec = get_demo_size(size)
    return build_into(Path(path), lambda staged: _write_contents(staged, spec, seed))


def ensure_demo_model(size: str = "demo", *, cache_dir: Path | None = None) -> Path:
    """Return ``<cache>/models/<size>-<fingerprint>``, building it first if absent.

    Safe when several processes call it at once (:func:`workers.models.store.build_once`).
    Raises ``ValueError`` for an unknown ``size``.
    """
    spec = get_demo_size(size)
    models_dir = Path(cache_dir if cache_dir is not None else demo_cache_dir()) / "models"
    target = models_dir / f"{spec.name}-{demo_fingerprint(spec.name)}"
    return build_once(target, is_model_folder, lambda staged: _write_contents(staged, spec, DEFAULT_SEED))


def _demo_size_name(source: str) -> str | None:
    if source.startswith(BUILTIN_PREFIX):
        return source[len(BUILTIN_PREFIX):]
    return source if source in DEMO_SIZES else None


def is_demo_source(source: str) -> bool:
    """Whether a model SOURCE string names the built-in demo model.

    ``demo`` and ``demo-small`` do, as does anything starting with ``builtin:``
    (an unknown ``builtin:`` size is an error at resolve time, not a hub id).
    """
    return _demo_size_name(source) is not None


def resolve_demo_source(source: str, *, cache_dir: Path | None = None) -> Path | None:
    """Return the cached folder for a demo SOURCE, building it if needed.

    Returns ``None`` when ``source`` is not a demo source (a folder or hub id).
    Raises ``ValueError`` for ``builtin:<unknown size>``.
    """
    size = _demo_size_name(source)
    if size is None:
        return None
    return ensure_demo_model(size, cache_dir=cache_dir)
