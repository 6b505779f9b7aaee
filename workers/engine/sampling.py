"""Per-request samplers for the engine: mlx-lm's, shared where that changes nothing.

``BatchGenerator`` samples the whole batch in one call only when every sequence's sampler
is the same object; otherwise it samples row by row and concatenates, one extra set of
ops per sequence and step. :class:`SamplerPool` therefore hands every unseeded request
with the same temperature, top-p and top-k the same sampler object. Such a sampler keeps
no state of its own (it draws from MLX's global generator), so sharing it changes nothing
but the number of ops. Greedy requests already share mlx-lm's ``greedy_sampler``.

A request with a seed gets a private :class:`SeededSampler`: its own key, split once per
token, so its output is reproducible whatever else is in the batch.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_k, apply_top_p, make_sampler

Sampler = Callable[[mx.array], mx.array]
MAX_SHARED = 64  # distinct unseeded settings kept; beyond that the pool starts over


def make_request_sampler(temperature: float, top_p: float, top_k: int, seed: int | None) -> Sampler:
    """mlx-lm's sampler; with a seed (and a temperature), the same filters drawing from a private key."""
    if temperature == 0.0 or seed is None:
        return make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0, top_k=top_k)
    return SeededSampler(temperature, top_p, top_k, seed)


class SeededSampler:
    """mlx-lm's top-p/top-k filters, then a draw from a private key split once per call.

    ``rewind`` undoes the last split: the solo handoff drops one drawn-but-unseen token.
    """

    def __init__(self, temperature: float, top_p: float, top_k: int, seed: int) -> None:
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.key = mx.random.key(seed)
        self.previous_key = self.key

    def __call__(self, logprobs: mx.array) -> mx.array:
        if 0.0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        self.previous_key = self.key
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1.0 / self.temperature), key=sub)

    def rewind(self) -> None:
        """Draw the last call's token again on the next call."""
        self.key = self.previous_key


class SamplerPool:
    """One sampler object per unseeded setting; a fresh private one per seeded request."""

    def __init__(self, max_shared: int = MAX_SHARED) -> None:
        self.max_shared = max_shared
        self._shared: dict[tuple[float, float, int], Sampler] = {}

    def get(self, temperature: float, top_p: float, top_k: int, seed: int | None) -> Sampler:
        """The sampler for one request (``top_k`` already checked against the vocabulary)."""
        if temperature != 0.0 and seed is not None:
            return make_request_sampler(temperature, top_p, top_k, seed)
        key = (0.0, 1.0, 0) if temperature == 0.0 else (float(temperature), float(top_p), int(top_k))
        sampler = self._shared.get(key)
        if sampler is None:
            if len(self._shared) >= self.max_shared:
                self._shared.clear()  # sequences keep theirs; only later requests stop sharing with them
            sampler = self._shared[key] = make_request_sampler(temperature, top_p, top_k, None)
        return sampler
