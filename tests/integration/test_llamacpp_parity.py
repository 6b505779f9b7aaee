"""Greedy parity with llama.cpp on the built-in models' real GGUF files.

The expected tokens were made once with llama.cpp itself (tests/fixtures/llamacpp/README.md
says how) and are kept as fixtures, so this needs no llama.cpp. For each of 5 prompts:
the prompt's token ids must equal llama.cpp's, and the 16 greedy tokens must too, or
differ first where the two tokens' logits are within :data:`TIE_LOGITS` of each other
in both runs (a near-tie that the precision decides: the fleet computes in float32
from the dequantized weights, llama.cpp on the quantized ones with 8-bit activations).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from workers.models.builtin import BuiltinModel, FetchError, builtin_gguf
from workers.models.builtins import GEMMA3, SMOLLM2

pytestmark = [pytest.mark.integration, pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(1200)]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "llamacpp"
TIE_LOGITS = 0.5  # a first difference between tokens whose logits differ by less is explained by precision
LOGIT_TOL = 1.5  # the chosen tokens' logits: fleet against llama.cpp, up to the first difference


def _file(model: BuiltinModel) -> Path:
    try:
        return builtin_gguf(model, progress=print)
    except FetchError as exc:
        if os.environ.get("MLX_FLEET_REQUIRE_REAL_MODEL"):
            pytest.fail(f"MLX_FLEET_REQUIRE_REAL_MODEL is set and {model.name} is unavailable: {exc}")
        pytest.skip(f"{model.name} is unavailable here: {exc}")


def _next_logits(model: Any, ids: list[int]) -> np.ndarray:
    """Row ``i``: the logits after ``ids[:i + 1]``, from one forward pass over all of ``ids``."""
    import mlx.core as mx

    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def _greedy(model: Any, ids: list[int], n: int, eos: set[int]) -> list[int]:
    """Greedy tokens through mlx-lm's own generation loop (argmax sampler), up to and with an end token."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out: list[int] = []
    for token, _ in generate_step(mx.array(ids), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1)):
        out.append(int(token))
        if int(token) in eos:
            break
    return out


@pytest.mark.parametrize("builtin", [GEMMA3, SMOLLM2], ids=lambda m: m.name)
def test_greedy_tokens_equal_llama_cpp(builtin: BuiltinModel) -> None:
    from mlx_lm import load

    from workers.models.sources import resolve_source

    expected = json.loads((FIXTURES / f"{builtin.gguf_file.removesuffix('.gguf')}.llamacpp.json").read_text())
    assert expected["sha256"] == builtin.sha256
    _file(builtin)
    model, tokenizer = load(str(resolve_source(builtin.name, "float32")))
    eos = set(tokenizer.eos_token_ids)
    report = []
    for case in expected["cases"]:
        ids = tokenizer.encode(case["prompt"])
        assert ids == case["prompt_token_ids"], case["prompt"]
        want = case["generated_token_ids"]
        got = _greedy(model, ids, len(want), eos)
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        end = len(want) if first is None else first
        rows = _next_logits(model, ids + want[:end])  # row len(ids) - 1 + i comes before want[i]
        for i in range(end):  # the chosen tokens' logits agree where the runs agree
            ours = rows[len(ids) - 1 + i][want[i]]
            theirs = dict(map(tuple, case["steps"][i]["top"]))[want[i]]
            assert abs(ours - theirs) < LOGIT_TOL, (case["prompt"], i, ours, theirs)
        if first is None:
            assert got == want
            report.append(f"{case['prompt'][:30]!r}: 16/16")
            continue
        ours = rows[len(ids) - 1 + first]
        top = dict(map(tuple, case["steps"][first]["top"]))
        ours_gap = abs(float(ours[got[first]] - ours[want[first]]))
        theirs_gap = abs(top[want[first]] - top.get(got[first], -np.inf))
        assert ours_gap < TIE_LOGITS and theirs_gap < TIE_LOGITS, (case["prompt"], first, ours_gap, theirs_gap)
        report.append(f"{case['prompt'][:30]!r}: equal up to token {first}, then a near-tie "
                      f"({ours_gap:.3f} here, {theirs_gap:.3f} in llama.cpp)")
    print("\n".join(report))
