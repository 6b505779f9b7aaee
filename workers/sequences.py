"""What goes into the engine and what comes out of it: plain records, no MLX.

:mod:`workers.engine` takes :class:`EngineRequest` and returns :class:`StepEvent`;
the worker's session (:mod:`workers.session`) builds the one and reads the other
without importing MLX, so it can be tested with a fake engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
