"""Tests for workers.blas: choosing and preloading an optimized BLAS for MLX on CPU.

Most tests are pure (no loading, no MLX). The equivalence test runs MLX only in child
processes, since preloading must happen before ``mlx.core`` is imported.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers import blas

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 120

# Runs in a fresh interpreter: preload per argv[1], then a small float32 MLX computation.
_CHILD_CODE = """
import json, sys
sys.path.insert(0, sys.argv[2])
from workers.blas import describe_blas, find_blas, preload_blas
preload_blas(find_blas(sys.argv[1]))
import mlx.core as mx
mx.random.seed(1234)
x, w1, w2 = (mx.random.normal((64, 64)) for _ in range(3))
hidden = mx.tanh(mx.matmul(x, w1) / 8.0)
logits = mx.matmul(mx.matmul(hidden, w2), w1.T) / 8.0
probs = mx.softmax(logits, axis=-1)
mx.eval(logits, probs)
print(json.dumps({"blas": describe_blas(), "logits": logits.tolist(), "probs": probs.tolist()}))
"""


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Isolate module state and BLAS env vars; tests must not depend on the caller's shell."""
    monkeypatch.setattr(blas, "_loaded", None)
    for var in ("MLX_FLEET_BLAS", "MLX_FLEET_BLAS_DIR", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "MKL_THREADING_LAYER"):
        monkeypatch.delenv(var, raising=False)


def _fake_tree(root: Path, soname: str = "libopenblas.so.0") -> Path:
    """Lay out a dpkg -x style tree with an (unloadable) OpenBLAS and libgfortran."""
    lib_dir = root / "usr" / "lib" / blas._multiarch()
    (lib_dir / "openblas-pthread").mkdir(parents=True)
    (lib_dir / "libgfortran.so.5").write_bytes(b"not an ELF")
    lib = lib_dir / "openblas-pthread" / soname
    lib.write_bytes(b"not an ELF")
    return lib


def test_explicit_bad_path_falls_back_to_reference() -> None:
    choice = blas.find_blas("/nonexistent/libopenblas.so.0")
    assert choice.name == "reference"
    assert choice.path is None
    assert choice.source == "fallback"
    assert "not a file" in choice.note


def test_reference_loads_nothing() -> None:
    choice = blas.find_blas("reference")
    assert (choice.name, choice.path) == ("reference", None)
    handles_before = len(blas._handles)
    assert blas.preload_blas(choice) == choice
    assert len(blas._handles) == handles_before
    assert blas.blas_env(choice) == {}
    assert blas.describe_blas()["name"] == "reference"


def test_unloadable_library_falls_back_without_raising(tmp_path: Path) -> None:
    junk = tmp_path / "libjunk.so"
    junk.write_bytes(b"definitely not an ELF file")
    choice = blas.find_blas(str(junk))
    assert choice.name == "custom"
    loaded = blas.preload_blas(choice)
    assert (loaded.name, loaded.path, loaded.source) == ("reference", None, "fallback")


def test_named_setting_not_found_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(blas, "_mkl_candidates", lambda: [tmp_path / "missing.so"])
    choice = blas.find_blas("MKL", source="env")
    assert (choice.name, choice.source) == ("reference", "fallback")


def test_auto_uses_blas_dir_env_tree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lib = _fake_tree(tmp_path)
    monkeypatch.setenv("MLX_FLEET_BLAS_DIR", str(tmp_path))
    choice = blas.find_blas("auto")
    assert choice == blas.BlasChoice("openblas", str(lib), "auto")
    # The env form preloads the bundled libgfortran before OpenBLAS itself.
    env = blas.blas_env(choice, threads=3, base={"LD_PRELOAD": "/other.so"})
    assert env["LD_PRELOAD"].split(":") == [str(lib.parent.parent / "libgfortran.so.5"), str(lib), "/other.so"]
    assert env["OPENBLAS_NUM_THREADS"] == "3"
    assert env["MLX_FLEET_BLAS"] == str(lib)


