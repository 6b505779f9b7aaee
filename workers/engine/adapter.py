"""The engine adapter over mlx-lm's continuous batching (workers/engine/ holds the only mlx importers).

:class:`Engine` wraps ``BatchGenerator``: ``insert`` requests with their own sampler, max_tokens, stop
strings and decoding controls (:mod:`workers.engine.controls`); ``step`` once; ``remove`` to cancel. Each
stream is detokenized on its own (:mod:`workers.engine.text_stream`) so multi-byte characters come out
whole. Every call must come from the one thread that owns MLX.

With a prompt cache (:mod:`workers.engine.prompt_cache`), a request starts from a private copy of the
longest cached prefix of its prompt (``insert(caches=..., all_tokens=...)``), and a finished sequence's
cache is stored under its prompt plus generated tokens. A removed (cancelled) sequence stores nothing.

Solo fast path (``solo_fast_path``): a request inserted alone into an idle engine is decoded by mlx-lm's own
``generate_step`` (:class:`workers.engine.solo.Solo`), as in-process mlx-lm would; the next insert moves it
into the ``BatchGenerator`` mid-stream with the same output (its stream is under ``SOLO_UID`` till then).

Between steps the engine forces no evaluation of its own: the step leaves the next one in flight
(``async_eval``, then a wait on the current tokens only), and a finished sequence's cache is stored with
``async_eval``, so what follows a step runs while MLX still computes. ``stats``
(:class:`workers.engine.stats.StepStats`) counts each request's path and splits the busy time into mlx-lm's
part and ours.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from actors.clock import Clock, MonotonicClock
from actors.config import BatchingConfig
from workers.engine import attention
from workers.engine.batch import ControlledBatchGenerator
from workers.engine.controls import Rows, make_row
from workers.engine.kv import fork, make_kv_prompt_cache, prefill_shared
from workers.engine.grammar import Grammar, GrammarCompiler, MaskFiller, think_markers
from workers.engine.logprobs import LogprobFormatter
from workers.engine.stats import BATCH, HANDOFF, SOLO, StepClock, StepStats
from workers.engine.prompt_cache import PromptCacheStats
from workers.engine.sampling import Sampler, SamplerPool
from workers.engine.interface import EngineLike, EngineRequest, StepEvent  # apart: read without MLX
from workers.engine.solo import Solo, can_go_solo
from workers.engine.text_stream import TextStream
from workers.engine.tool_setup import encode_prompt
from workers.tools import ToolSupport

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
        prefill_first_tokens: int = 0,  # decoding pauses for waiting prompts up to this many tokens (batch.py)
        clock: Clock | None = None,
        tools: ToolSupport | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._tools = tools or ToolSupport("", None, "its tool calling was not set up")  # tool_setup.py
        self.eos_ids = set(tokenizer.eos_token_ids)
        self._vocab_size = int(getattr(getattr(model, "args", None), "vocab_size", 0) or len(tokenizer.get_vocab()))
        self.decode_capacity = decode_capacity
        self._stats = StepStats()
        self.clock = clock or MonotonicClock()
        self.grammars = GrammarCompiler(getattr(tokenizer, "_tokenizer", tokenizer), n_vocab=self.vocab_size,
                                        eos_ids=sorted(self.eos_ids), think=think_markers(tokenizer))
        self.rows = Rows(self.vocab_size, None, self.eos_ids, self.clock, self._stats)
        self.logprob_maps = LogprobFormatter(self.grammars.token_bytes)
        self.gen: BatchGenerator = ControlledBatchGenerator(
            model,
            rows=self.rows,
            stop_tokens=[[t] for t in sorted(self.eos_ids)],
            completion_batch_size=decode_capacity,
            prefill_batch_size=min(admission_batch, decode_capacity),
            prefill_step_size=prefill_step_size,
            prefill_first_tokens=prefill_first_tokens,
        )
        self.streams: dict[int, TextStream] = {}
        self.uids_of: dict[str, list[int]] = {}  # a request's sequences, one per completion
        self.timing = StepClock(self.clock, self._stats)
        self.samplers = SamplerPool()
        self.prompt_cache = make_kv_prompt_cache(model, max_entries=prompt_cache_entries, max_bytes=prompt_cache_bytes)
        self.prefill_step_size = prefill_step_size
        # A handoff trims one token off the solo cache; caches that cannot be trimmed always batch.
        self._solo_fast_path = solo_fast_path and can_go_solo(model)
        self.solo: Solo | None = None

    # ---- prompts -------------------------------------------------------------------

    @property
    def tool_support(self) -> ToolSupport:
        """How this model calls tools, or why it cannot."""
        return self._tools

    def encode_prompt(self, prompt: str | None, messages: list[dict[str, Any]] | None, tokens: list[int] | None,
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids for a prompt string, chat messages (with ``tools`` for the template) or given ids (validated)."""
        return encode_prompt(self.tokenizer, self.vocab_size, prompt, messages, tokens, tools)

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

    @property
    def vocab_size(self) -> int:
        """Width of the model's logits: token ids must be below it."""
        return self._vocab_size

    def compile_grammar(self, spec: dict[str, Any]) -> Grammar:
        """Compile a request's ``grammar`` (any thread); raises GrammarError (a ValueError) with llguidance's message."""
        return self.grammars.compile(spec)

    def prepare_logprobs(self) -> None:
        """Build what logprobs need (the token-bytes table) now, off the engine's thread."""
        _ = self.grammars.tokenizer

    def controls_refused(self) -> str | None:
        """None: every control works here."""

    def insert(self, reqs: list[EngineRequest]) -> None:
        """Queue requests for prefill; they join decoding between steps.

        A request with ``cache`` set starts from the longest cached prefix of its prompt.
        One request into an idle engine goes solo; any insert moves a solo sequence into the batch.
        Unseeded requests with the same sampling settings share one sampler object (one sampler
        call per batch). With ``n`` > 1 a prompt is prefilled once and forked (:mod:`workers.engine.kv`).
        """
        if not reqs:
            return
        self.timing.open()
        with self.timing.mlx():
            found = [self._lookup(r) for r in reqs]
            if self._solo_fast_path and len(reqs) == 1 and reqs[0].n == 1 and not self.streams:
                (r,), ((kv, n),) = reqs, found
                self._add_row(SOLO_UID, r, 0)
                self.solo = Solo(self.model, r.prompt_tokens, max_tokens=r.max_tokens, sampler=self._sampler(r, 0),
                                 cache=kv, cached_tokens=n, prefill_step_size=self.prefill_step_size,
                                 rows=self.rows, uid=SOLO_UID)
                seqs, path = [(SOLO_UID, r, 0, n)], SOLO
            else:
                self._hand_off_solo()
                seqs, path = self._insert_batch(reqs, found), BATCH
        for uid, req, index, n in seqs:
            stream = self.streams[uid] = TextStream(req, self.tokenizer.detokenizer, path, index)
            stream.cached_tokens = n
            self.uids_of.setdefault(req.key, []).append(uid)

    def _insert_batch(self, reqs: list[EngineRequest], found: list[tuple[list[Any] | None, int]]
                      ) -> list[tuple[int, EngineRequest, int, int]]:
        """Into the BatchGenerator: one sequence per completion; ``(uid, request, index, cached tokens)`` each."""
        prompts: list[list[int]] = []
        caches: list[list[Any] | None] = []
        held: list[list[int]] = []
        seqs: list[tuple[EngineRequest, int, int]] = []
        for r, (kv, n) in zip(reqs, found):
            if r.n == 1:
                prompts.append(r.prompt_tokens[n:])
                caches.append(kv)
                held.append(r.prompt_tokens[:n])
                seqs.append((r, 0, n))
                continue
            shared = prefill_shared(self.model, r.prompt_tokens, kv, n, self.prefill_step_size)
            self.prompt_cache.stats.forks += r.n - 1
            self.prompt_cache.stats.fork_tokens += (r.n - 1) * (len(r.prompt_tokens) - 1)
            for i, copy_kv in enumerate(fork(shared, r.n)):
                prompts.append(r.prompt_tokens[-1:])
                caches.append(copy_kv)
                held.append(r.prompt_tokens[:-1])
                seqs.append((r, i, n))
        uids = self.gen.insert(prompts, max_tokens=[r.max_tokens for r, _, _ in seqs], caches=caches,  # type: ignore[arg-type]  # None: a fresh cache
                               all_tokens=held, samplers=[self._sampler(r, i) for r, i, _ in seqs])
        for uid, (r, i, _) in zip(uids, seqs):
            self._add_row(uid, r, i)
        return [(uid, r, i, n) for uid, (r, i, n) in zip(uids, seqs)]

    def _sampler(self, req: EngineRequest, index: int) -> Sampler:
        seed = None if req.seed is None else req.seed + index
        return self.samplers.get(req.temperature, req.top_p, self._top_k(req.top_k), seed)

    def _add_row(self, uid: int, req: EngineRequest, index: int) -> None:
        """Register a sequence's decoding controls, if it has any."""
        c = req.controls
        if c is None or not c.active:
            return
        state = c.grammar.start(req.prompt_tokens) if c.grammar is not None else None
        if state is not None and self.rows.filler is None:
            self.rows.filler = MaskFiller(self.vocab_size)
        self.rows.add(uid, make_row(c, self.vocab_size, state))

    def _hand_off_solo(self) -> None:
        """Move the solo sequence, if any, into the BatchGenerator; its stream goes on."""
        if self.solo is None:
            return
        solo, self.solo = self.solo, None
        prompt, kv, all_tokens, max_tokens = solo.handoff()
        # kv None: no cached prefix, as in insert.
        (uid,) = self.gen.insert([prompt], max_tokens=[max_tokens], caches=[kv],  # type: ignore[list-item]
                                 all_tokens=[all_tokens], samplers=[solo.sampler])
        self.rows.rename(SOLO_UID, uid)
        stream = self.streams[uid] = self.streams.pop(SOLO_UID)
        stream.path = HANDOFF
        self.uids_of[stream.req.key] = [uid]
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
        self.prompt_cache.store(tokens, kv, label=req.key)  # the label names it in the worker's prefix reports

    def _top_k(self, top_k: int) -> int:
        # mlx-lm raises for top_k outside (0, vocab) inside a compiled sampler, which fails
        # the whole batch and leaves the random state unusable; top_k >= vocab means "off".
        return top_k if 0 < top_k < self.vocab_size else 0

    def remove(self, keys: list[str], reason: str = "cancelled") -> list[StepEvent]:
        """Drop requests now (every completion of each); each sequence gets a final event with ``reason``."""
        uids = [uid for k in keys for uid in self.uids_of.get(k, [])]
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
        """Run one engine step; at most one event per sequence."""
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

    def _logprob(self, uid: int, token: int) -> dict[str, Any] | None:
        """The logprob entry of ``uid``'s new token, when its request asked for them."""
        entry = self.rows.take_entry(uid)
        return None if entry is None else self.logprob_maps.entry(token, entry.logprob, entry.top)

    def _on_token(self, uid: int, token: int, finish_reason: str | None) -> tuple[StepEvent, bool]:
        """Detokenize one new token of ``uid``: its event, and whether a stop string ended it."""
        stream = self.streams[uid]
        first = stream.tokens == 0
        is_eos = finish_reason == "stop" and token in self.eos_ids
        logprob = self._logprob(uid, token)
        stream.add(None if is_eos else token, logprob)
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
        return StepEvent(stream.req.key, text, ids, None, first, index=stream.index,
                         logprobs=stream.take_logprobs()), False

    def _finish(self, uid: int, reason: str, text: str = "", ids: list[int] | None = None, first: bool = False) -> StepEvent:
        stream = self.streams.pop(uid)
        self.rows.pop(uid)
        uids = self.uids_of.get(stream.req.key)
        if uids is not None:
            uids.remove(uid)
            if not uids:
                del self.uids_of[stream.req.key]
        self._stats.requests[stream.path] += 1
        return StepEvent(stream.req.key, text, ids or [], reason, first, stream.tokens, stream.cached_tokens,
                         stream.path, stream.index, stream.take_logprobs())

    def close(self) -> None:
        """Release the generator's resources."""
        if self.solo is not None:
            self.solo.close()
            self.solo = None
        self.gen.close()


