"""GGUF conversion (workers/models/gguf.py) on small files the tests write, from the demo model.

The demo model written as llama.cpp's converter would write it (Q and K permuted to its
rotary layout, the tokenizer as tokens and merges) must convert back into a model with
the demo's own logits and token ids. Bad files must be refused with errors that name
what is wrong, and leave nothing in the cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.ggufutil import demo_as_gguf, permute_rows, sentencepiece_metadata, write_gguf
from workers.models.store import file_sha256
from workers.models.gguf import convert_gguf, converted_folder, ensure_converted
from workers.models.gguf_file import GGUFError, read_gguf
from workers.models.sources import check_source, resolve_source

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TEXTS = ["Once upon a time there was a little fox.", "3 + 4 = 7, and café ünïcode ☕ 日本"]


def convert(src: Path, out: Path, precision: str) -> Path:
    out.mkdir()
    convert_gguf(src, out, precision)
    return out


def logits(model: Any, ids: list[int]) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([ids])).astype(mx.float32))


def test_float32_conversion_has_the_original_logits_and_tokens(
        tmp_path: Path, demo_dir: Path, demo_loaded: tuple[Any, Any]) -> None:
    from mlx_lm import load

    gguf = demo_as_gguf(tmp_path / "demo.gguf", demo_dir)
    model, tokenizer = load(str(convert(gguf, tmp_path / "out", "float32")))
    demo_model, demo_tokenizer = demo_loaded
    for text in TEXTS:
        assert tokenizer.encode(text) == demo_tokenizer.encode(text)
    messages = [{"role": "user", "content": "Hello"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == \
        demo_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = demo_tokenizer.encode(TEXTS[0])
    np.testing.assert_allclose(logits(model, ids), logits(demo_model, ids), atol=1e-4, rtol=1e-4)


def test_qk_permutation_undone_or_traditional_rope(tmp_path: Path, demo_dir: Path, demo_loaded: tuple[Any, Any]) -> None:
    """Which fix of llama.cpp's Q/K layout is right, shown on the logits.

    Un-permuting the rows matches the original; so does keeping llama.cpp's rows with
    ``rope_traditional``. Keeping its rows with mlx-lm's default rotation does not.
    """
    import mlx.core as mx
    from mlx_lm import load

    demo_model, demo_tokenizer = demo_loaded
    ids = demo_tokenizer.encode(TEXTS[0])
    want = logits(demo_model, ids)
    folder = convert(demo_as_gguf(tmp_path / "demo.gguf", demo_dir), tmp_path / "out", "float32")
    cfg = json.loads((folder / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    gguf_rows = []  # the Q/K weights back in llama.cpp's order
    for name, w in mx.load(str(folder / "model.safetensors")).items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            gguf_rows.append((name, mx.array(permute_rows(np.array(w), heads if "q_proj" in name else kv_heads))))
    for traditional, matches in ((False, False), (True, True)):
        model, _ = load(str(folder), model_config={"rope_traditional": traditional})
        model.load_weights(gguf_rows, strict=False)
        assert np.allclose(logits(model, ids), want, atol=1e-4, rtol=1e-4) == matches, traditional


def test_a_file_without_the_permutation_converts_wrong(tmp_path: Path, demo_dir: Path,
                                                       demo_loaded: tuple[Any, Any]) -> None:
    """The logits comparison above can fail: a GGUF whose Q/K were never permuted gives other logits."""
    from mlx_lm import load

    demo_model, demo_tokenizer = demo_loaded
    ids = demo_tokenizer.encode(TEXTS[0])
    gguf = demo_as_gguf(tmp_path / "hf-layout.gguf", demo_dir, permute=False)
    model, _ = load(str(convert(gguf, tmp_path / "out", "float32")))
    assert not np.allclose(logits(model, ids), logits(demo_model, ids), atol=1e-2)


@pytest.mark.parametrize("types, bits", [
    ({"*": "Q8_0"}, {"embed_tokens": 8, "q_proj": 8, "lm_head": 8}),
    ({"*": "Q4_0", "token_embd.weight": "Q8_0"}, {"embed_tokens": 8, "q_proj": 4, "lm_head": 4}),
    ({"*": "Q4_1", "output.weight": "Q8_0"}, {"embed_tokens": 4, "q_proj": 4, "lm_head": 8}),
])
def test_quantized_keeps_per_tensor_bits_and_matches_dequantized(
        tmp_path: Path, demo_dir: Path, demo_loaded: tuple[Any, Any], types: dict[str, str], bits: dict[str, int]) -> None:
    from mlx_lm import load

    from workers.models.precision import describe_precision

    gguf = demo_as_gguf(tmp_path / "q.gguf", demo_dir, types=types)
    quantized, _ = load(str(convert(gguf, tmp_path / "quantized", "quantized")))
    dense, _ = load(str(convert(gguf, tmp_path / "float32", "float32")))
    layers = dict(quantized.named_modules())
    got = {"embed_tokens": layers["model.embed_tokens"].bits, "q_proj": layers["model.layers.0.self_attn.q_proj"].bits,
           "lm_head": layers["lm_head"].bits}
    assert got == bits
    assert describe_precision(quantized) == "quantized " + "/".join(str(b) for b in sorted(set(bits.values()))) + "-bit"
    assert describe_precision(dense) == "float32"
    ids = demo_loaded[1].encode(TEXTS[0])
    q, d = logits(quantized, ids), logits(dense, ids)
    # Same dequantized values; only the float16 scales and the order of sums differ.
    assert np.abs(q - d).max() < 0.05 * np.abs(d).max()
    assert (q.argmax(-1) == d.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_half_precisions(tmp_path: Path, demo_dir: Path, precision: str) -> None:
    from mlx_lm import load

    from workers.models.precision import describe_precision

    gguf = demo_as_gguf(tmp_path / "q.gguf", demo_dir, types={"*": "Q8_0"})
    model, _ = load(str(convert(gguf, tmp_path / "out", precision)))
    assert describe_precision(model) == precision
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == precision


def test_sentencepiece_tokenizer_encodes_as_sentencepiece(tmp_path: Path, demo_dir: Path) -> None:
    """A Llama-2-style GGUF (SentencePiece BPE: pieces and scores, no merges) converts to a
    tokenizer that gives SentencePiece's own ids, byte fallback and all."""
    from mlx_lm import load

    meta, sp = sentencepiece_metadata(vocab_size=2048)  # the demo model's vocabulary size
    folder = convert(demo_as_gguf(tmp_path / "spm.gguf", demo_dir, tokenizer=meta), tmp_path / "out", "float32")
    _, tokenizer = load(str(folder))
    texts = [*TEXTS, "  two  spaces\nnew line", " leading space", "x", "emoji 🙂🚀 and 中文", "The year 2024 has 366 days."]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == [1, *sp.encode(text)], text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        # What a worker streams with: mlx-lm's SentencePiece detokenizer, which drops an
        # answer's leading whitespace (its own rule, for any SentencePiece model).
        detok = tokenizer.detokenizer
        detok.reset()
        for token in ids[1:]:
            detok.add_token(token)
        detok.finalize()
        assert detok.text == text.lstrip(), text


