"""GGUF files as model sources: converted once into an MLX model folder, then loaded like any folder.

:func:`ensure_converted` hashes the file, and builds ``<cache>/gguf/<sha256[:16]>-<precision>``
unless it is there. The conversion (:func:`convert_gguf`):

1. checks the header in pure Python (:func:`workers.models.gguf_file.read_gguf`): a
   truncated file, another architecture than ``llama`` or a tensor type MLX cannot
   load (the K-quants, for one) fails here, naming the type and the tensor;
2. reads the tensors with ``mx.load``, which keeps Q4_0, Q4_1 and Q8_0 as MLX
   affine-quantized weights (``weight``, ``scales``, ``biases``, groups of 32);
3. renames them to mlx-lm's Llama names, and undoes llama.cpp's permutation of the
   Q and K projections: its converter reorders each head's rows from the half-split
   rotary layout (mlx-lm's default) to the interleaved one. Rows are independent
   in every quantized layout, so the inverse permutation applies to packed weights,
   scales and biases alike;
4. keeps the quantization (``quantized``) with bits inferred per tensor from the
   shapes (in the SmolLM2 file the embedding is 8-bit and the rest 4-bit), or
   dequantizes with ``mx.dequantize`` into ``float32``, ``bfloat16`` or ``float16``;
5. writes ``model.safetensors``, ``config.json`` from the GGUF hyperparameters and
   the tokenizer files (:mod:`workers.models.gguf_tokenizer`).

The folder is built in a staging folder and renamed into place when complete
(:func:`workers.models.store.build_once`), so no half-converted model is ever served.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from actors.config import DTYPES
from workers.models.store import build_once, cache_dir, file_sha256, is_model_folder
from workers.models.gguf_file import GGUFError, GGUFHeader, read_gguf
from workers.models.gguf_tokenizer import check_tokenizer, end_token_ids, tokenizer_files

log = logging.getLogger("mlx_fleet.gguf")

FORMAT_VERSION = 1  # bump when a converted folder's contents change for the same file and precision
PRECISIONS = tuple(d for d in DTYPES if d != "auto")  # what a conversion writes: a dtype made concrete
SUPPORTED_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
SUPPORTED_ARCHITECTURES = ("llama",)

Progress = Callable[[str], None]

_LAYER_PARTS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def is_gguf_path(source: str) -> bool:
    """Whether a SOURCE names a GGUF file (by its extension)."""
    return source.lower().endswith(".gguf")


def mlx_name(gguf_name: str) -> str:
    """mlx-lm's Llama name for a GGUF tensor; GGUFError for a tensor Llama has no place for."""
    if gguf_name.endswith(".weight") and gguf_name[:-7] in _TOP_LEVEL:
        return f"{_TOP_LEVEL[gguf_name[:-7]]}.weight"
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_PARTS:
        return f"model.layers.{m.group(1)}.{_LAYER_PARTS[m.group(2)]}.weight"
    raise GGUFError(f"tensor {gguf_name!r} has no counterpart in mlx-lm's Llama model; this GGUF is not supported")


