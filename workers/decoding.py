"""What a worker checks and builds from a ``generate``'s decoding controls before queueing it. Pure.

The protocol has checked each field's range (:mod:`actors.generate_checks`). What only the
worker knows is checked here, before the request waits for admission, and refused with
``bad_request`` naming the field: a ``logit_bias`` token id at or past the model's
vocabulary, ``n`` past the worker's decode capacity, controls on an engine that cannot
honour them, and the tool fields, which this worker does not render yet. A grammar is
compiled later, off the MLX thread (:class:`workers.session.WorkerSession` hands that to its
compile pool), because compiling can take long.
"""

from __future__ import annotations

from typing import Any, Callable

from actors.protocol import Generate, parse_logit_bias
from workers.engine.interface import Controls


class RefusedField(ValueError):
    """A field this worker cannot honour for this request; the message names it."""


def controls_set(req: Generate) -> list[str]:
    """The names of the decoding controls ``req`` sets away from "off" (``n`` > 1 included)."""
    flags = [("grammar", req.grammar is not None), ("logprobs", req.logprobs), ("logit_bias", bool(req.logit_bias)),
             ("n", req.n > 1), ("min_p", req.min_p > 0), ("presence_penalty", req.presence_penalty != 0),
             ("frequency_penalty", req.frequency_penalty != 0),
             ("repetition_penalty", req.repetition_penalty not in (None, 1.0))]
    return [name for name, on in flags if on]


def wants_controls(req: Generate) -> bool:
    """Whether ``req`` sets any decoding control (``n`` aside)."""
    return any(name != "n" for name in controls_set(req))


def check_request(req: Generate, *, vocab_size: int, decode_capacity: int, refused: str | None) -> None:
    """Refuse (``RefusedField``) what this worker cannot honour for ``req``; ``refused`` says why its engine takes no controls."""
    names = controls_set(req)
    if refused is not None and names:
        raise RefusedField(f"generate: {names[0]}: {refused}")
    if req.n > decode_capacity:
        raise RefusedField(f"generate: n={req.n} exceeds this worker's decode_capacity={decode_capacity}")
    if req.logit_bias:
        over = [t for t in parse_logit_bias(req.logit_bias) if t >= vocab_size]
        if over:
            raise RefusedField(f"generate: logit_bias names token id {over[0]}, past the model's vocabulary "
                               f"(vocab_size={vocab_size})")


def make_controls(req: Generate, compile_grammar: Callable[[dict[str, Any]], Any] | None = None) -> Controls | None:
    """The engine's controls for ``req`` (None when it sets none); ``compile_grammar`` compiles its grammar.

    A grammar that does not compile raises ``RefusedField`` with the compiler's message.
    """
    if not wants_controls(req):
        return None
    grammar = None
    if req.grammar is not None:
        if compile_grammar is None:
            raise RefusedField("generate: grammar: this worker cannot compile grammars")
        try:
            grammar = compile_grammar(req.grammar)
        except ValueError as exc:  # llguidance's message, its lines joined: one line on the wire
            text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise RefusedField(f"generate: grammar: {text}") from None
    rp = req.repetition_penalty
    return Controls(
        repetition_penalty=None if rp == 1.0 else rp, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias=parse_logit_bias(req.logit_bias) if req.logit_bias else None, min_p=req.min_p,
        logprobs=req.logprobs, top_logprobs=req.top_logprobs, grammar=grammar)


def needs_compile_pool(req: Generate) -> bool:
    """Whether preparing ``req`` may take long (a grammar to compile, a token table to build): off the MLX thread."""
    return req.grammar is not None or req.logprobs
