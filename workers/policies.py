"""Batching-window policies and the admission-batch auto-tuner (pure: no MLX, no sockets).

Between engine steps the worker asks ``AdmissionPolicy.decide`` how many of its
waiting requests to admit (prefill together) now:

- ``immediate``: admit at once (the seed's ``MLX_GPU_SCHEDULER=off``).
- ``fixed``: after the oldest waiting request arrived, wait up to ``window_ms``
  or until a full admission batch is waiting, then admit them together.
- ``adaptive``: like ``fixed``, but the window follows the queue depth.

While sequences are decoding, ``fixed`` and ``adaptive`` hold arrivals for at
least ``decode_window_ms`` scaled by how full the batch is: admitting costs a
prefill pass and a first-token pass on top of the decode step, so admissions
that arrive a few steps apart are cheaper together (``benchmarks/engine_step.py``
measures it), and the saving grows with the number of sequences decoding.

Before the window, an urgent request is admitted at once, and the fast path
admits a lone request at once when nothing else is waiting or running.

``AutoTuner`` is the seed's EMA controller, with one correction: it controls
time to first token (TTFT: arrival at the worker to first token) of admitted
requests, not whole-request latency. TTFT is what the window and the admission
batch trade against each other: a larger admission batch shortens the queue
wait but lengthens the shared prefill step. Whole-request latency is dominated
by decoding, which admission does not control; the seed compared ~415 ms
requests against a 100 ms target, so its controller could only ratchet down.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.clock import Clock
from actors.config import POLICIES, BatchingConfig, fixed_capacity
from actors.stats import percentile
from workers.capacity import FALLBACK_CAPACITY

# Float slack so "first arrival + window" releases at the window, not one ulp after it.
_EPS_S = 1e-9


@dataclass(frozen=True)
class Decision:
    """What the worker should do with its waiting list now."""

    admit: int  # how many waiting requests to admit now (0 = keep waiting)
    wait_s: float | None  # when admit == 0 and something waits: seconds until the decision may change
    fast_path: bool  # this admission skipped the window via the fast path
    reason: str  # immediate | fast_path | urgent | full | window | waiting | idle | no_capacity


@dataclass
class PolicyStats:
    """Counters kept by an AdmissionPolicy."""

    decisions: int = 0
    admitted: int = 0
    fast_path_admissions: int = 0
    window_waits: int = 0  # decisions that chose to keep waiting
    window_wait_s_total: float = 0.0  # first arrival to admission, summed over batches the window held


class AdmissionPolicy:
    """Decides, between engine steps, how many waiting requests to admit.

    ``cfg.policy`` picks the window: ``immediate``, ``fixed`` or ``adaptive``.
    The admission batch starts at ``cfg.admission_batch``; ``set_admission_batch``
    (the auto-tuner) moves it.
    """

    def __init__(self, cfg: BatchingConfig, clock: Clock) -> None:
        if cfg.policy not in POLICIES:
            raise ValueError(f"policy: expected one of {POLICIES}, got {cfg.policy!r}")
        self._cfg = cfg
        self._clock = clock
        self._admission_batch = max(1, cfg.admission_batch)
        self._depth = 0  # waiting count at the last decision; drives the adaptive window
        self._holding = False  # the window chose to wait since the last admission
        self.stats = PolicyStats()

    @property
    def policy(self) -> str:
        """The policy name: immediate, fixed or adaptive."""
        return self._cfg.policy

    @property
    def window_ms(self) -> float:
        """The window in force at the last decision's queue depth (0 for immediate)."""
        return self._window_ms_for(self._depth)

    @property
    def admission_batch(self) -> int:
        """The most waiting requests admitted together."""
        return self._admission_batch

    def set_admission_batch(self, n: int) -> None:
        """Change the admission batch limit; ``n`` must be at least 1."""
        if n < 1:
            raise ValueError(f"admission batch must be >= 1, got {n}")
        self._admission_batch = n

    def decide(
        self,
        *,
        waiting: int,
        running: int,
        free_slots: int,
        first_arrival_s: float | None,
        urgent_waiting: bool,
    ) -> Decision:
        """How many of ``waiting`` requests to admit now.

        ``running`` sequences are decoding, ``free_slots`` more fit in the batch,
        ``first_arrival_s`` is the clock time the oldest waiting request arrived,
        and ``urgent_waiting`` says an urgent request is among the waiting.
        Never admits more than ``min(waiting, free_slots, admission_batch)``.
        """
        self.stats.decisions += 1
        self._depth = max(0, waiting)
        if waiting <= 0:
            return Decision(0, None, False, "idle")
        if free_slots <= 0:
            return Decision(0, None, False, "no_capacity")
        cap = min(waiting, free_slots, self._admission_batch)
        if self._cfg.policy == "immediate":
            return self._admit(cap, "immediate", first_arrival_s)
        if urgent_waiting:
            return self._admit(cap, "urgent", first_arrival_s)
        if self._cfg.fast_path and waiting == 1 and running == 0:
            return self._admit(1, "fast_path", first_arrival_s, fast_path=True)
        # The batch cannot grow past the free slots, so waiting for more is pointless.
        if waiting >= min(self._admission_batch, free_slots):
            return self._admit(cap, "full", first_arrival_s)
        window_ms = self._window_ms_for(waiting)
        if running > 0:
            window_ms = max(window_ms, self.decode_window_ms(running))
        window_s = window_ms / 1000.0
        if first_arrival_s is None:  # unknown arrival: never stall on it
            return self._admit(cap, "window", first_arrival_s)
        elapsed_s = max(0.0, self._clock.now() - first_arrival_s)
        if elapsed_s + _EPS_S >= window_s:
            return self._admit(cap, "window", first_arrival_s)
        self.stats.window_waits += 1
        self._holding = True
        return Decision(0, window_s - elapsed_s, False, "waiting")

    def decode_window_ms(self, running: int) -> float:
        """The least window while ``running`` sequences decode.

        Each admission stalls every decoding sequence for a prefill pass and a
        first-token pass, so holding arrivals to share those passes pays off in
        proportion to how many sequences are decoding: the hold is
        ``decode_window_ms`` at a full batch and shrinks linearly below it.
        """
        full = max(1, fixed_capacity(self._cfg) or FALLBACK_CAPACITY)  # the worker sets the number it sized
        return self._cfg.decode_window_ms * min(1.0, max(0, running) / full)

    def _window_ms_for(self, depth: int) -> float:
        cfg = self._cfg
        if cfg.policy == "immediate":
            return 0.0
        if cfg.policy == "fixed":
            return cfg.window_ms
        if depth <= cfg.adaptive_low_depth:
            return cfg.adaptive_low_ms
        if depth <= cfg.adaptive_medium_depth:
            return cfg.adaptive_medium_ms
        return cfg.adaptive_high_ms

    def _admit(self, n: int, reason: str, first_arrival_s: float | None, *, fast_path: bool = False) -> Decision:
        self.stats.admitted += n
        if fast_path:
            self.stats.fast_path_admissions += 1
        if self._holding and first_arrival_s is not None:
            self.stats.window_wait_s_total += max(0.0, self._clock.now() - first_arrival_s)
        self._holding = False
        return Decision(n, None, fast_path, reason)


