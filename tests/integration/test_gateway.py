"""The OpenAI-compatible HTTP gateway against a live fleet, driven by the official `openai` package."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable

import openai
import pytest
from openai import OpenAI

from actors.config import BatchingConfig
from mlx_fleet.client import Client
from tests.integration.fleets import RunningFleet, make_config
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

API_KEY = "sekret-test-key"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
LONG_TOKENS = 4000  # far more than a test waits for: a finished request cannot pass for a cancelled one


def start(**kwargs: Any) -> RunningFleet:
    cfg, ipc_dir = make_config(gateway=True, **kwargs)
    return RunningFleet(cfg, ipc_dir).start()


def base_url(fleet: RunningFleet) -> str:
    return f"http://127.0.0.1:{fleet.cfg.http_port}"


def openai_client(fleet: RunningFleet, api_key: str = "unused", **kwargs: Any) -> OpenAI:
    kwargs.setdefault("timeout", 60.0)
    return OpenAI(base_url=base_url(fleet) + "/v1", api_key=api_key, max_retries=0, **kwargs)


def http(fleet: RunningFleet, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A raw HTTP call (for what the openai package cannot send); returns status and JSON."""
    req = urllib.request.Request(base_url(fleet) + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_until(fleet: RunningFleet, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 20.0) -> dict[str, Any]:
    """Poll the fleet's status until ``pred`` holds; returns that status."""
    last: dict[str, Any] = {}

    def met() -> dict[str, Any] | None:
        last["status"] = status = client.status()
        return status if pred(status) else None

    with Client(fleet.cfg.frontend, timeout_s=5) as client:
        return wait_for(met, timeout_s, "the fleet's status to meet the condition",
                        seen=lambda: last.get("status", {}).get("models"))


def in_flight(status: dict[str, Any], model: str = "demo") -> int:
    return sum(w["in_flight"] for w in status["models"][model]["workers"])


def idle(status: dict[str, Any]) -> bool:
    return status["requests"] == 0 and all(in_flight(status, m) == 0 for m in status["models"])


# ---- a plain fleet ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet():
    f = start()
    yield f
    f.stop()


def test_chat_matches_the_native_client(fleet):
    got = openai_client(fleet).chat.completions.create(model="demo", messages=MESSAGES, max_tokens=16, temperature=0)
    with Client(fleet.cfg.frontend, timeout_s=60) as client:
        want = client.generate(model="demo", messages=MESSAGES, max_tokens=16)
    (choice,) = got.choices
    assert got.object == "chat.completion" and got.model == "demo" and got.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == want.usage["prompt_tokens"]
    assert got.usage.completion_tokens == want.usage["completion_tokens"]
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completion_matches_the_native_client(fleet):
    got = openai_client(fleet).completions.create(model="demo", prompt="The weather today is", max_tokens=12, temperature=0)
    with Client(fleet.cfg.frontend, timeout_s=60) as client:
        want = client.generate("The weather today is", model="demo", max_tokens=12)
    assert got.object == "text_completion"
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 12


def test_chat_stream_adds_up_with_usage(fleet):
    oa = openai_client(fleet)
    full = oa.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=20, temperature=0)
    chunks = list(oa.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=20, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream(fleet):
    oa = openai_client(fleet)
    full = oa.completions.create(model="demo", prompt="Hello", max_tokens=15, temperature=0)
    chunks = list(oa.completions.create(model="demo", prompt="Hello", max_tokens=15, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(getattr(c, "usage", None) is None for c in chunks)


def test_stop_seed_and_token_prompts(fleet):
    oa = openai_client(fleet)
    base = oa.completions.create(model="demo", prompt="Hello", max_tokens=30, temperature=0).choices[0].text
    stop = base[5:8]
    if stop.strip():
        cut = oa.completions.create(model="demo", prompt="Hello", max_tokens=30, temperature=0, stop=stop).choices[0]
        assert cut.finish_reason == "stop" and cut.text == base[: base.index(stop)]
    a, b = (oa.completions.create(model="demo", prompt="Hello", max_tokens=12, temperature=0.9, seed=7).choices[0].text
            for _ in range(2))
    assert a == b
    with Client(fleet.cfg.frontend, timeout_s=60) as client:
        ids = client.generate("Hello", model="demo", max_tokens=4).token_ids
    got = oa.completions.create(model="demo", prompt=ids, max_tokens=4, temperature=0)
    assert got.usage.prompt_tokens == len(ids)


def test_models_list_and_health(fleet):
    oa = openai_client(fleet)
    assert [m.id for m in oa.models.list()] == ["demo"]
    assert oa.models.retrieve("demo").owned_by == "mlx-fleet"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("nope")
    status, body = http(fleet, "GET", "/health")
    assert status == 200 and body == {"status": "ok", "models": {"demo": {"workers_ready": 1}}}


def test_unknown_model_is_404(fleet):
    with pytest.raises(openai.NotFoundError) as info:
        openai_client(fleet).chat.completions.create(model="nope", messages=MESSAGES)
    assert info.value.status_code == 404
    assert (info.value.code, info.value.param, info.value.type) == ("model_not_found", "model", "invalid_request_error")


@pytest.mark.parametrize("fields, param", [
    ({"n": 17}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),
    # the demo model's template renders no tools and it has no tool format: refused by its worker
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"temperature": 3}, "temperature"),
    ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ({"extra_body": {"functions": [{"name": "f"}]}}, "functions"),
])
def test_unsupported_parameters_are_400(fleet, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        openai_client(fleet).chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4, **fields)
    assert info.value.status_code == 400 and info.value.param == param
    assert info.value.type == "invalid_request_error"


def test_malformed_bodies_and_routes(fleet):
    status, body = http(fleet, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = http(fleet, "POST", "/v1/completions", json.dumps({"model": "demo", "prompt": ["a", "b"]}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = http(fleet, "GET", "/v1/nothing")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = http(fleet, "GET", "/v1/chat/completions")
    assert status == 405


def test_disconnect_mid_stream_frees_the_slot(fleet):
    oa = openai_client(fleet)
    stream = oa.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=LONG_TOKENS, temperature=0, stream=True)
    got = [next(stream) for _ in range(4)]
    assert got[-1].choices[0].delta.content is not None
    wait_until(fleet, lambda s: in_flight(s) == 1)
    closed_s = time.monotonic()
    stream.close()
    status = wait_until(fleet, idle, timeout_s=5)  # finishing all LONG_TOKENS would take > 15 s
    assert time.monotonic() - closed_s < 5
    (worker,) = status["models"]["demo"]["workers"]
    assert worker["free"] == worker["capacity"]


def test_disconnect_while_waiting_for_a_non_streamed_answer_frees_the_slot(fleet):
    impatient = openai_client(fleet, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="demo", prompt="Hello", max_tokens=LONG_TOKENS, temperature=0)
    wait_until(fleet, idle, timeout_s=5)


def test_the_supervisor_restarts_a_dead_gateway(fleet):
    child = fleet.child("gateway")
    old_pid = child.process.pid
    child.process.kill()
    # OSError: the new gateway is not listening yet.
    wait_for(lambda: child.process.pid != old_pid and http(fleet, "GET", "/health")[0] == 200, 30,
             "the gateway to come back", ignoring=(OSError,))
    assert child.restarts == 1
    got = openai_client(fleet).completions.create(model="demo", prompt="Hello", max_tokens=3, temperature=0)
    assert got.usage.completion_tokens == 3


def test_worker_lost_mid_stream_is_an_in_band_error(fleet):
    """Last on this fleet: it kills the worker."""
    oa = openai_client(fleet)
    stream = oa.completions.create(model="demo", prompt="Hello", max_tokens=LONG_TOKENS, temperature=0, stream=True)
    next(stream)
    fleet.sup.request_stop()  # no restart: the supervisor's watcher stops watching
    fleet.child("worker:demo-0").process.kill()
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert info.value.code == "worker_lost"


# ---- a small, guarded fleet: capacity 1, queue of 1, a model with no replica, an API key -----------


@pytest.fixture(scope="module")
def tight():
    f = start(models=(("demo", "demo", 1), ("ghost", "demo", 0)), batching=BatchingConfig(decode_capacity=1),
              queue_limit=1, no_worker_timeout_s=0.5, api_key=API_KEY)
    yield f
    f.stop()


def test_api_key_is_required_except_for_health(tight):
    with pytest.raises(openai.AuthenticationError) as info:
        openai_client(tight, api_key="wrong").models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    status, body = http(tight, "GET", "/v1/models")
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    assert http(tight, "GET", "/health")[0] == 200
    assert sorted(m.id for m in openai_client(tight, API_KEY).models.list()) == ["demo", "ghost"]


def test_model_with_no_live_worker_is_503(tight):
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        openai_client(tight, API_KEY).chat.completions.create(model="ghost", messages=MESSAGES, max_tokens=4)
    assert info.value.status_code == 503 and info.value.code == "unavailable"
    assert time.monotonic() - started < 10


def test_queue_timeout_is_504_and_a_full_queue_is_429(tight):
    oa = openai_client(tight, API_KEY)
    busy = oa.completions.create(model="demo", prompt="Hello", max_tokens=LONG_TOKENS, temperature=0, stream=True)
    next(busy)  # the only slot is taken
    with pytest.raises(openai.APIStatusError) as info:
        oa.completions.create(model="demo", prompt="x", max_tokens=4, extra_body={"timeout_s": 0.3})
    assert info.value.status_code == 504 and info.value.code == "timeout"

    queued: dict[str, Any] = {}

    def wait_in_queue() -> None:
        # Headers come with the first token, so this blocks while it waits in the queue.
        s = oa.completions.create(model="demo", prompt="Hi", max_tokens=LONG_TOKENS, temperature=0, stream=True)
        queued["first"] = next(s)
        s.close()

    waiter = threading.Thread(target=wait_in_queue, daemon=True)
    waiter.start()
    wait_until(tight, lambda s: s["models"]["demo"]["queue_depth"] == 1)
    with pytest.raises(openai.RateLimitError) as info:
        oa.completions.create(model="demo", prompt="y", max_tokens=4)
    assert info.value.status_code == 429 and info.value.code == "overloaded"
    busy.close()  # frees the slot: the queued request runs, reads a token and disconnects
    waiter.join(30)
    assert "first" in queued
    wait_until(tight, idle, timeout_s=10)
