"""GGUF architectures as mlx-lm model classes: the config, the tensor names, the weight fixes.

Each supported ``general.architecture`` is an :class:`Arch`: the mlx-lm ``model_type``
that serves it, a function that turns the file's hyperparameters into that class's
``config.json``, and the two changes llama.cpp's converter made to the weights that
must be undone here:

- ``permute_qk``: its Llama converter reorders each head's Q and K rows from the
  half-split rotary layout (mlx-lm's, and Hugging Face's) to the interleaved one
  that ggml's "normal" rope reads. Qwen, Gemma and Phi use ggml's NeoX rope, so
  their rows are left as they were;
- ``norm_offset``: Gemma's RMSNorm scales by ``1 + weight``; the converter stores
  ``1 + weight`` so ggml can multiply by it directly, and mlx-lm's ``gemma3_text``
  adds the 1 again. Every ``*norm.weight`` gets the offset taken off.

Everything else an architecture needs (Gemma's scaled embeddings, its sliding-window
pattern, Qwen's attention biases) is mlx-lm's model class's own business, given the
right config. Tensor names are not tabled here: :func:`tensor_names` builds the
mlx-lm model from the config (lazily, no weights) and asks the ``gguf`` package's
``TensorNameMap`` for the GGUF name of each of its parameters, which is that map
read backwards.

No ``mistral`` architecture exists in GGUF: llama.cpp writes Mistral 7B and its
kin as ``llama`` (mlx-lm likewise serves ``mistral`` with its Llama class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from workers.models.gguf_file import GGUFError, GGUFHeader

# Tensors llama.cpp's converter adds that are no model parameter: read into the config.
ROPE_FREQS = "rope_freqs.weight"


class Hparams:
    """The ``<arch>.*`` metadata of one file, read with defaults and clear errors."""

    def __init__(self, header: GGUFHeader) -> None:
        self.header = header
        self.arch = str(header.metadata.get("general.architecture"))

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``<arch>.<key>``, or ``default``."""
        return self.header.metadata.get(f"{self.arch}.{key}", default)

    def number(self, key: str, default: float | None = None) -> float:
        """A scalar; GGUFError when it is missing without a default, or is a per-layer list."""
        value = self.get(key, default)
        if value is None:
            raise GGUFError(f"{self.header.path}: metadata {self.arch}.{key} is missing")
        if isinstance(value, list):
            raise GGUFError(f"{self.header.path}: metadata {self.arch}.{key} differs per layer ({value[:4]}...), "
                            f"which mlx-lm's {self.arch} model cannot express")
        return float(value)

    def int(self, key: str, default: int | None = None) -> int:
        """An integer scalar (see :meth:`number`)."""
        return int(self.number(key, default))


@dataclass(frozen=True)
class Arch:
    """How one GGUF architecture maps onto an mlx-lm model class."""

    name: str
    model_type: str
    config: Callable[[Hparams], dict[str, Any]]
    permute_qk: bool = False
    norm_offset: float = 0.0


