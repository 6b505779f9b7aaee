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


def batch_generator_tokens(model: Any, prompts: list[list[int]], max_tokens: int, stop_tokens: list[list[int]],
                           **settings: Any) -> list[list[int]]:
    """mlx-lm's own ``BatchGenerator`` (its default greedy sampler, ``settings`` as its keyword arguments) run
    until every prompt finishes: each prompt's tokens, the last one included. It runs with whichever attention
    function the model's module holds now (see :func:`mlx_lm_attention`)."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, stop_tokens=stop_tokens, **settings)
    uids = gen.insert(prompts, max_tokens=[max_tokens] * len(prompts))
    tokens: dict[int, list[int]] = {u: [] for u in uids}
    running = set(uids)
    for _ in range(len(prompts) * (max_tokens + 8) + 100):  # a call prefills a chunk or decodes one token each
        for r in gen.next()[1]:
            tokens[r.uid].append(r.token)
            if r.finish_reason is not None:
                running.discard(r.uid)
        if not running:
            break
    gen.close()
    assert not running, "mlx-lm's BatchGenerator did not finish"
    return [tokens[u] for u in uids]


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
