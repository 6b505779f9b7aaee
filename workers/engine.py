"""The engine adapter over mlx-lm's continuous batching: the only module importing mlx.

:class:`Engine` wraps ``BatchGenerator``: ``insert`` requests with their own
sampler, max_tokens and stop strings; ``step`` once; ``remove`` to cancel.
Each stream is detokenized on its own so multi-byte characters come out whole.
Every call must come from the one thread that owns MLX.

With a prompt cache (:mod:`workers.prompt_cache`), a request starts from a private copy
of the longest cached prefix of its prompt (``insert(caches=..., all_tokens=...)``), and
a finished sequence's cache is stored under its prompt plus generated tokens. A removed
(cancelled) sequence stores nothing.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import apply_top_k, apply_top_p, make_sampler

from workers.prompt_cache import PromptCache, PromptCacheStats


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


@dataclass
class StepStats:
    """Per-step figures the worker reports (and the collector aggregates)."""

    steps: int = 0
    decode_steps: int = 0
    last_batch_size: int = 0
    max_batch_size: int = 0
    sequences_decoded: int = 0  # sum of batch sizes over decode steps
    generated_tokens: int = 0
    last_step_s: float = 0.0
    busy_s: float = 0.0

    @property
    def mean_batch_size(self) -> float:
        """Average number of sequences per decode step."""
        return self.sequences_decoded / self.decode_steps if self.decode_steps else 0.0


class _Stream:
    """Per-request detokenizer and stop-string state."""

    def __init__(self, req: EngineRequest, detokenizer: Any) -> None:
        self.req = req
        self.detok = detokenizer
        self.text = ""  # decoded so far (stop strings search here)
        self.emitted = 0  # characters of ``text`` already handed out
        self.pending_ids: list[int] = []
        self.tokens = 0
        self.cached_tokens = 0
        self.hold = max((len(s) for s in req.stop), default=1) - 1

    def add(self, token: int | None) -> None:
        if token is not None:
            self.detok.add_token(token)
            self.pending_ids.append(token)
            self.tokens += 1
        self.text += self.detok.last_segment

    def find_stop(self) -> int:
        """Index in ``text`` where the earliest stop string starts, or -1."""
        start = max(0, self.emitted - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.req.stop) if i >= 0]
        return min(hits) if hits else -1

    def take(self, upto: int | None = None) -> tuple[str, list[int]]:
        """Text ready to send (holding back a possible stop-string prefix) and pending ids."""
        if upto is None:
            upto = len(self.text) - (self._stop_prefix_len() if self.req.stop else 0)
        upto = max(upto, self.emitted)
        out = self.text[self.emitted:upto]
        self.emitted = upto
        ids, self.pending_ids = self.pending_ids, []
        return out, ids

    def _stop_prefix_len(self) -> int:
        tail = self.text[max(self.emitted, len(self.text) - self.hold):]
        for n in range(len(tail), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.req.stop):
                return n
        return 0


def make_request_sampler(temperature: float, top_p: float, top_k: int, seed: int | None) -> Callable[[mx.array], mx.array]:
    """mlx-lm's sampler; with a seed, the same filters drawing from a private key."""
    if temperature == 0.0 or seed is None:
        return make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0, top_k=top_k)
    key = [mx.random.key(seed)]

    def seeded(logprobs: mx.array) -> mx.array:
        if 0.0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * (1.0 / temperature), key=sub)

    return seeded