def _common(h: Hparams) -> dict[str, Any]:
    heads, hidden = h.int("attention.head_count"), h.int("embedding_length")
    head_dim = h.int("attention.key_length", hidden // heads)
    if h.int("attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{h.header.path}: key and value head sizes differ, which mlx-lm's {h.arch} model cannot express")
    embedding = h.header.by_name.get("token_embd.weight")
    if embedding is None:
        raise GGUFError(f"{h.header.path}: no token_embd.weight tensor")
    return {
        "hidden_size": hidden, "num_hidden_layers": h.int("block_count"),
        "intermediate_size": h.int("feed_forward_length"), "num_attention_heads": heads,
        "num_key_value_heads": h.int("attention.head_count_kv", heads), "head_dim": head_dim,
        "rms_norm_eps": h.number("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": h.number("rope.freq_base", 10000.0),
        "max_position_embeddings": h.int("context_length", 4096),
        "vocab_size": embedding.dims[1], "tie_word_embeddings": "output.weight" not in h.header.by_name,
    }


def _check_full_rotary(h: Hparams, head_dim: int) -> None:
    rope_dims = h.int("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise GGUFError(f"{h.header.path}: rotary embedding on {rope_dims} of {head_dim} head dimensions "
                        f"is not supported for {h.arch}")


def _check_head_dim(h: Hparams, config: Mapping[str, Any]) -> None:
    """mlx-lm's Qwen 2 and Phi 3 classes take the head size as hidden size / heads."""
    if config["head_dim"] * config["num_attention_heads"] != config["hidden_size"]:
        raise GGUFError(f"{h.header.path}: head size {config['head_dim']} is not hidden size / heads, "
                        f"which mlx-lm's {h.arch} model cannot express")


def _rope_scaling(h: Hparams, config: dict[str, Any]) -> None:
    """Linear scaling from the metadata; Llama 3's per-frequency factors from ``rope_freqs``."""
    kind = str(h.get("rope.scaling.type", "none"))
    if kind == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": h.number("rope.scaling.factor")}
    elif kind != "none":
        raise GGUFError(f"{h.header.path}: rope scaling {kind!r} is not supported (supported: none, linear, "
                        f"and Llama 3's {ROPE_FREQS})")
    freqs = h.header.by_name.get(ROPE_FREQS)
    if freqs is None:
        return
    if kind != "none":
        raise GGUFError(f"{h.header.path}: both rope scaling {kind!r} and {ROPE_FREQS}")
    factors = [float(v) for v in freqs.data.reshape(-1).tolist()]
    if freqs.type_name != "F32" or len(factors) != config["head_dim"] // 2:
        raise GGUFError(f"{h.header.path}: tensor {ROPE_FREQS!r} ({freqs.type_name}, {len(factors)} values) is not "
                        f"one F32 factor per rotary frequency ({config['head_dim'] // 2})")
    # ggml divides each frequency by its factor; mlx-lm's "longrope" multiplies each
    # wavelength by its factor, with no attention scaling when both lengths are equal.
    n = config["max_position_embeddings"]
    config["rope_scaling"] = {"type": "longrope", "long_factor": factors, "short_factor": factors,
                              "original_max_position_embeddings": n}


def _llama(h: Hparams) -> dict[str, Any]:
    config = _common(h)
    _check_full_rotary(h, config["head_dim"])
    _rope_scaling(h, config)
    return {**config, "attention_bias": "blk.0.attn_q.bias" in h.header.by_name,
            "mlp_bias": "blk.0.ffn_up.bias" in h.header.by_name, "hidden_act": "silu"}


def _qwen(h: Hparams) -> dict[str, Any]:
    config = _common(h)
    _check_full_rotary(h, config["head_dim"])
    if str(h.get("rope.scaling.type", "none")) not in ("none", "linear"):
        raise GGUFError(f"{h.header.path}: rope scaling {h.get('rope.scaling.type')!r} is not supported for "
                        f"{h.arch} (supported: none, linear)")
    if h.get("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": h.number("rope.scaling.factor")}
    if h.arch == "qwen2":
        _check_head_dim(h, config)
    return config


def _gemma3(h: Hparams) -> dict[str, Any]:
    config = _common(h)
    _check_full_rotary(h, config["head_dim"])
    if h.get("final_logit_softcapping"):
        raise GGUFError(f"{h.header.path}: final logit soft-capping is not supported for gemma3")
    window = h.get("attention.sliding_window")
    pattern = h.get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # one flag per layer: True where the layer is local
        period = pattern.index(False) + 1 if False in pattern else len(pattern)
        if [bool(v) for v in pattern] != [(i + 1) % period != 0 for i in range(len(pattern))]:
            raise GGUFError(f"{h.header.path}: sliding-window layers {pattern} are not every layer but each "
                            f"n-th, which mlx-lm's gemma3_text model cannot express")
        pattern = period
    # llama.cpp: a 62-layer Gemma 3 (27B) scales queries by hidden/heads, the others by the head size.
    scalar = config["hidden_size"] // config["num_attention_heads"] if config["num_hidden_layers"] == 62 \
        else config["head_dim"]
    config.update({
        "query_pre_attn_scalar": scalar, "rope_local_base_freq": h.number("rope.freq_base_swa", 10000.0),
        "sliding_window": int(window) if window else config["max_position_embeddings"],
        "sliding_window_pattern": int(pattern) if window else 1,
    })
    if (kind := h.get("rope.scaling.type")) not in (None, "none", "linear"):
        raise GGUFError(f"{h.header.path}: rope scaling {kind!r} is not supported for gemma3 (supported: linear)")
    if kind == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": h.number("rope.scaling.factor")}
    return config


def _phi3(h: Hparams) -> dict[str, Any]:
    config = _common(h)
    _check_head_dim(h, config)
    long_rope = [n for n in ("rope_factors_long.weight", "rope_factors_short.weight") if n in h.header.by_name]
    if long_rope:
        raise GGUFError(f"{h.header.path}: tensor {long_rope[0]!r}: Phi 3's long-context rope is not supported "
                        f"(llama.cpp picks the short or long factors by context size; mlx-lm always uses the long)")
    rope_dims = h.int("rope.dimension_count", config["head_dim"])
    window = h.get("attention.sliding_window")
    return {**config, "partial_rotary_factor": rope_dims / config["head_dim"],
            "original_max_position_embeddings": config["max_position_embeddings"],
            **({"sliding_window": int(window)} if window else {})}


ARCHITECTURES: dict[str, Arch] = {a.name: a for a in (
    Arch("llama", "llama", _llama, permute_qk=True),
    Arch("qwen2", "qwen2", _qwen),
    Arch("qwen3", "qwen3", _qwen),
    Arch("gemma3", "gemma3_text", _gemma3, norm_offset=1.0),
    Arch("phi3", "phi3", _phi3),
)}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def arch_of(header: GGUFHeader) -> Arch:
    """The :class:`Arch` of a file; GGUFError naming an architecture this converter does not serve."""
    name = header.metadata.get("general.architecture")
    if name not in ARCHITECTURES:
        raise GGUFError(f"{header.path}: architecture {name!r} is not supported (supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    return ARCHITECTURES[str(name)]


def model_config(header: GGUFHeader) -> dict[str, Any]:
    """mlx-lm's config for the file's model (no quantization, dtype or tokenizer fields)."""
    arch = arch_of(header)
    return {"architectures": [arch.model_type], "model_type": arch.model_type, **arch.config(Hparams(header))}


def tensor_names(header: GGUFHeader, config: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each parameter of the mlx-lm model, by its mlx-lm name: (the GGUF tensor's name, the shape mlx-lm wants).

    A tied output has no ``lm_head.weight`` entry. GGUFError for a parameter no
    GGUF tensor fills, or a GGUF tensor no parameter takes (other than ``rope_freqs``).
    """
    import gguf
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    arch = arch_of(header)
    model_class, args_class = _get_classes(dict(config))
    model = model_class(args_class.from_dict(dict(config)))  # lazy arrays: nothing is computed
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], int(config["num_hidden_layers"]))
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    params: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    for name, param in params:
        stem, _, suffix = name.rpartition(".")
        gguf_stem = name_map.get_name(stem)
        if gguf_stem is None:
            raise GGUFError(f"{header.path}: mlx-lm's {arch.model_type} parameter {name!r} has no GGUF tensor name")
        gguf_name = f"{gguf_stem}.{suffix}"
        if gguf_name not in header.by_name:
            if name == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue
            raise GGUFError(f"{header.path}: tensor {gguf_name!r} (mlx-lm's {name}) is missing")
        out[name] = (gguf_name, tuple(param.shape))
    used = {g for g, _ in out.values()} | {ROPE_FREQS}
    for t in header.tensors:
        if t.name not in used:
            raise GGUFError(f"{header.path}: tensor {t.name!r} ({t.type_name}) has no counterpart in mlx-lm's "
                            f"{arch.model_type} model; this GGUF is not supported")
    return out


def unpermute_rows(a: Any, n_heads: int) -> Any:
    """Undo llama.cpp's Q/K row permutation (per head: interleaved -> half-split rotary layout)."""
    rows = a.shape[0]
    return a.reshape(n_heads, rows // n_heads // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def fix_weight(arch: Arch, gguf_name: str, value: Any, config: Mapping[str, Any]) -> Any:
    """A tensor as mlx-lm wants it: Q/K rows un-permuted, Gemma's norm offset taken off.

    Works on numpy and MLX arrays alike, and on each part of an MLX-quantized weight
    (rows are independent in every quantized layout).
    """
    if arch.permute_qk and gguf_name.endswith((".attn_q.weight", ".attn_k.weight", ".attn_q.bias", ".attn_k.bias")):
        heads = config["num_attention_heads"] if ".attn_q." in gguf_name else config["num_key_value_heads"]
        value = unpermute_rows(value, int(heads))
    if arch.norm_offset and gguf_name.endswith("norm.weight"):
        value = value - arch.norm_offset
    return value

