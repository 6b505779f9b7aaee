"""The worker's two threads: MLX lets the I/O thread run during evaluation, and a worker
stuck in one long engine step keeps heartbeating and answers a cancel at once."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import pytest

from tests.integration.clients import RawClient, Tracker
from tests.integration.fleets import fleet_status, running_fleet, worker_row
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


class Spinner:
    """A Python thread that records when it runs: it makes progress only while it holds the GIL."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        while not self._stop.is_set():
            self.times.append(time.perf_counter())
            time.sleep(0.001)  # ask for the GIL back after each turn, as the I/O thread's poll does

    def __enter__(self) -> "Spinner":
        self._thread.start()
        while not self.times:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def turns_between(self, start_s: float, end_s: float) -> int:
        return sum(1 for t in self.times if start_s < t < end_s)


def _long_graph() -> Any:
    import mlx.core as mx

    a = mx.random.normal((1024, 1024))
    mx.eval(a)
    x = a
    for _ in range(24):
        x = (x @ a) / 1024.0
    return x


def _eval(x: Any) -> None:
    import mlx.core as mx

    mx.eval(x)


def _async_eval_then_item(x: Any) -> None:
    import mlx.core as mx

    y = x.sum()
    mx.async_eval(y)
    y.item()


# How the engine waits for MLX: BatchGenerator ends a step in .tolist(), generate_step in .item().
MLX_WAITS: dict[str, Callable[[Any], Any]] = {
    "mx.eval": _eval,
    "array.item": lambda x: x.sum().item(),
    "array.tolist": lambda x: x[0, :4].tolist(),
    "mx.async_eval then item": _async_eval_then_item,
}


@pytest.mark.parametrize("name", list(MLX_WAITS))
def test_mlx_releases_the_gil_while_it_evaluates(name: str) -> None:
    """Another Python thread keeps running during a long evaluation; if the call held the GIL it could not."""
    wait = MLX_WAITS[name]
    with Spinner() as spinner:
        graph = _long_graph()  # built lazily: the work happens inside the call below
        t0 = time.perf_counter()
        wait(graph)
        t1 = time.perf_counter()
    eval_s = t1 - t0
    assert eval_s >= 0.2, f"the evaluation took {eval_s:.3f}s: too short to tell"
    # The middle of the call, so neither the call's start nor its end can account for the turns.
    middle = spinner.turns_between(t0 + eval_s * 0.2, t1 - eval_s * 0.2)
    assert middle >= 10, f"{name}: the other thread ran {middle} times in {eval_s * 0.6:.2f}s of evaluation"


def test_a_long_prefill_step_lets_another_thread_run(demo_model: tuple[Any, Any]) -> None:
    """One real engine step (a whole long prompt prefilled at once) leaves the GIL to other threads."""
    from workers.engine.adapter import Engine, EngineRequest

    model, tokenizer = demo_model
    engine = Engine(model, tokenizer, prefill_step_size=4096, solo_fast_path=False)
    try:
        engine.insert([EngineRequest("long", [(i * 7) % 200 + 3 for i in range(3000)], 2)])
        with Spinner() as spinner:
            t0 = time.perf_counter()
            while engine.stats.last_batch_size == 0:  # the prefill step, then the first token
                engine.step()
            t1 = time.perf_counter()
        step_s = t1 - t0
        if step_s < 0.2:
            pytest.skip(f"the prefill took {step_s:.3f}s here: too short to tell")
        middle = spinner.turns_between(t0 + step_s * 0.2, t1 - step_s * 0.2)
        print(f"prefill of 3000 tokens: {step_s:.2f}s; the other thread ran {middle} times in its middle")
        assert middle >= 10, f"the other thread ran {middle} times in {step_s * 0.6:.2f}s of prefill"
    finally:
        engine.close()


BEATS: dict[str, Any] = {"heartbeat_interval_s": 0.5, "heartbeat_liveness": 4}
LIVENESS_S = 2.0  # dead after 2 s of silence: a fifth of the step, with room for a busy shared machine
STALL_S = 10.0


def generate_map(rid: str, *, max_tokens: int, stream: bool = True) -> dict[str, Any]:
    return {"type": "generate", "request_id": rid, "model": "demo", "prompt": f"Request {rid}: a story",
            "max_tokens": max_tokens, "stream": stream}


