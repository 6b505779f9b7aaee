"""The seam between the worker and its engine: the interface and its records, no MLX.

:class:`EngineLike` is what the worker asks of an engine. :class:`workers.engine.adapter.Engine`
(one process) and :class:`workers.shard.engine.ShardedEngine` (rank 0 of a sharded group) both
implement it explicitly; the worker's session (:mod:`workers.session`) and telemetry read an
engine only through it, so they can be tested with a fake engine and a type checker sees the seam.
An engine takes :class:`EngineRequest` and returns :class:`StepEvent`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from workers.engine.prompt_cache import PromptCacheStats
from workers.engine.stats import StepStats


@dataclass
class EngineRequest:
    """One sequence to generate. ``key`` is unique among live requests."""

    key: str
    prompt_tokens: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    cache: bool = True  # use and feed the prompt cache


@dataclass
class StepEvent:
    """What one step produced for one request. ``text`` may be empty (held back)."""

    key: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    first_token: bool = False
    completion_tokens: int = 0  # set on the final event; EOS included
    cached_tokens: int = 0  # prompt tokens reused from the prompt cache; set on the final event
    path: str = ""  # solo | batch | handoff; set on the final event


class EngineLike(Protocol):
    """What the worker needs of an engine: continuous batching, one step at a time, on one thread."""

    @property
    def active(self) -> int:
        """Sequences inserted and not finished."""
        ...

    @property
    def free_slots(self) -> int:
        """How many more sequences fit."""
        ...

    @property
    def stats(self) -> StepStats:
        """Step and path figures (cumulative)."""
        ...

    @property
    def cache_stats(self) -> PromptCacheStats:
        """Prompt-cache figures (cumulative)."""
        ...

    def prompt_cache_labels(self) -> list[str]:
        """The keys of the requests whose KV caches the prompt cache holds now (reported to the broker)."""
        ...

    @property
    def solo_fast_path(self) -> bool:
        """Whether a lone request on an idle engine decodes on the solo path."""
        ...

    def encode_prompt(self, prompt: str | None, messages: list[dict[str, Any]] | None,
                      tokens: list[int] | None) -> list[int]:
        """Token ids of a prompt; raises ValueError for one the model cannot take."""
        ...

    def insert(self, reqs: list[EngineRequest]) -> None:
        """Queue sequences for prefill."""
        ...

    def step(self) -> list[StepEvent]:
        """One step; at most one event per sequence."""
        ...

    def remove(self, keys: list[str], reason: str = "cancelled") -> list[StepEvent]:
        """Drop sequences now; each gets a final event."""
        ...

    def set_admission_batch(self, n: int) -> None:
        """How many prompts are prefilled together."""
        ...

    def close(self) -> None:
        """Release resources."""
        ...