# ---- refusals -----------------------------------------------------------------------------


def _truncated(tmp_path: Path, demo_dir: Path) -> Path:
    path = demo_as_gguf(tmp_path / "t.gguf", demo_dir)
    os.truncate(path, path.stat().st_size // 2)
    return path


def _q8_1(tmp_path: Path, demo_dir: Path) -> Path:
    return demo_as_gguf(tmp_path / "q81.gguf", demo_dir, types={"blk.1.ffn_down.weight": "Q8_1"})


def _unknown_type(tmp_path: Path, demo_dir: Path) -> Path:
    return demo_as_gguf(tmp_path / "t99.gguf", demo_dir, types={"blk.0.attn_v.weight": "type 99"})


def _falcon(tmp_path: Path, demo_dir: Path) -> Path:
    return demo_as_gguf(tmp_path / "falcon.gguf", demo_dir, architecture="falcon")


def _qwen_without_biases(tmp_path: Path, demo_dir: Path) -> Path:
    return demo_as_gguf(tmp_path / "qwen.gguf", demo_dir, architecture="qwen2")


def _not_gguf(tmp_path: Path, demo_dir: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    return path


def _bad_pre(tmp_path: Path, demo_dir: Path) -> Path:
    return demo_as_gguf(tmp_path / "pre.gguf", demo_dir, tokenizer={"tokenizer.ggml.pre": "deepseek-coder"})


def _unigram(tmp_path: Path, demo_dir: Path) -> Path:
    return demo_as_gguf(tmp_path / "t5.gguf", demo_dir, tokenizer={"tokenizer.ggml.model": "t5"})


def _extra_tensor(tmp_path: Path, demo_dir: Path) -> Path:
    path = demo_as_gguf(tmp_path / "x.gguf", demo_dir)
    header = read_gguf(path)
    tensors = [(t.name, np.zeros(t.dims[::-1], np.float32), "F32") for t in header.tensors]
    return write_gguf(tmp_path / "x2.gguf", header.metadata, tensors + [("blk.0.ffn_gate_inp.weight", np.ones((4, 64), np.float32), "F32")])


REFUSALS = [
    (_truncated, r"truncated or corrupt GGUF: .*runs past the end of the file|truncated or corrupt GGUF: tensor"),
    (_q8_1, r"tensor 'blk\.1\.ffn_down\.weight' has type Q8_1, which the gguf package cannot dequantize"),
    (_unknown_type, r"tensor 'blk\.0\.attn_v\.weight' has type id 99, which the gguf package does not know"),
    (_falcon, r"architecture 'falcon' is not supported \(supported: llama, qwen2, qwen3, gemma3, phi3\)"),
    (_qwen_without_biases, r"tensor 'blk\.0\.attn_q\.bias' \(mlx-lm's model\.layers\.0\.self_attn\.q_proj\.bias\) is missing"),
    (_not_gguf, r"not a GGUF file"),
    (_bad_pre, r"tokenizer pre-split 'deepseek-coder' is not supported"),
    (_unigram, r"tokenizer model 't5' is not supported"),
    (_extra_tensor, r"tensor 'blk\.0\.ffn_gate_inp\.weight' \(F32\) has no counterpart in mlx-lm's llama model"),
]


@pytest.mark.parametrize("make, message", REFUSALS, ids=[m.__name__.strip("_") for m, _ in REFUSALS])
def test_bad_files_are_refused_and_leave_no_folder(tmp_path: Path, demo_dir: Path, make: Any, message: str) -> None:
    path = make(tmp_path, demo_dir)
    cache = tmp_path / "cache"
    with pytest.raises(GGUFError, match=message) as err:
        ensure_converted(path, "float32", root=cache, progress=lambda _text: None)
    assert str(path) in str(err.value)
    gguf_dir = cache / "gguf"
    assert not gguf_dir.exists() or [p for p in gguf_dir.iterdir() if not p.name.endswith(".lock")] == []


def test_check_source_refuses_without_converting(tmp_path: Path, demo_dir: Path) -> None:
    with pytest.raises(GGUFError, match="Q8_1"):
        check_source(str(_q8_1(tmp_path, demo_dir)))
    with pytest.raises(GGUFError, match="pre-split 'deepseek-coder'"):
        check_source(str(_bad_pre(tmp_path, demo_dir)))
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        check_source(str(tmp_path / "missing.gguf"))
    check_source(str(demo_as_gguf(tmp_path / "ok.gguf", demo_dir)))


# ---- the cache ----------------------------------------------------------------------------


def test_converted_once_keyed_by_content(tmp_path: Path, demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_FLEET_CACHE", str(tmp_path / "cache"))
    gguf = demo_as_gguf(tmp_path / "a.gguf", demo_dir)
    first = resolve_source(str(gguf), "float32")
    assert isinstance(first, Path) and first.parent == tmp_path / "cache" / "gguf"
    assert first.name.endswith("-float32-v2")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(gguf.read_bytes())
    assert resolve_source(str(copy), "float32") == first  # same content: same folder, not rebuilt
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    other = resolve_source(str(demo_as_gguf(tmp_path / "b.gguf", demo_dir, types={"*": "Q8_0"})), "float32")
    assert other != first
    quantized = resolve_source(str(gguf), "quantized")
    assert quantized == converted_folder(file_sha256(gguf), "quantized", tmp_path / "cache")
    assert not list((tmp_path / "cache" / "gguf").glob(".*.tmp-*"))