class Engine:
    """Continuous batching over one loaded model and tokenizer."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        decode_capacity: int = 16,
        admission_batch: int = 8,
        prefill_step_size: int = 512,
        prompt_cache_entries: int = 0,
        prompt_cache_bytes: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = set(tokenizer.eos_token_ids)
        self.vocab_size = int(getattr(getattr(model, "args", None), "vocab_size", 0) or len(tokenizer.get_vocab()))
        self.decode_capacity = decode_capacity
        self.gen = BatchGenerator(
            model,
            stop_tokens=[[t] for t in sorted(self.eos_ids)],
            completion_batch_size=decode_capacity,
            prefill_batch_size=min(admission_batch, decode_capacity),
            prefill_step_size=prefill_step_size,
        )
        self.streams: dict[int, _Stream] = {}
        self.uid_of: dict[str, int] = {}
        self.stats = StepStats()
        self.prompt_cache = make_kv_prompt_cache(model, max_entries=prompt_cache_entries, max_bytes=prompt_cache_bytes)

    # ---- prompts -------------------------------------------------------------------

    def encode_prompt(self, prompt: str | None, messages: list[dict] | None, tokens: list[int] | None) -> list[int]:
        """Token ids for a prompt string, chat messages or given ids (validated)."""
        if tokens is not None:
            ids = list(tokens)
        elif messages is not None:
            ids = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        else:
            text = prompt or ""
            bos = getattr(self.tokenizer, "bos_token", None)
            ids = self.tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))
        if not ids:
            raise ValueError("the prompt is empty after tokenization")
        if any(t >= self.vocab_size for t in ids):
            raise ValueError(f"prompt_tokens must be < vocab_size={self.vocab_size}")
        return ids

    # ---- batch control ------------------------------------------------------------

    @property
    def active(self) -> int:
        """Requests inserted and not yet finished or removed."""
        return len(self.streams)

    @property
    def free_slots(self) -> int:
        """How many more sequences may be inserted."""
        return max(0, self.decode_capacity - len(self.streams))

    def set_admission_batch(self, n: int) -> None:
        """How many new prompts are prefilled together (auto-tune moves this)."""
        self.gen.prefill_batch_size = max(1, min(n, self.decode_capacity))

    @property
    def cache_stats(self) -> PromptCacheStats:
        """The prompt cache's hits, misses, bytes held and other counters."""
        return self.prompt_cache.stats

    def insert(self, reqs: list[EngineRequest]) -> None:
        """Queue requests for prefill; they join decoding between steps.

        A request with ``cache`` set starts from the longest cached prefix of its prompt.
        """
        if not reqs:
            return
        found = [self._lookup(r) for r in reqs]
        uids = self.gen.insert(
            [r.prompt_tokens[n:] for r, (_, n) in zip(reqs, found)],
            max_tokens=[r.max_tokens for r in reqs],
            caches=[kv for kv, _ in found],
            all_tokens=[r.prompt_tokens[:n] for r, (_, n) in zip(reqs, found)],
            samplers=[make_request_sampler(r.temperature, r.top_p, self._top_k(r.top_k), r.seed) for r in reqs],
        )
        for uid, req, (_, n) in zip(uids, reqs, found):
            stream = self.streams[uid] = _Stream(req, self.tokenizer.detokenizer)
            stream.cached_tokens = n
            self.uid_of[req.key] = uid

    def _lookup(self, req: EngineRequest) -> tuple[list[Any] | None, int]:
        if not self.prompt_cache.enabled:
            return None, 0
        if not req.cache:
            self.prompt_cache.bypass()
            return None, 0
        return self.prompt_cache.lookup(req.prompt_tokens)

    def _store(self, req: EngineRequest, kv: list[Any] | None, tokens: list[int] | None) -> None:
        """Keep a finished sequence's cache (its prompt plus generated tokens)."""
        if kv is None or not tokens or not req.cache or not self.prompt_cache.enabled:
            return
        # Evaluate now: a lazy slice would keep the whole batch's KV buffers alive.
        mx.eval([c.state for c in kv])
        self.prompt_cache.store(tokens, kv)

    def _top_k(self, top_k: int) -> int:
        # mlx-lm raises for top_k outside (0, vocab) inside a compiled sampler, which fails
        # the whole batch and leaves the random state unusable; top_k >= vocab means "off".
        return top_k if 0 < top_k < self.vocab_size else 0

    def remove(self, keys: list[str], reason: str = "cancelled") -> list[StepEvent]:
        """Drop requests now; each gets a final event with ``reason``."""
        uids = [self.uid_of[k] for k in keys if k in self.uid_of]
        if uids:
            self.gen.remove(uids)
        return [self._finish(uid, reason) for uid in uids]

    def step(self) -> list[StepEvent]:
        """Run one engine step; at most one event per request."""
        if not self.streams:
            return []
        t0 = time.perf_counter()
        _, responses = self.gen.next()
        events: list[StepEvent] = []
        stopped: dict[int, EngineRequest] = {}
        for r in responses:
            stream = self.streams.get(r.uid)
            if stream is None:
                continue
            first = stream.tokens == 0
            is_eos = r.finish_reason == "stop" and r.token in self.eos_ids
            stream.add(None if is_eos else r.token)
            if is_eos:
                stream.tokens += 1  # the EOS counts as a generated token, it is not shown
            cut = stream.find_stop() if stream.req.stop else -1
            if cut >= 0:
                text, ids = stream.take(cut)
                stopped[r.uid] = stream.req
                events.append(self._finish(r.uid, "stop", text, ids, first))
            elif r.finish_reason is not None:
                self._store(stream.req, r.prompt_cache, r.all_tokens)
                stream.detok.finalize()
                stream.add(None)
                text, ids = stream.take(len(stream.text))
                events.append(self._finish(r.uid, r.finish_reason, text, ids, first))
            else:
                text, ids = stream.take()
                events.append(StepEvent(stream.req.key, text, ids, None, first))
        if stopped:
            for uid, (kv, tokens) in self.gen.remove(list(stopped), return_prompt_caches=True).items():
                self._store(stopped[uid], kv, tokens)
        self._record(len(responses), time.perf_counter() - t0)
        return events

    def _finish(self, uid: int, reason: str, text: str = "", ids: list[int] | None = None, first: bool = False) -> StepEvent:
        stream = self.streams.pop(uid)
        self.uid_of.pop(stream.req.key, None)
        return StepEvent(stream.req.key, text, ids or [], reason, first, stream.tokens, stream.cached_tokens)

    def tokens_of(self, key: str) -> int:
        """Generated tokens so far for a live request (EOS included)."""
        uid = self.uid_of.get(key)
        return self.streams[uid].tokens if uid is not None else 0

    def _record(self, batch: int, step_s: float) -> None:
        s = self.stats
        s.steps += 1
        s.last_step_s = step_s
        s.busy_s += step_s
        s.last_batch_size = batch
        if batch:
            s.decode_steps += 1
            s.sequences_decoded += batch
            s.generated_tokens += batch
            s.max_batch_size = max(s.max_batch_size, batch)

    def close(self) -> None:
        """Release the generator's resources."""
        self.gen.close()