def _meta(header: GGUFHeader, key: str, default: Any = None) -> Any:
    arch = header.metadata.get("general.architecture")
    value = header.metadata.get(f"{arch}.{key}", default)
    if value is None:
        raise GGUFError(f"{header.path}: metadata {arch}.{key} is missing")
    return value


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Errors raised inside name the file they are about."""
    try:
        yield
    except GGUFError as exc:
        if str(path) in str(exc):
            raise
        raise GGUFError(f"{path}: {exc}") from None


def check_gguf(header: GGUFHeader) -> None:
    """Refuse, before reading any tensor, what this converter cannot serve correctly."""
    with naming(header.path):
        _check(header)


def _check(header: GGUFHeader) -> None:
    arch = header.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{header.path}: architecture {arch!r} is not supported (supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    for t in header.tensors:
        if t.type_name not in SUPPORTED_TYPES:
            raise GGUFError(f"{header.path}: tensor {t.name!r} has type {t.type_name}, which MLX cannot load "
                            f"(supported: {', '.join(SUPPORTED_TYPES)}); use a Q4_0, Q4_1, Q8_0 or F16 file")
        mlx_name(t.name)
    check_tokenizer(header.metadata)
    if "token_embd.weight" not in header.by_name:
        raise GGUFError(f"{header.path}: no token_embd.weight tensor")
    heads, dim = int(_meta(header, "attention.head_count")), int(_meta(header, "embedding_length"))
    head_dim = int(_meta(header, "attention.key_length", dim // heads))
    rope_dims = int(_meta(header, "rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(f"{header.path}: rotary embedding on {rope_dims} of {head_dim} head dimensions is not supported")
    scaling = header.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"{header.path}: rope scaling {scaling!r} is not supported (supported: none, linear)")


def model_config(header: GGUFHeader, quantization: dict[str, Any] | None, dtype_name: str) -> dict[str, Any]:
    """mlx-lm's ``config.json`` for the model the GGUF describes."""
    heads, dim = int(_meta(header, "attention.head_count")), int(_meta(header, "embedding_length"))
    vocab = header.by_name["token_embd.weight"].dims[1]
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": dim, "num_hidden_layers": int(_meta(header, "block_count")),
        "intermediate_size": int(_meta(header, "feed_forward_length")),
        "num_attention_heads": heads, "num_key_value_heads": int(_meta(header, "attention.head_count_kv", heads)),
        "head_dim": int(_meta(header, "attention.key_length", dim // heads)),
        "rms_norm_eps": float(_meta(header, "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_meta(header, "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_meta(header, "context_length", 4096)),
        "vocab_size": int(vocab), "tie_word_embeddings": "output.weight" not in header.by_name,
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "torch_dtype": dtype_name,
        "eos_token_id": end_token_ids(header.metadata),
    }
    if (bos := header.metadata.get("tokenizer.ggml.bos_token_id")) is not None:
        config["bos_token_id"] = int(bos)
    arch = header.metadata["general.architecture"]
    if header.metadata.get(f"{arch}.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(_meta(header, "rope.scaling.factor"))}
    if quantization:
        config["quantization"] = config["quantization_config"] = quantization
    config["mlx_fleet_gguf"] = {"format_version": FORMAT_VERSION, "source": header.path.name,
                                "file_type": header.metadata.get("general.file_type")}
    return config


def unpermute_rows(a: Any, n_heads: int) -> Any:
    """Undo llama.cpp's Q/K row permutation (per head: interleaved -> half-split rotary layout)."""
    rows = a.shape[0]
    return a.reshape(n_heads, rows // n_heads // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _weights(header: GGUFHeader, precision: str, progress: Progress) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The renamed, un-permuted tensors and the per-layer quantization (None when dequantized)."""
    import mlx.core as mx

    progress(f"reading {header.path.name} ({header.file_bytes / 2**20:.0f} MiB)")
    raw = mx.load(str(header.path))
    if not isinstance(raw, dict):  # mx.load gives a name -> array map for every .gguf
        raise GGUFError(f"{header.path}: MLX did not load it as a map of tensors")
    heads = int(_meta(header, "attention.head_count"))
    kv_heads = int(_meta(header, "attention.head_count_kv", heads))
    dtype = None if precision == "quantized" else getattr(mx, precision)
    out: dict[str, Any] = {}
    layers: dict[str, dict[str, int]] = {}
    for t in header.tensors:
        base = t.name[: -len(".weight")]
        name = mlx_name(t.name)[: -len(".weight")]
        parts = {suffix: raw[f"{base}.{suffix}"] for suffix in ("weight", "scales", "biases") if f"{base}.{suffix}" in raw}
        if "scales" in parts:
            in_features = t.dims[0]
            group_size = in_features // parts["scales"].shape[-1]
            bits = parts["weight"].shape[-1] * 32 // in_features
            if dtype is None:
                layers[name] = {"group_size": group_size, "bits": bits}
            else:
                parts = {"weight": mx.dequantize(parts["weight"], parts["scales"], parts["biases"],
                                                 group_size=group_size, bits=bits)}
        if dtype is not None:
            parts = {k: v.astype(dtype) for k, v in parts.items()}
        if base.endswith(".attn_q") or base.endswith(".attn_k"):
            n = heads if base.endswith(".attn_q") else kv_heads
            parts = {k: unpermute_rows(v, n) for k, v in parts.items()}
        out.update({f"{name}.{k}": v for k, v in parts.items()})
        mx.eval(list(parts.values()))  # one tensor at a time: peak memory stays near the output's size
    if not layers:
        return out, None
    common = Counter((q["group_size"], q["bits"]) for q in layers.values()).most_common(1)[0][0]
    quantization: dict[str, Any] = {"group_size": common[0], "bits": common[1], "mode": "affine"}
    quantization.update({n: q for n, q in layers.items() if (q["group_size"], q["bits"]) != common})
    return out, quantization


def convert_gguf(src: str | Path, folder: Path, precision: str, progress: Progress | None = None) -> None:
    """Write the MLX model folder for GGUF file ``src`` at ``precision`` into ``folder`` (which exists).

    Raises :class:`GGUFError` for a file this converter refuses; nothing is half-written
    in the cache because callers write into a staging folder (:func:`ensure_converted`).
    """
    import mlx.core as mx

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    say = progress or (lambda _text: None)
    header = read_gguf(src)
    check_gguf(header)
    with naming(header.path):
        files = tokenizer_files(header.metadata, model_max_length=int(_meta(header, "context_length", 4096)))
    weights, quantization = _weights(header, precision, say)
    dtype_name = "float16" if precision == "quantized" else precision
    config = model_config(header, quantization, dtype_name)
    say(f"writing {precision} weights ({sum(v.nbytes for v in weights.values()) / 2**20:.0f} MiB)")
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"eos_token_id": config["eos_token_id"], "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def converted_folder(sha256: str, precision: str, root: Path | None = None) -> Path:
    """Where the conversion of a file with this content hash at ``precision`` lives."""
    return (root if root is not None else cache_dir()) / "gguf" / f"{sha256[:16]}-{precision}-v{FORMAT_VERSION}"


def find_converted(sha256: str, precision: str, root: Path | None = None) -> Path | None:
    """The complete conversion of a file with this content hash at ``precision``, if the cache has it."""
    folder = converted_folder(sha256, precision, root)
    return folder if is_model_folder(folder) else None


def ensure_converted(src: str | Path, precision: str, *, root: Path | None = None,
                     progress: Progress | None = None) -> Path:
    """The MLX folder for GGUF file ``src`` at ``precision``, converting it first if needed.

    Keyed by the file's SHA-256, so a renamed copy reuses the folder and a changed
    file gets a new one. The header is checked every time, so a file replaced by a
    broken one fails clearly instead of reusing an old conversion.
    """
    say = progress or (lambda text: log.info("%s", text))
    src = Path(src).expanduser()
    check_gguf(read_gguf(src))
    t0 = time.monotonic()
    target = converted_folder(file_sha256(src), precision, root)
    if is_model_folder(target):
        return target

    def build(staged: Path) -> None:
        say(f"converting {src.name} to an MLX folder ({precision}) in {target}")
        convert_gguf(src, staged, precision, say)

    build_once(target, is_model_folder, build)
    say(f"{src.name} ready ({precision}) in {time.monotonic() - t0:.1f} s")
    return target
