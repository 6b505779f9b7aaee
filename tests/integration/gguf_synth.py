"""Small random mlx-lm models of each architecture, written as GGUF files the way llama.cpp would.

:func:`make_model` builds a random mlx-lm model (2 layers, hidden 64 or 256) of one
architecture; :func:`write_model_gguf` writes it with ``gguf.GGUFWriter``: the
architecture's metadata, the tensors renamed with the ``gguf`` package's name map,
llama.cpp's changes applied (Llama's Q/K row permutation, Gemma's ``+1`` on norms,
Llama 3's ``rope_freqs``), and every matrix in one ggml type. Types the ``gguf``
package can quantize are quantized from the model's weights; the others (K- and
I-quants) are written as random blocks, and the model takes the values those blocks
decode to, so the model always holds exactly what the file encodes, up to the
quantization of the quantizable types.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# name -> (GGUF architecture, mlx-lm config on top of the common one)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {"model_type": "llama", "rope_theta": 10000.0}),
    "llama3": ("llama", {"model_type": "llama", "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "mistral": ("llama", {"model_type": "mistral", "rope_theta": 1000000.0}),
    "qwen2": ("qwen2", {"model_type": "qwen2", "rope_theta": 1000000.0}),
    "qwen3": ("qwen3", {"model_type": "qwen3", "rope_theta": 1000000.0, "head_dim": 32}),
    "gemma3": ("gemma3", {"model_type": "gemma3_text", "rope_theta": 1000000.0, "head_dim": 32,
                          "query_pre_attn_scalar": 32, "rope_local_base_freq": 10000.0,
                          "sliding_window": 4, "sliding_window_pattern": 2}),
    "phi3": ("phi3", {"model_type": "phi3", "rope_theta": 10000.0}),
}
# ggml types with 256-value blocks need rows of 256: those files use hidden size 256.
BLOCK_256 = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "IQ3_S", "IQ1_S")
# Byte ranges of each block's float16 scales, for the types written as random blocks.
_F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
               "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ2_XXS": (0,), "IQ3_S": (0,), "IQ1_S": (0,)}
WEIGHT_STD = 0.05


def make_model(name: str, vocab_size: int, *, hidden: int = 64, seed: int = 0,
               qk_scale: float = 8.0) -> tuple[Any, dict[str, Any]]:
    """A random mlx-lm model of architecture ``name`` (see :data:`ARCHS`) and its config.

    Q and K are scaled up by ``qk_scale`` so attention is sharp: a missing Q/K fix then
    shows in the logits (and so does quantization noise, which sharp attention amplifies).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    _, extra = ARCHS[name]
    config = {"hidden_size": hidden, "num_hidden_layers": 2, "intermediate_size": 2 * hidden,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": vocab_size,
              "max_position_embeddings": 512, "tie_word_embeddings": name in ("qwen2", "gemma3"),
              "head_dim": hidden // 4, **extra}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    rng = np.random.default_rng(seed)
    weights = []
    for key, value in tree_flatten(model.parameters()):
        shape = tuple(value.shape)
        if key.endswith("norm.weight"):
            w = 1.0 + 0.3 * rng.standard_normal(shape)
            w = w - 1.0 if name == "gemma3" else w  # gemma3_text scales by 1 + weight
        else:
            w = WEIGHT_STD * rng.standard_normal(shape) * (qk_scale if (".q_proj" in key or ".k_proj" in key) else 1.0)
        weights.append((key, mx.array(w.astype(np.float32))))
    model.load_weights(weights)
    return model, config


def _name_map(arch: str, layers: int) -> Any:
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Llama converter's Q/K permutation (per head: half-split -> interleaved rotary layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`permute_rows`."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_blocks(shape: tuple[int, ...], qtype_name: str, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of a type ``gguf.quants`` cannot quantize, with scales giving values of about :data:`WEIGHT_STD`."""
    import gguf
    from gguf.quants import dequantize, quant_shape_to_byte_shape

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
    blocks = raw.reshape(-1, type_size)
    for scale in (1e-3, None):
        for offset in _F16_FIELDS[qtype_name]:
            values = scale * rng.uniform(0.5, 1.5, len(blocks)) if scale else \
                blocks[:, offset:offset + 2].copy().view(np.float16).astype(np.float32)[:, 0] * factor
            blocks[:, offset:offset + 2] = values.astype(np.float16).reshape(-1, 1).view(np.uint8)
        factor = WEIGHT_STD / float(np.std(dequantize(raw, qtype)))
    return raw


def _encode(w: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(the data to write, the values it decodes to) of ``w`` in ggml type ``kind``."""
    import gguf
    from gguf.quants import dequantize, quantize

    qtype = gguf.GGMLQuantizationType[kind]
    if kind in _F16_FIELDS:
        data = random_blocks(w.shape, kind, rng)
    else:
        data = quantize(w.astype(np.float32), qtype)
    return data, dequantize(data, qtype).reshape(w.shape).astype(np.float32)


def _metadata(writer: Any, arch: str, config: dict[str, Any], tokenizer: dict[str, Any]) -> None:
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
        writer.add_sliding_window_pattern(config["sliding_window_pattern"])
    for key, value in tokenizer.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, str(value))


def llama3_rope_freqs(config: dict[str, Any]) -> np.ndarray:
    """llama.cpp's converter's ``rope_freqs`` for a Llama 3 rope-scaling config: one factor per frequency."""
    s, dim = config["rope_scaling"], config["head_dim"]
    freqs = 1.0 / (config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    old = s["original_max_position_embeddings"]
    wavelen = 2 * np.pi / freqs
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    factors = np.where(wavelen < old / s["high_freq_factor"], 1.0,
                       np.where(wavelen > old / s["low_freq_factor"], s["factor"],
                                1.0 / ((1 - smooth) / s["factor"] + smooth)))
    return factors.astype(np.float32)


def write_model_gguf(path: Path, name: str, model: Any, config: dict[str, Any], tokenizer: dict[str, Any],
                     kind: str, *, seed: int = 0) -> Path:
    """Write ``model`` as llama.cpp would, every matrix in ggml type ``kind`` (norms and biases F32).

    The model's weights become the values the file decodes to (the quantization's
    round trip), so comparing with the model afterwards measures the conversion only.
    """
    import gguf
    import mlx.core as mx
    from mlx.utils import tree_flatten

    arch, _ = ARCHS[name]
    names = _name_map(arch, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(writer, arch, config, tokenizer)
    rng = np.random.default_rng(seed)
    decoded = []
    for key, value in tree_flatten(model.parameters()):
        stem, _, suffix = key.rpartition(".")
        gguf_name = f"{names.get_name(stem)}.{suffix}"
        w = np.array(value.astype(mx.float32))
        heads = config["num_attention_heads"] if ".attn_q." in gguf_name else config["num_key_value_heads"]
        permute = arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name)
        if permute:
            w = permute_rows(w, heads)
        if arch == "gemma3" and gguf_name.endswith("norm.weight"):
            w = w + 1.0
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
        this_kind = kind if w.ndim == 2 and w.shape[-1] % block == 0 else ("F32" if w.ndim == 1 else "Q8_0")
        data, back = _encode(w, this_kind, rng)
        writer.add_tensor(gguf_name, data, raw_dtype=gguf.GGMLQuantizationType[this_kind])
        if arch == "gemma3" and gguf_name.endswith("norm.weight"):
            back = back - 1.0
        decoded.append((key, mx.array(unpermute_rows(back, heads) if permute else back)))
    if config.get("rope_scaling", {}).get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(config), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.load_weights(decoded)
    return path
