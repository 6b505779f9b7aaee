"""What served output is compared with: mlx-lm's own generation, run in the test process.

The test process loads the same BLAS as the workers (tests/conftest.py), so a greedy
reference here matches a served greedy generation token for token.
"""

from __future__ import annotations

from typing import Any


def greedy_reference(model: Any, tokenizer: Any, prompt: Any, max_tokens: int) -> tuple[list[int], str]:
    """In-process ``mlx_lm.stream_generate``, greedy: the token ids (EOS left out) and text."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    ids, text = [], []
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)):
        text.append(r.text)
        if r.finish_reason == "stop":
            break
        ids.append(r.token)
    return ids, "".join(text)
