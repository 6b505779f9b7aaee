"""Unit tests for the worker's side of the decoding controls: checks before queueing, n, logprobs.

The scripted fake engine of test_worker_session (completion i of a request ends i tokens
before max_tokens); a fake clock, and a compile pool whose tasks run when the test says.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future
from typing import Any, Callable

import pytest

from actors.protocol import Chunk, Done, Error
from tests.unit.test_worker_session import BAD_PATTERN, VOCAB, make_rig

pytestmark = pytest.mark.timeout(10)


class HeldPool(Executor):
    """An executor whose tasks run only when ``run_all`` is called."""

    def __init__(self) -> None:
        self.tasks: list[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.tasks.append((future, fn, args))
        return future

    def run_all(self) -> None:
        for future, fn, args in self.tasks:
            try:
                future.set_result(fn(*args))
            except Exception as exc:
                future.set_exception(exc)
        self.tasks = []


REFUSED = [
    ("tools", {"prompt": None, "messages": [{"role": "user", "content": "hi"}],
               "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("bias-past-vocab", {"logit_bias": {str(VOCAB): 1.0}}, f"logit_bias names token id {VOCAB}"),
    ("n-past-capacity", {"n": 5}, "decode_capacity=4"),
    ("bad-grammar", {"grammar": {"type": "regex", "pattern": BAD_PATTERN}}, "grammar: unclosed group"),
]


@pytest.mark.parametrize("fields, words", [(f, w) for _, f, w in REFUSED], ids=[i for i, _, _ in REFUSED])
def test_what_the_worker_cannot_honour_is_refused_before_queueing(fields: dict[str, Any], words: str) -> None:
    rig = make_rig()
    (err,) = rig.dispatch("b1", **fields)
    assert isinstance(err, Error) and err.code == "bad_request" and err.request_id == "b1"
    assert words in err.message
    assert not rig.session.in_flight and not rig.engine.inserted


def test_an_engine_without_controls_refuses_them_by_name() -> None:
    rig = make_rig()
    rig.engine.refuse = "a sharded group does not apply decoding controls yet"
    (err,) = rig.dispatch("b1", min_p=0.1)
    assert isinstance(err, Error) and err.message.startswith("generate: min_p: a sharded group")
    assert rig.dispatch("b2") == []  # a request without controls still runs
    assert isinstance(rig.run()[-1], Done)


def test_a_grammar_compiles_off_the_loop_before_the_request_queues() -> None:
    pool = HeldPool()
    rig = make_rig(compile_pool=pool)
    assert rig.dispatch("g1", grammar={"type": "regex", "pattern": "[a-z]+"}) == []
    assert rig.session.in_flight == 1 and not rig.session.waiting and rig.session.wait_s() is None
    assert rig.turn() == [] and not rig.engine.inserted  # still compiling: nothing admitted
    pool.run_all()
    assert rig.session.wait_s() == 0.0  # done: the loop admits at once
    rig.run()
    assert rig.engine.inserted == [["g1"]] and rig.engine.compiled == [{"type": "regex", "pattern": "[a-z]+"}]
    assert isinstance(rig.sent[-1], Done)


def test_a_grammar_that_fails_to_compile_in_the_pool_is_refused() -> None:
    pool = HeldPool()
    rig = make_rig(compile_pool=pool)
    rig.dispatch("g1", grammar={"type": "regex", "pattern": BAD_PATTERN})
    pool.run_all()
    (err,) = rig.turn()
    assert isinstance(err, Error) and err.code == "bad_request" and "unclosed group" in err.message
    assert not rig.session.in_flight and not rig.engine.inserted


def test_a_request_cancelled_while_compiling_ends_cancelled_and_never_runs() -> None:
    pool = HeldPool()
    rig = make_rig(compile_pool=pool)
    rig.dispatch("g1", grammar={"type": "json_object"}, stream=False)
    (done,) = rig.take(rig.session.cancel("g1"))
    assert isinstance(done, Done) and done.finish_reason == "cancelled"
    pool.run_all()
    assert rig.turn() == [] and not rig.engine.inserted and not rig.session.in_flight


def test_logprobs_are_prepared_and_reach_chunks_and_the_done() -> None:
    rig = make_rig()
    rig.dispatch("s1", logprobs=True, max_tokens=3)
    rig.dispatch("n1", logprobs=True, max_tokens=3, stream=False)
    rig.run()
    assert rig.engine.logprobs_prepared == 2
    chunks = [m for m in rig.sent if isinstance(m, Chunk) and m.request_id == "s1"]
    assert [e["token_id"] for c in chunks for e in c.logprobs or []] == [i for c in chunks for i in c.token_ids]
    (done,) = [m for m in rig.sent if isinstance(m, Done) and m.request_id == "n1"]
    assert done.logprobs is not None and [e["token_id"] for e in done.logprobs] == done.token_ids == [100, 101, 102]


def test_n_completions_take_n_slots_and_end_in_one_done_with_choices() -> None:
    rig = make_rig(capacity=4)
    rig.dispatch("a", n=3, max_tokens=4, stream=False)
    rig.dispatch("b", n=2, max_tokens=2)  # does not fit beside a's 3: waits for them
    rig.turn()
    assert rig.engine.inserted == [["a"]]
    rig.run()
    assert rig.engine.inserted == [["a"], ["b"]]
    done_a = next(m for m in rig.sent if isinstance(m, Done) and m.request_id == "a")
    assert done_a.usage["completion_tokens"] == 4 + 3 + 2
    assert done_a.choices == [
        {"index": 0, "finish_reason": "length", "completion_tokens": 4, "text": "w0 w1 w2 w3 ",
         "token_ids": [100, 101, 102, 103]},
        {"index": 1, "finish_reason": "length", "completion_tokens": 3, "text": "w0 w1 w2 ", "token_ids": [100, 101, 102]},
        {"index": 2, "finish_reason": "length", "completion_tokens": 2, "text": "w0 w1 ", "token_ids": [100, 101]}]
    assert done_a.text is None
    b_chunks = [m for m in rig.sent if isinstance(m, Chunk) and m.request_id == "b"]
    assert sorted((c.index, c.text_offset, c.text) for c in b_chunks) == [
        (0, 0, "w0 "), (0, 3, "w1 "), (1, 0, "w0 ")]
    assert len([m for m in rig.sent if isinstance(m, Done) and m.request_id == "b"]) == 1


def test_cancel_ends_all_n_completions_with_one_done() -> None:
    rig = make_rig(capacity=4)
    rig.dispatch("a", n=3, max_tokens=10, stream=False)
    rig.turn()
    rig.turn()
    msgs = rig.take(rig.session.cancel("a"))
    assert len(msgs) == 1 and isinstance(msgs[0], Done) and msgs[0].finish_reason == "cancelled"
    assert msgs[0].choices is not None and [c["finish_reason"] for c in msgs[0].choices] == ["cancelled"] * 3
    assert not rig.engine.seqs and not rig.session.in_flight
    rig.run()
    assert len([m for m in rig.sent if isinstance(m, Done)]) == 1