@pytest.mark.slow
def test_a_worker_held_in_one_step_heartbeats_and_answers_a_cancel_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 10 s engine step (fault switch) against a 2 s liveness: the worker is not declared dead,
    a cancel sent during the step is answered within 100 ms, and nothing of that request follows its done."""
    monkeypatch.setenv("MLX_FLEET_ENABLE_FAULTS", "1")
    monkeypatch.setenv("MLX_FLEET_FAULTS", f"stall_step_s={STALL_S},stall_at_step=1")
    with running_fleet(models=(("demo", "demo", 1),), **BEATS) as fleet:
        addr = fleet.cfg.frontend
        pid = fleet.child("worker:demo-0").process.pid
        raw = RawClient(addr)
        tracker = Tracker(raw, ["held", "after"])
        try:
            raw.send(generate_map("held", max_tokens=8))

            def in_long_step() -> dict[str, Any] | None:
                row = worker_row(fleet_status(addr), "demo-0")
                return row if row is not None and row["step_elapsed_s"] >= 1.0 else None

            row = wait_for(in_long_step, timeout_s=20, what="the worker's heartbeats reporting a long step")
            stall_began_s = time.monotonic() - row["step_elapsed_s"]
            t_cancel = time.monotonic()
            raw.send({"type": "cancel", "request_id": "held"})
            while not tracker.terminals["held"]:
                assert time.monotonic() - t_cancel < 5.0, "no answer to the cancel"
                tracker.pump(0.01)
            answer_s = time.monotonic() - t_cancel
            (done,) = tracker.terminals["held"]
            assert done["type"] == "done" and done["finish_reason"] == "cancelled", done
            assert done["usage"]["prompt_tokens"] > 0 and done["usage"]["completion_tokens"] == 0, done
            print(f"cancel during a {STALL_S:g}s step answered after {answer_s * 1000:.1f} ms")
            assert answer_s <= 0.1, f"cancel answered after {answer_s * 1000:.0f} ms"

            # Through the rest of the step: registered, heard from within the liveness, step time growing.
            seen: list[float] = []
            while time.monotonic() - stall_began_s < STALL_S + 0.5:
                status = fleet_status(addr)
                row = worker_row(status, "demo-0")
                assert status["counters"]["workers_lost"] == 0 and row is not None and row["state"] == "ready", status
                assert row["last_seen_s"] < LIVENESS_S, row
                seen.append(row["step_elapsed_s"])
                tracker.pump(0.2)
            assert max(seen) >= STALL_S - 1.0, seen

            raw.send(generate_map("after", max_tokens=4))
            wait_for(lambda: (tracker.pump(), bool(tracker.terminals["after"]))[1], timeout_s=30,
                     what="a request served after the long step")
            tracker.settle()
            assert tracker.terminals["after"][0]["type"] == "done"
            assert len(tracker.terminals["held"]) == 1 and tracker.chunks["held"] == 0  # nothing after its done
            status = fleet_status(addr)
            assert status["counters"]["workers_lost"] == 0 and status["requests"] == 0
            assert fleet.child("worker:demo-0").process.pid == pid
        finally:
            raw.close()


HOG_S = 30.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_no_healthy_worker_is_declared_dead_beside_two_cpu_hogs() -> None:
    """Two busy processes beside a loaded fleet (default heartbeats, 1 s x 5) for 30 s (six times the 5 s a worker may be silent): no worker is lost."""
    import subprocess
    import sys

    from mlx_fleet.client import Client, FleetError

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        with running_fleet(models=(("demo", "demo", 2),)) as fleet:
            addr = fleet.cfg.frontend
            outcomes: dict[str, int] = {}
            lock = threading.Lock()
            deadline_s = time.monotonic() + HOG_S

            def client_loop(n: int) -> None:
                with Client(addr, timeout_s=60) as client:
                    i = 0
                    while time.monotonic() < deadline_s:
                        prompt = f"client {n} request {i}: tell a story"
                        try:
                            if i % 2:
                                key = client.generate(prompt, model="demo", max_tokens=48).finish_reason
                            else:
                                stream = client.stream(prompt, model="demo", max_tokens=48)
                                for _ in stream:
                                    pass
                                assert stream.completion is not None
                                key = stream.completion.finish_reason
                        except FleetError as exc:
                            key = exc.code
                        except Exception as exc:  # counted, so the test fails with it
                            key = f"{type(exc).__name__}: {exc}"
                        with lock:
                            outcomes[key] = outcomes.get(key, 0) + 1
                        i += 1

            threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(HOG_S + 90)
                assert not t.is_alive(), "a client did not finish"
            status = fleet_status(addr)
            print(f"beside two CPU hogs for {HOG_S:g}s: {outcomes}; counters {status['counters']}")
            assert status["counters"]["workers_lost"] == 0, status["recent_worker_losses"]
            assert set(outcomes) <= {"stop", "length"}, outcomes
            assert sum(outcomes.values()) >= 20, outcomes  # the fleet was under load throughout
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(10)


def test_the_loop_hands_over_its_last_output_before_it_waits() -> None:
    """With a 30 s heartbeat interval, a request's done must not wait for the idle loop's next wake-up."""
    from mlx_fleet.client import Client

    with running_fleet(models=(("demo", "demo", 1),), heartbeat_interval_s=30.0, heartbeat_liveness=5) as fleet:
        with Client(fleet.cfg.frontend, timeout_s=60) as client:
            for stream in (True, False):
                t0 = time.monotonic()
                if stream:
                    s = client.stream("hello", model="demo", max_tokens=4)
                    for _ in s:
                        pass
                else:
                    client.generate("hello", model="demo", max_tokens=4)
                assert time.monotonic() - t0 < 10.0, "the last output waited for the loop's idle wake-up"
