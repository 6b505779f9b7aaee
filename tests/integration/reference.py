"""What served output is compared with: mlx-lm's own generation, run in the test process.

The test process loads the same BLAS as the workers (tests/conftest.py), so a greedy
reference here matches a served greedy generation token for token. It runs with mlx-lm's own
attention function even after a ``make_engine`` in this process has put the worker's grouped
decode attention in its place (workers/engine/attention.py).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

MODELS_PACKAGE = "mlx_lm.models."


def restore_mlx_lm_attention() -> list[tuple[Any, Any]]:
    """Put mlx-lm's own attention function back in every model module that has the grouped one; the
    (module, grouped function) pairs undone. Nothing to do when the grouped one was never imported."""
    if "workers.engine.attention" not in sys.modules:
        return []
    from workers.engine.attention import ATTENTION_NAME, GroupedDecodeAttention

    undone = []
    for name, module in list(sys.modules.items()):
        grouped = getattr(module, ATTENTION_NAME, None) if name.startswith(MODELS_PACKAGE) else None
        if isinstance(grouped, GroupedDecodeAttention):
            setattr(module, ATTENTION_NAME, grouped.original)
            undone.append((module, grouped))
    return undone


@contextlib.contextmanager
def mlx_lm_attention() -> Iterator[None]:
    """mlx-lm's own attention function in every model module while the block runs, as it was after."""
    undone = restore_mlx_lm_attention()
    try:
        yield
    finally:
        from workers.engine.attention import ATTENTION_NAME

        for module, grouped in undone:
            setattr(module, ATTENTION_NAME, grouped)


def greedy_reference(model: Any, tokenizer: Any, prompt: Any, max_tokens: int) -> tuple[list[int], str]:
    """In-process ``mlx_lm.stream_generate``, greedy: the token ids (EOS left out) and text."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    ids, text = [], []
    with mlx_lm_attention():
        for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)):
            text.append(r.text)
            if r.finish_reason == "stop":
                break
            ids.append(r.token)
    return ids, "".join(text)