def test_thread_count_env_wins_over_argument() -> None:
    choice = blas.BlasChoice("openblas", "/x/libopenblas.so.0", "config")
    env = blas.blas_env(choice, threads=8, base={"OPENBLAS_NUM_THREADS": "2"})
    assert env["OPENBLAS_NUM_THREADS"] == "2"


def test_mkl_defaults_to_sequential_threading() -> None:
    choice = blas.BlasChoice("mkl", "/x/libmkl_rt.so.2", "auto")
    assert blas.blas_env(choice, base={})["MKL_THREADING_LAYER"] == "SEQUENTIAL"
    assert blas.blas_env(choice, base={"MKL_THREADING_LAYER": "GNU"})["MKL_THREADING_LAYER"] == "GNU"


def test_non_linux_loads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    choice = blas.find_blas("openblas")
    assert (choice.name, choice.path, choice.source) == ("reference", None, "platform")


def test_setting_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert blas.setting_from_env() is None
    monkeypatch.setenv("MLX_FLEET_BLAS", "  openblas ")
    assert blas.setting_from_env() == "openblas"


def test_auto_finds_fetched_copy() -> None:
    fetched = REPO_ROOT / ".cache" / "blas" / "usr" / "lib" / blas._multiarch() / "openblas-pthread" / "libopenblas.so.0"
    if not fetched.is_file():
        pytest.skip(f"no fetched OpenBLAS at {fetched} (run scripts/fetch-openblas.sh)")
    choice = blas.find_blas("auto")
    assert (choice.name, choice.path, choice.source) == ("openblas", str(fetched), "auto")


def _run_child(setting: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.setdefault("OPENBLAS_NUM_THREADS", "2")  # keep the child light on shared CI runners
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD_CODE, setting, str(REPO_ROOT)],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _flat(rows: object) -> list[float]:
    assert isinstance(rows, list)
    return [float(v) for row in rows for v in row]


def test_optimized_blas_matches_reference() -> None:
    choice = blas.find_blas("auto")
    if choice.path is None:
        pytest.skip("no optimized BLAS found (run scripts/fetch-openblas.sh or pip install mkl)")
    reference = _run_child("reference")
    optimized = _run_child(choice.path)
    ref_info, opt_info = reference["blas"], optimized["blas"]
    assert isinstance(ref_info, dict) and isinstance(opt_info, dict)
    assert ref_info["name"] == "reference"
    assert opt_info["name"] == choice.name
    # Proof that the optimized library is really in the child, not just chosen.
    marker = "libmkl_rt" if choice.name == "mkl" else "libopenblas"
    assert any(marker in path for path in opt_info["mapped"]), opt_info
    for key in ("logits", "probs"):
        got, want = _flat(optimized[key]), _flat(reference[key])
        assert len(got) == len(want) == 64 * 64
        # Why the absolute term: BLAS libraries sum in different orders, so outputs near
        # zero (from cancellation) differ by float32 rounding of the tensor's magnitude.
        abs_tol = 1e-5 * max(abs(w) for w in want)
        bad = [(g, w) for g, w in zip(got, want) if not math.isclose(g, w, rel_tol=1e-4, abs_tol=abs_tol)]
        assert not bad, f"{key}: {len(bad)} values differ, e.g. {bad[:3]}"


def test_the_local_workers_split_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every local replica of every model counts: each worker's BLAS gets its part of the cores, as status shows."""
    from mlx_fleet.client import Client
    from tests.integration.fleets import running_fleet

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with running_fleet(models=(("pair", "demo", 2), ("solo", "demo", 1))) as fleet:
        with Client(fleet.cfg.frontend, timeout_s=30) as client:
            models = client.status()["models"]
    # The fleet runs 3 local workers: each gets cores // 3, at least 1.
    split = [w["info"]["blas"]["threads"] for m in ("pair", "solo") for w in models[m]["workers"]]
    if models["pair"]["workers"][0]["info"]["blas"]["name"] == "reference":
        pytest.skip("no optimized BLAS here: the reference BLAS has no threads to split")
    assert split == [blas.share_threads(3)] * 3 == [max(1, blas.usable_cpus() // 3)] * 3