def _kv_nbytes(kv: list[Any]) -> int:
    return sum(c.nbytes for c in kv)


def _copy_kv_prefix(kv: list[Any], held_tokens: int, keep_tokens: int) -> list[Any]:
    """A deep copy of ``kv`` cut to its first ``keep_tokens``: the stored entry stays untouched."""
    out = copy.deepcopy(kv)
    if keep_tokens < held_tokens and trim_prompt_cache(out, held_tokens - keep_tokens) != held_tokens - keep_tokens:
        raise ValueError("prompt cache entry could not be trimmed")
    return out


def make_kv_prompt_cache(model: Any, *, max_entries: int, max_bytes: int) -> PromptCache[list[Any]]:
    """A prompt cache over mlx-lm KV caches of ``model`` (``max_entries`` or ``max_bytes`` 0: off)."""
    return PromptCache(max_entries=max_entries, max_bytes=max_bytes, size_of=_kv_nbytes,
                       copy_prefix=_copy_kv_prefix, can_trim=can_trim_prompt_cache)


def load_model(path: str) -> tuple[Any, Any]:
    """Load a model folder (or hub id) through ``mlx_lm.load``."""
    from mlx_lm import load

    return load(path)


def mlx_info() -> dict[str, Any]:
    """Versions and device for logs and the ``ready`` message."""
    import mlx_lm

    return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "device": str(mx.default_device())}