def make_policy(cfg: BatchingConfig, clock: Clock) -> AdmissionPolicy:
    """The admission policy that ``cfg.policy`` names."""
    return AdmissionPolicy(cfg, clock)


@dataclass
class TunerStats:
    """Counters kept by an AutoTuner."""

    ups: int = 0  # interval steps up
    downs: int = 0  # interval steps down
    emergencies: int = 0  # batches whose max TTFT exceeded twice the target (halvings)


class AutoTuner:
    """EMA controller of the admission batch against a p99 TTFT target.

    Every ``cfg.auto_tune_interval`` batches it folds the p99 TTFT of those
    batches into an EMA (alpha ``cfg.auto_tune_ema_alpha``). Above the target
    (``cfg.p99_threshold_ms``) the admission batch steps down by one; below
    0.7 x target it steps up by one. A single batch whose slowest TTFT exceeds
    twice the target halves the admission batch at once and restarts the
    interval. The batch stays in [auto_tune_min_batch, auto_tune_max_batch].
    """

    def __init__(self, cfg: BatchingConfig, policy: AdmissionPolicy) -> None:
        self._cfg = cfg
        self._policy = policy
        self._min = cfg.auto_tune_min_batch
        self._max = max(cfg.auto_tune_min_batch, cfg.auto_tune_max_batch)
        self._target_ms = cfg.p99_threshold_ms
        self._ema_ms: float | None = None
        self._samples_ms: list[float] = []
        self._batches = 0
        self.stats = TunerStats()
        self._set(policy.admission_batch)  # start inside the bounds

    @property
    def ema_ms(self) -> float | None:
        """The EMA of interval p99 TTFT in ms; None before the first interval ends."""
        return self._ema_ms

    def observe_batch(self, ttft_s: list[float]) -> None:
        """Record one admitted batch's times to first token, in seconds.

        Call once per batch, when all of its requests have produced a first token.
        An empty list is ignored.
        """
        if not ttft_s:
            return
        batch_ms = [t * 1000.0 for t in ttft_s]
        if max(batch_ms) > 2.0 * self._target_ms:
            self.stats.emergencies += 1
            self._set(self._policy.admission_batch // 2)
            self._samples_ms.clear()
            self._batches = 0
            return
        self._samples_ms.extend(batch_ms)
        self._batches += 1
        if self._batches >= self._cfg.auto_tune_interval:
            self._end_interval()

    def _end_interval(self) -> None:
        p99_ms = percentile(self._samples_ms, 99.0)
        alpha = self._cfg.auto_tune_ema_alpha
        self._ema_ms = p99_ms if self._ema_ms is None else alpha * p99_ms + (1.0 - alpha) * self._ema_ms
        self._samples_ms.clear()
        self._batches = 0
        current = self._policy.admission_batch
        if self._ema_ms > self._target_ms:
            if self._set(current - 1) < 0:
                self.stats.downs += 1
        elif self._ema_ms < 0.7 * self._target_ms:
            if self._set(current + 1) > 0:
                self.stats.ups += 1

    def _set(self, n: int) -> int:
        """Clamp ``n`` into the bounds and apply it; return the change made."""
        old = self._policy.admission_batch
        new = min(self._max, max(self._min, n))
        if new != old:
            self._policy.set_admission_batch(new)
        return new - old


def make_auto_tuner(cfg: BatchingConfig, policy: AdmissionPolicy) -> AutoTuner | None:
    """An AutoTuner for ``policy`` when ``cfg.auto_tune`` is on, else None."""
    return AutoTuner(cfg, policy) if cfg.auto_tune else None
