"""The engine adapter over mlx-lm's continuous batching: with :mod:`workers.engine.solo` and
:mod:`workers.engine.sampling`, the only mlx importer.

:class:`Engine` wraps ``BatchGenerator``: ``insert`` requests with their own
sampler, max_tokens and stop strings; ``step`` once; ``remove`` to cancel.
Each stream is detokenized on its own (:mod:`workers.engine.text_stream`) so multi-byte
characters come out whole. Every call must come from the one thread that owns MLX.

With a prompt cache (:mod:`workers.engine.prompt_cache`), a request starts from a private copy
of the longest cached prefix of its prompt (``insert(caches=..., all_tokens=...)``), and
a finished sequence's cache is stored under its prompt plus generated tokens. A removed
(cancelled) sequence stores nothing.

Solo fast path (``solo_fast_path``): a request inserted alone into an idle engine is
decoded by mlx-lm's own ``generate_step`` (:class:`workers.engine.solo.Solo`, private to this
module), as in-process mlx-lm would; the next insert moves it into the ``BatchGenerator``
mid-stream with the same output. Its stream lives under the uid ``SOLO_UID`` until then.

Between steps the engine forces no evaluation of its own: mlx-lm's step already leaves the
next step in flight when it returns (``async_eval``, then a wait on the current tokens only),
and a finished sequence's cache is stored with ``async_eval``, so the detokenizing, stop
strings and messages that follow a step run while MLX still computes. ``stats``
(:class:`workers.engine.stats.StepStats`) counts the path each request took and splits the
busy time into mlx-lm's part and ours.
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import can_trim_prompt_cache

from actors.clock import Clock, MonotonicClock
from actors.config import BatchingConfig, fixed_capacity
from workers.capacity import FALLBACK_CAPACITY
from workers.engine.stats import BATCH, HANDOFF, SOLO, StepClock, StepStats
from workers.engine.prompt_cache import PromptCache, PromptCacheStats
from workers.engine.sampling import SamplerPool
from workers.engine.interface import EngineLike, EngineRequest, StepEvent  # apart: read without MLX
from workers.engine.solo import Solo, can_go_solo, trim_kv
from workers.engine.text_stream import TextStream

SOLO_UID = -1  # the solo sequence's key in ``Engine.streams`` (BatchGenerator uids are >= 0)


class Engine(EngineLike):
    """Continuous batching over one loaded model and tokenizer.

    ``clock`` times the steps and the split of their time (``stats``); the real clock by default.
    """

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
        solo_fast_path: bool = True,
        clock: Clock | None = None,
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
        self.streams: dict[int, TextStream] = {}
        self.uid_of: dict[str, int] = {}
        self._stats = StepStats()
        self.clock = clock or MonotonicClock()
        self.timing = StepClock(self.clock, self._stats)
        self.samplers = SamplerPool()
        self.prompt_cache = make_kv_prompt_cache(model, max_entries=prompt_cache_entries, max_bytes=prompt_cache_bytes)
        self.prefill_step_size = prefill_step_size
        # A handoff trims one token off the solo cache; caches that cannot be trimmed always batch.
        self._solo_fast_path = solo_fast_path and can_go_solo(model)
        self.solo: Solo | None = None

    # ---- prompts -------------------------------------------------------------------

    def encode_prompt(self, prompt: str | None, messages: list[dict[str, Any]] | None,
                      tokens: list[int] | None) -> list[int]:
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
    def stats(self) -> StepStats:
        """Step and path figures, and the split of busy time (cumulative)."""
        return self._stats

    @property
    def solo_fast_path(self) -> bool:
        """Whether a lone request on an idle engine decodes on the solo path."""
        return self._solo_fast_path

    @property
    def cache_stats(self) -> PromptCacheStats:
        """The prompt cache's hits, misses, bytes held and other counters."""
        return self.prompt_cache.stats

    def prompt_cache_labels(self) -> list[str]:
        """The keys of the requests whose caches the prompt cache holds now."""
        return self.prompt_cache.labels()

    def insert(self, reqs: list[EngineRequest]) -> None:
        """Queue requests for prefill; they join decoding between steps.

        A request with ``cache`` set starts from the longest cached prefix of its prompt.
        One request into an idle engine goes solo; any insert moves a solo sequence into the batch.
        Unseeded requests with the same sampling settings share one sampler object, so the
        batch is sampled in one call.
        """
        if not reqs:
            return
        self.timing.open()
        samplers = [self.samplers.get(r.temperature, r.top_p, self._top_k(r.top_k), r.seed) for r in reqs]
        with self.timing.mlx():
            found = [self._lookup(r) for r in reqs]
            if self._solo_fast_path and len(reqs) == 1 and not self.streams:
                (r,), ((kv, n),), (sampler,) = reqs, found, samplers
                self.solo = Solo(self.model, r.prompt_tokens, max_tokens=r.max_tokens, sampler=sampler, cache=kv,
                                 cached_tokens=n, prefill_step_size=self.prefill_step_size)
                uids, path = [SOLO_UID], SOLO
            else:
                self._hand_off_solo()
                uids, path = self.gen.insert(
                    [r.prompt_tokens[n:] for r, (_, n) in zip(reqs, found)],
                    max_tokens=[r.max_tokens for r in reqs],
                    # None: no cached prefix. mlx-lm takes it (it fills [None] * n itself) but
                    # annotates caches as List[List[Any]].
                    caches=[kv for kv, _ in found],  # type: ignore[misc]
                    all_tokens=[r.prompt_tokens[:n] for r, (_, n) in zip(reqs, found)],
                    samplers=samplers,
                ), BATCH
        for uid, req, (_, n) in zip(uids, reqs, found):
            stream = self.streams[uid] = TextStream(req, self.tokenizer.detokenizer, path)
            stream.cached_tokens = n
            self.uid_of[req.key] = uid

    def _hand_off_solo(self) -> None:
        """Move the solo sequence, if any, into the BatchGenerator; its stream goes on."""
        if self.solo is None:
            return
        solo, self.solo = self.solo, None
        prompt, kv, all_tokens, max_tokens = solo.handoff()
        # kv None: no cached prefix, as in insert.
        (uid,) = self.gen.insert([prompt], max_tokens=[max_tokens], caches=[kv],  # type: ignore[list-item]
                                 all_tokens=[all_tokens], samplers=[solo.sampler])
        stream = self.streams[uid] = self.streams.pop(SOLO_UID)
        stream.path = HANDOFF
        self.uid_of[stream.req.key] = uid
        self._stats.handoffs += 1

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
        # The cut copies are computed behind the step in flight, never waited for here; once
        # computed they no longer hold on to the batch's KV buffers.
        mx.async_eval([c.state for c in kv])
        self.prompt_cache.store(tokens, kv, label=req.key)

    def _top_k(self, top_k: int) -> int:
        # mlx-lm raises for top_k outside (0, vocab) inside a compiled sampler, which fails
        # the whole batch and leaves the random state unusable; top_k >= vocab means "off".
        return top_k if 0 < top_k < self.vocab_size else 0

    def remove(self, keys: list[str], reason: str = "cancelled") -> list[StepEvent]:
        """Drop requests now; each gets a final event with ``reason``."""
        uids = [self.uid_of[k] for k in keys if k in self.uid_of]
        with self.timing.mlx():
            if SOLO_UID in uids and self.solo is not None:
                self.solo.close()
                self.solo = None
            if any(uid != SOLO_UID for uid in uids):
                self.gen.remove([uid for uid in uids if uid != SOLO_UID])
        events = [self._finish(uid, reason) for uid in uids]
        if not self.streams:
            self.timing.close()
        return events

    def step(self) -> list[StepEvent]:
        """Run one engine step; at most one event per request."""
        if not self.streams:
            return []
        self.timing.step_started()
        t0 = self.clock.now()
        solo = self.solo is not None
        events, batch = self._step_solo() if solo else self._step_batch()
        self._stats.record_step(batch, self.clock.now() - t0, solo=solo)
        if not self.streams:
            self.timing.close()
        return events

    def _step_batch(self) -> tuple[list[StepEvent], int]:
        """One ``BatchGenerator`` step: its events, and how many sequences it decoded."""
        with self.timing.mlx():
            _, responses = self.gen.next()
        events: list[StepEvent] = []
        stopped: dict[int, EngineRequest] = {}
        for r in responses:
            stream = self.streams.get(r.uid)
            if stream is None:
                continue
            event, cut = self._on_token(r.uid, r.token, r.finish_reason)
            if cut:
                stopped[r.uid] = stream.req
            elif r.finish_reason is not None:
                with self.timing.mlx():
                    self._store(stream.req, r.prompt_cache, r.all_tokens)
            events.append(event)
        if stopped:
            with self.timing.mlx():
                for uid, (kv, tokens) in self.gen.remove(list(stopped), return_prompt_caches=True).items():
                    self._store(stopped[uid], kv, tokens)
        return events, len(responses)

    def _step_solo(self) -> tuple[list[StepEvent], int]:
        """One ``generate_step`` token: a decode step of batch 1, finishing as BatchGenerator would."""
        assert self.solo is not None
        solo = self.solo
        with self.timing.mlx():
            token = solo.next()
        if token in self.eos_ids:
            reason: str | None = "stop"
        else:
            reason = "length" if solo.generated >= solo.max_tokens else None
        req = self.streams[SOLO_UID].req
        event, _ = self._on_token(SOLO_UID, token, reason)
        if event.finish_reason is not None:  # EOS, length or a stop string: keep its cache
            self.solo = None
            with self.timing.mlx():
                self._store(req, *solo.finished_cache())
        return [event], 1

    def _on_token(self, uid: int, token: int, finish_reason: str | None) -> tuple[StepEvent, bool]:
        """Detokenize one new token of ``uid``: its event, and whether a stop string ended it."""
        stream = self.streams[uid]
        first = stream.tokens == 0
        is_eos = finish_reason == "stop" and token in self.eos_ids
        stream.add(None if is_eos else token)
        if is_eos:
            stream.tokens += 1  # the EOS counts as a generated token, it is not shown
        cut = stream.find_stop() if stream.stop else -1
        if cut >= 0:
            text, ids = stream.take(cut)
            return self._finish(uid, "stop", text, ids, first), True
        if finish_reason is not None:
            stream.detok.finalize()
            stream.add(None)
            text, ids = stream.take(len(stream.text))
            return self._finish(uid, finish_reason, text, ids, first), False
        text, ids = stream.take()
        return StepEvent(stream.req.key, text, ids, None, first), False

    def _finish(self, uid: int, reason: str, text: str = "", ids: list[int] | None = None, first: bool = False) -> StepEvent:
        stream = self.streams.pop(uid)
        self.uid_of.pop(stream.req.key, None)
        self._stats.requests[stream.path] += 1
        return StepEvent(stream.req.key, text, ids or [], reason, first, stream.tokens, stream.cached_tokens,
                         stream.path)

    def close(self) -> None:
        """Release the generator's resources."""
        if self.solo is not None:
            self.solo.close()
            self.solo = None
        self.gen.close()


