"""Tests for the built-in demo model (workers/models/demo_model.py, workers/models/demo_tokenizer.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.integration.reference import greedy_reference
from workers.models import demo_model as dm
from workers.models import demo_tokenizer as dtok

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_folder_has_model_files(demo_dir: Path) -> None:
    assert {p.name for p in demo_dir.iterdir()} == MODEL_FILES
    # No staging folder is left next to the model.
    assert [p.name for p in demo_dir.parent.iterdir()] == ["demo"]


def test_two_builds_are_byte_identical(demo_dir: Path, tmp_path: Path) -> None:
    again = dm.write_demo_model(tmp_path / "again", "demo")
    for name in MODEL_FILES:
        assert (again / name).read_bytes() == (demo_dir / name).read_bytes(), name


def test_tokenizer_training_is_deterministic_across_processes() -> None:
    here = hashlib.sha256(dtok.train_demo_tokenizer().to_str(pretty=True).encode()).hexdigest()
    code = (
        "import hashlib; from workers.models import demo_tokenizer as t; "
        "print(hashlib.sha256(t.train_demo_tokenizer().to_str(pretty=True).encode()).hexdigest())"
    )
    # A different hash seed and thread count must not change the merges.
    env = {**os.environ, "PYTHONHASHSEED": "12345", "RAYON_NUM_THREADS": "3",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == here


def test_tokenizer_vocab_and_round_trip() -> None:
    tok = dtok.train_demo_tokenizer()
    assert tok.get_vocab_size() == dtok.VOCAB_SIZE
    for token_id, token in enumerate(dtok.SPECIAL_TOKENS):
        assert tok.token_to_id(token) == token_id
    # Multi-byte characters from the corpus earn their own merged tokens.
    decoded = [tok.decode([i]) for i in range(len(dtok.SPECIAL_TOKENS), dtok.VOCAB_SIZE)]
    assert any(len(piece) == 1 and ord(piece) > 127 for piece in decoded)
    # Text never seen in the corpus still round-trips: every byte is in the alphabet.
    text = "Zürich costs 5 €; 日本 🙂 — Ωμέγα \t naïve 😀 x\x00y"
    ids = tok.encode(text).ids
    assert ids[0] == dtok.BOS_TOKEN_ID
    assert tok.decode(ids) == text


def test_config_matches_tokenizer(demo_dir: Path) -> None:
    config = json.loads((demo_dir / "config.json").read_text())
    tok_json = json.loads((demo_dir / "tokenizer.json").read_text())
    tok_config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    spec = dm.DEMO_SIZES["demo"]
    assert config["model_type"] == "llama"
    assert config["torch_dtype"] == "float32"
    assert config["hidden_size"] == spec.hidden_size
    assert config["num_hidden_layers"] == spec.num_layers
    assert config["vocab_size"] == len(tok_json["model"]["vocab"]) == dtok.VOCAB_SIZE
    assert config["eos_token_id"] == dtok.EOS_TOKEN_ID
    assert config["bos_token_id"] == dtok.BOS_TOKEN_ID
    assert config["mlx_fleet_demo"]["fingerprint"] == dm.demo_fingerprint("demo")
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["eos_token"] == dtok.EOS_TOKEN
    assert tok_config["bos_token"] == dtok.BOS_TOKEN
    assert tok_config["chat_template"] == dtok.CHAT_TEMPLATE


def test_loads_with_mlx_lm_and_greedy_is_reproducible(demo_loaded: tuple[Any, Any]) -> None:
    model, tokenizer = demo_loaded
    assert tokenizer.eos_token_ids == {dtok.EOS_TOKEN_ID}
    assert tokenizer.bos_token == dtok.BOS_TOKEN
    first = greedy_reference(model, tokenizer, "The weather today", 10)[0]
    second = greedy_reference(model, tokenizer, "The weather today", 10)[0]
    assert first == second
    # Special tokens have zero lm_head rows: greedy runs to max_tokens, never EOS.
    assert len(first) == 10
    assert all(t >= len(dtok.SPECIAL_TOKENS) for t in first)
    assert len(set(first)) >= 5  # not collapsed onto one repeated token


def test_generate_returns_text(demo_loaded: tuple[Any, Any]) -> None:
    import mlx_lm

    model, tokenizer = demo_loaded
    text = mlx_lm.generate(model, tokenizer, "Bread", max_tokens=8)
    assert isinstance(text, str) and text


def test_chat_template(demo_loaded: tuple[Any, Any]) -> None:
    _, tokenizer = demo_loaded
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, café?"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nHello, café?<|eos|>\n<|assistant|>\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == dtok.BOS_TOKEN_ID
    assert ids.count(dtok.BOS_TOKEN_ID) == 1  # the template's BOS is not doubled
    assert ids[-2] == dtok.SPECIAL_TOKENS.index(dtok.ASSISTANT_TOKEN)
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not no_prompt.endswith("<|assistant|>\n")
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_unknown_size_names_valid_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="demo, demo-small"):
        dm.write_demo_model(tmp_path / "x", "huge")
    with pytest.raises(ValueError, match="demo, demo-small"):
        dm.ensure_demo_model("huge", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="demo, demo-small"):
        dm.resolve_demo_source("builtin:huge", cache_dir=tmp_path)
    assert not (tmp_path / "x").exists()


def test_write_replaces_existing_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    dm.write_demo_model(target, "demo")
    assert {p.name for p in target.iterdir()} == MODEL_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_ensure_builds_once_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = dm.ensure_demo_model("demo", cache_dir=tmp_path)
    assert path.parent == tmp_path / "models"
    assert path.name == f"demo-{dm.demo_fingerprint('demo')}"
    mtime_ns = (path / "model.safetensors").stat().st_mtime_ns

    def fail_build(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("cached model was rebuilt")

    monkeypatch.setattr(dm, "write_demo_model", fail_build)
    assert dm.ensure_demo_model("demo", cache_dir=tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime_ns


def test_ensure_concurrent_callers_build_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = dm._write_contents
    builds: list[Path] = []

    def counting_write(folder: Path, spec: dm.DemoSize, seed: int) -> None:
        builds.append(folder)
        real_write(folder, spec, seed)

    monkeypatch.setattr(dm, "_write_contents", counting_write)
    # flock locks belong to open file descriptions, so threads contend like processes.
    results: list[Path] = []
    def call() -> None:
        results.append(dm.ensure_demo_model(cache_dir=tmp_path))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 4 and len(set(results)) == 1
    assert len(builds) == 1
    assert {p.name for p in results[0].iterdir()} == MODEL_FILES
    assert not list((tmp_path / "models").glob(".*.tmp-*"))


def test_ensure_clears_stale_staging_dirs(tmp_path: Path) -> None:
    target_name = f"demo-{dm.demo_fingerprint('demo')}"
    stale = tmp_path / "models" / f".{target_name}.tmp-999999-dead"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{")
    dm.ensure_demo_model("demo", cache_dir=tmp_path)
    assert not stale.exists()


def test_fingerprint_depends_on_size_and_seed() -> None:
    prints = {dm.demo_fingerprint("demo"), dm.demo_fingerprint("demo", seed=1),
              dm.demo_fingerprint("demo-small")}
    assert len(prints) == 3
    assert dm.demo_fingerprint("demo") == dm.demo_fingerprint("demo")


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_FLEET_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.demo_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("MLX_FLEET_CACHE")
    assert dm.demo_cache_dir() == tmp_path / "xdg" / "mlx-fleet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dm.demo_cache_dir() == tmp_path / "home" / ".cache" / "mlx-fleet"


def test_demo_sources(tmp_path: Path) -> None:
    for source in ("demo", "demo-small", "builtin:demo", "builtin:demo-small"):
        assert dm.is_demo_source(source)
    for source in ("mlx-community/Llama-3.2-1B-Instruct-4bit", "./demo", "/models/demo", "Demo"):
        assert not dm.is_demo_source(source)
        assert dm.resolve_demo_source(source, cache_dir=tmp_path) is None
    path = dm.resolve_demo_source("builtin:demo", cache_dir=tmp_path)
    assert path == dm.ensure_demo_model("demo", cache_dir=tmp_path)
    assert dm.resolve_demo_source("demo", cache_dir=tmp_path) == path


@pytest.mark.slow
def test_demo_small_loads_and_generates(tmp_path: Path) -> None:
    mlx_lm = pytest.importorskip("mlx_lm")
    path = dm.write_demo_model(tmp_path / "small", "demo-small")
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (512, 8)
    model, tokenizer = mlx_lm.load(str(path))
    tokens = greedy_reference(model, tokenizer, "Hello", 10)[0]
    assert len(tokens) == 10 and len(set(tokens)) >= 5
    assert tokens == greedy_reference(model, tokenizer, "Hello", 10)[0]
