"""A random-weight model folder with Llama-3.2-3B's configuration (the seed's model), for GPU runs.

Random weights cost the same per token as trained ones, so this folder gives the seed's
absolute numbers a counterpart without a model hub. It reuses the demo model's pieces
(:mod:`workers.models.demo_model`): its tensor plan and seeded per-tensor generator, and the
demo tokenizer's files. What differs from the demo:

- Llama-3.2-3B's shape: hidden 3072, 28 layers, 24 heads, 8 KV heads, intermediate 8192,
  vocab 128256 (the demo tokenizer's 2048 ids, padded), rope_theta 500000 with Llama 3's
  rope scaling, tied embeddings (no ``lm_head``).
- bfloat16 by default (what a GPU serves); ``--dtype float32`` for CPU BLAS paths.
- Tied embeddings make the embedding the output head, so its special-token and padding
  rows are zero: greedy decoding never picks an id the tokenizer cannot decode, and
  never stops early.

    python -m benchmarks.llama3b /tmp/llama3b [--dtype bfloat16] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from workers.models import demo_model as dm
from workers.models import demo_tokenizer as dtok
from workers.models.store import build_into

LLAMA_3_2_3B = dm.DemoSize("llama-3.2-3b-config", hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8,
                           intermediate_size=8192)
TINY = dm.DemoSize("llama-3.2-3b-config-tiny", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=512)  # same config keys, for a CPU smoke test of the folder
VOCAB_SIZE = 128256
ROPE_THETA = 500000.0
ROPE_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
MAX_POSITION_EMBEDDINGS = 131072
SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float32": "F32"}


def model_config(spec: dm.DemoSize, dtype: str, seed: int) -> dict[str, Any]:
    """``config.json`` as Hugging Face writes it for Llama-3.2-3B, with the demo tokenizer's special ids."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS, "rms_norm_eps": dm.RMS_NORM_EPS,
        "rope_theta": ROPE_THETA, "rope_scaling": ROPE_SCALING, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": True, "vocab_size": VOCAB_SIZE, "torch_dtype": dtype,
        "bos_token_id": dtok.BOS_TOKEN_ID, "eos_token_id": dtok.EOS_TOKEN_ID,
        "mlx_fleet_random_weights": {"shape_of": "meta-llama/Llama-3.2-3B", "size": spec.name, "seed": seed},
    }


def _tensor(name: str, shape: tuple[int, ...], std: float, seed: int, tokenizer_vocab: int, dtype: str) -> np.ndarray:
    values = dm._make_tensor(name, shape, std, seed)
    if name == "model.embed_tokens.weight":
        values[: len(dtok.SPECIAL_TOKENS)] = 0.0  # tied head: logit 0, far below the top one
        values[tokenizer_vocab:] = 0.0  # padding ids the tokenizer has no text for
    if dtype == "float32":
        return values
    # bfloat16 is the high half of a float32 (truncated; random values need no rounding).
    return (values.view("<u4") >> 16).astype("<u2")


def write_safetensors(path: Path, plan: list[tuple[str, tuple[int, ...], float]], seed: int, tokenizer_vocab: int,
                      dtype: str) -> None:
    """The safetensors layout (u64 header size, JSON header, data), one tensor in memory at a time."""
    item = 2 if dtype == "bfloat16" else 4
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, shape, _ in plan:
        nbytes = item * int(np.prod(shape))
        header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, shape, std in plan:
            f.write(_tensor(name, shape, std, seed, tokenizer_vocab, dtype).tobytes())


def write_llama3b_model(path: Path, *, spec: dm.DemoSize = LLAMA_3_2_3B, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Write the folder at ``path`` (built beside it, then renamed into place); returns ``path``."""
    if dtype not in SAFETENSORS_DTYPE:
        raise ValueError(f"dtype must be one of {sorted(SAFETENSORS_DTYPE)}, got {dtype!r}")
    def build(staged: Path) -> None:
        tokenizer = dtok.train_demo_tokenizer()
        for name, data in dtok.tokenizer_files(tokenizer).items():
            (staged / name).write_bytes(data)
        (staged / "config.json").write_bytes(dm._json_bytes(model_config(spec, dtype, seed)))
        (staged / "generation_config.json").write_bytes(dm._json_bytes(
            {"bos_token_id": dtok.BOS_TOKEN_ID, "eos_token_id": dtok.EOS_TOKEN_ID, "do_sample": False}))
        plan = [t for t in dm._tensor_plan(spec, VOCAB_SIZE) if t[0] != "lm_head.weight"]  # tied
        write_safetensors(staged / "model.safetensors", plan, seed, tokenizer.get_vocab_size(), dtype)

    return build_into(Path(path), build)


def main(argv: list[str] | None = None) -> int:
    """Write the folder unless one with the same config is there; print its path."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(SAFETENSORS_DTYPE))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="same config keys at a tiny size (CPU smoke test)")
    args = ap.parse_args(argv)
    spec = TINY if args.tiny else LLAMA_3_2_3B
    config = args.path / "config.json"
    if config.is_file() and json.loads(config.read_text()) == model_config(spec, args.dtype, args.seed):
        print(args.path)
        return 0
    t0 = time.monotonic()
    write_llama3b_model(args.path, spec=spec, dtype=args.dtype, seed=args.seed)
    size_gb = (args.path / "model.safetensors").stat().st_size / 1e9
    print(f"wrote {args.path} ({size_gb:.2f} GB) in {time.monotonic() - t0:.0f} s", flush=True)
    print(args.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