def make_engine(model: Any, tokenizer: Any, batching: BatchingConfig, *, prompt_cache_bytes: int | None = None,
                tools: ToolSupport | None = None) -> Engine:
    """An engine over a loaded model with a worker's batching settings (their ``decode_capacity`` a number: the worker
    sizes "auto" first, workers/capacity.py; ``prompt_cache_bytes`` overrides theirs) and the model's ``tools``; on the
    CPU its decode steps group the attention by KV head (:mod:`workers.engine.attention`)."""
    attention.install(model)
    b, kept = batching, batching.prompt_cache_bytes if prompt_cache_bytes is None else prompt_cache_bytes
    return Engine(model, tokenizer, decode_capacity=int(b.decode_capacity), admission_batch=b.admission_batch,
                  prefill_step_size=b.prefill_step_size, prompt_cache_entries=b.prompt_cache_entries, prompt_cache_bytes=kept,
                  solo_fast_path=b.solo_fast_path, prefill_first_tokens=b.prefill_first_tokens, tools=tools)


def mlx_info() -> dict[str, Any]:
    """Versions and device for logs and the ``ready`` message."""
    import mlx_lm

    mlx_version = mx.__version__  # type: ignore[attr-defined]  # there at run time; mlx's stubs leave it out
    return {"mlx": mlx_version, "mlx_lm": mlx_lm.__version__, "device": str(mx.default_device())}