def _kv_nbytes(kv: list[Any]) -> int:
    return sum(c.nbytes for c in kv)


def _copy_kv_prefix(kv: list[Any], held_tokens: int, keep_tokens: int) -> list[Any]:
    """A deep copy of ``kv`` cut to its first ``keep_tokens``: the stored entry stays untouched."""
    out = copy.deepcopy(kv)
    if keep_tokens < held_tokens and trim_kv(out, held_tokens - keep_tokens) != held_tokens - keep_tokens:
        raise ValueError("prompt cache entry could not be trimmed")
    return out


def make_kv_prompt_cache(model: Any, *, max_entries: int, max_bytes: int) -> PromptCache[list[Any]]:
    """A prompt cache over mlx-lm KV caches of ``model`` (``max_entries`` or ``max_bytes`` 0: off)."""
    return PromptCache(max_entries=max_entries, max_bytes=max_bytes, size_of=_kv_nbytes,
                       copy_prefix=_copy_kv_prefix, can_trim=can_trim_prompt_cache)


def make_engine(model: Any, tokenizer: Any, batching: BatchingConfig, *, prompt_cache_bytes: int | None = None,
                decode_capacity: int | None = None) -> Engine:
    """An engine over a loaded model with a worker's batching settings (``prompt_cache_bytes`` overrides theirs).

    ``decode_capacity`` is the capacity sized for this worker (:mod:`workers.capacity`); without it, the
    number set in ``batching``, or the fallback when that is "auto".
    """
    b = batching
    capacity = decode_capacity or fixed_capacity(b) or FALLBACK_CAPACITY
    return Engine(model, tokenizer, decode_capacity=capacity, admission_batch=b.admission_batch,
                  prefill_step_size=b.prefill_step_size, prompt_cache_entries=b.prompt_cache_entries,
                  prompt_cache_bytes=b.prompt_cache_bytes if prompt_cache_bytes is None else prompt_cache_bytes,
                  solo_fast_path=b.solo_fast_path)


def mlx_info() -> dict[str, Any]:
    """Versions and device for logs and the ``ready`` message."""
    import mlx_lm

    mlx_version = mx.__version__  # type: ignore[attr-defined]  # there at run time; mlx's stubs leave it out
    return {"mlx": mlx_version, "mlx_lm": mlx_lm.__version__, "device": str(mx.default_device())}
