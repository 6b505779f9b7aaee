"""The seam between the worker and its engine: the interface and its records, no MLX.

:class:`EngineLike` is what the worker asks of an engine. :class:`workers.engine.adapter.Engine`
(one process) and :class:`workers.shard.engine.ShardedEngine` (rank 0 of a sharded group) both
implement it explicitly; the worker's session (:mod:`workers.session`) and telemetry read an
engine only through it, so they can be tested with a fake engine and a type checker sees the seam.
An engine takes :class:`EngineRequest` and returns :class:`StepEvent`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from workers.engine.prompt_cache import PromptCache, PromptCacheStats
from workers.engine.stats import StepStats
from workers.tools import ToolSupport

if TYPE_CHECKING:  # llguidance, not MLX; the worker's pure parts never load it for this
    from workers.engine.grammar import Grammar


@dataclass(frozen=True)
class Controls:
    """A request's decoding controls, checked and compiled before it reaches the engine.

    The penalties count the tokens generated in that completion only (docs/protocol.md).
    ``logit_bias`` maps token ids (below the vocabulary) to a bias; ``grammar`` is compiled.
    """

    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    min_p: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: Grammar | None = None

    @property
    def penalised(self) -> bool:
        """Whether a penalty is on."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or (self.repetition_penalty is not None and self.repetition_penalty != 1.0))

    @property
    def active(self) -> bool:
        """Whether any control is on: a request with none takes the engine's plain path."""
        return bool(self.penalised or self.logit_bias or self.min_p or self.logprobs or self.grammar is not None)


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
    n: int = 1  # completions of this prompt, prefilled once; completion i samples with seed + i
    controls: Controls | None = None  # None: no decoding control


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
    index: int = 0  # which of the request's n completions
    logprobs: list[dict[str, Any]] | None = None  # one entry per id of ``token_ids``, when asked for


class EngineLike(Protocol):
    """What the worker needs of an engine: continuous batching, one step at a time, on one thread.

    ``prompt_cache`` is read for its entries' labels (the keys of the requests that stored them),
    which the worker reports to the broker as prefix keys (workers/prefix_report.py).
    """

    prompt_cache: PromptCache[Any]

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

    @property
    def solo_fast_path(self) -> bool:
        """Whether a lone request on an idle engine decodes on the solo path."""
        ...

    @property
    def tool_support(self) -> ToolSupport:
        """How the model calls tools, or why it cannot."""
        ...

    @property
    def vocab_size(self) -> int:
        """Width of the model's logits: token ids must be below it."""
        ...

    def compile_grammar(self, spec: dict[str, Any]) -> Grammar:
        """Compile a request's ``grammar`` map (thread-safe: called off the engine's thread).

        Raises ValueError with the grammar engine's message for one it cannot compile.
        """
        ...

    def prepare_logprobs(self) -> None:
        """Build what logprobs need (thread-safe: called off the engine's thread, before admission)."""
        ...

    def controls_refused(self) -> str | None:
        """Why this engine cannot honour decoding controls at all, or None when it can."""
        ...

    def encode_prompt(self, prompt: str | None, messages: list[dict[str, Any]] | None,
                      tokens: list[int] | None, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a prompt (``tools`` go to the chat template); raises ValueError for one the model cannot take."""
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
