"""The vertical slice: one model served end to end, over ipc:// and tcp://."""

from __future__ import annotations

import asyncio

import pytest

from mlx_fleet.client import AsyncClient, Client, FleetError
from tests.integration.clients import TAG, RawClient, pack
from tests.integration.fleets import start_fleet
from tests.integration.reference import greedy_reference

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PROMPTS = ["Hello", "The weather today is", "Tell me about queues and workers.", "é ü € 日本"]


def reference_greedy(prompt: str | list[dict], max_tokens: int) -> tuple[list[int], str]:
    """In-process mlx-lm, greedy: the token ids and text a served request must match."""
    from mlx_lm import load

    from workers.models.demo_model import ensure_demo_model

    model, tokenizer = load(str(ensure_demo_model("demo")))
    if isinstance(prompt, list):
        prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    return greedy_reference(model, tokenizer, prompt, max_tokens)


@pytest.fixture(scope="module", params=["ipc", pytest.param("tcp", marks=pytest.mark.slow)])  # tcp: conformance, documented
def fleet(request):
    f = start_fleet(transport=request.param)
    yield f
    f.stop()


def test_greedy_matches_in_process_mlx_lm(fleet):
    with Client(fleet.cfg.frontend, timeout_s=60) as client:
        for prompt in PROMPTS:
            want_ids, want_text = reference_greedy(prompt, 24)
            got = client.generate(prompt, model="demo", max_tokens=24)
            assert got.token_ids == want_ids, prompt
            assert got.text == want_text
            assert got.finish_reason in ("stop", "length")
            assert got.usage["completion_tokens"] >= len(got.token_ids)
            assert 0 <= got.timings["queue_s"] <= got.timings["ttft_s"] <= got.timings["total_s"]


def test_chat_messages_use_the_template(fleet):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    want_ids, _ = reference_greedy(messages, 16)
    with Client(fleet.cfg.frontend, timeout_s=60) as client:
        got = client.generate(model="demo", messages=messages, max_tokens=16)
    assert got.token_ids == want_ids


def test_stream_yields_chunks_that_add_up(fleet):
    with Client(fleet.cfg.frontend, timeout_s=60) as client:
        stream = client.stream("Hello", model="demo", max_tokens=20)
        chunks = list(stream)
        full = client.generate("Hello", model="demo", max_tokens=20)
    assert stream.completion is not None
    assert "".join(c.text for c in chunks) == full.text == stream.completion.text
    assert [t for c in chunks for t in c.token_ids] == full.token_ids
    assert all(len(c.token_ids) >= 1 for c in chunks)


def test_length_stop_strings_and_seed(fleet):
    with Client(fleet.cfg.frontend, timeout_s=60) as client:
        done = client.generate("Hello", model="demo", max_tokens=5)
        assert done.finish_reason == "length" and len(done.token_ids) == 5
        base = client.generate("Hello", model="demo", max_tokens=30)
        stop = base.text[5:8]
        if stop.strip():
            cut = client.generate("Hello", model="demo", max_tokens=30, stop=[stop])
            assert cut.finish_reason == "stop"
            assert cut.text == base.text[: base.text.index(stop)]
        a = client.generate("Hello", model="demo", max_tokens=12, temperature=0.9, seed=7)
        b = client.generate("Hello", model="demo", max_tokens=12, temperature=0.9, seed=7)
        assert a.token_ids == b.token_ids


def test_unknown_model_and_bad_requests_get_clear_errors(fleet):
    with Client(fleet.cfg.frontend, timeout_s=30) as client:
        with pytest.raises(FleetError) as info:
            client.generate("x", model="nope")
        assert info.value.code == "unknown_model"
        with pytest.raises(FleetError) as info:
            client.generate("x", model="demo", max_tokens=0)
        assert info.value.code == "bad_request"
        with pytest.raises(FleetError) as info:
            client.generate(model="demo", prompt_tokens=[10**8])
        assert info.value.code == "bad_request"
        assert client.generate("still fine", model="demo", max_tokens=3).finish_reason == "length"


def test_malformed_frames_get_bad_request_and_broker_keeps_serving(fleet):
    raw = RawClient(fleet.cfg.frontend)
    bad_messages = [
        [b"garbage"],
        [TAG, b"\xc1\xc1"],
        [TAG, pack({"type": "teleport"})],
        [TAG, pack({"type": "generate", "request_id": "r", "model": 5, "prompt": "x"})],
        [TAG, pack({"type": "generate", "request_id": "r", "model": "demo", "prompt": "x" * 1_000_001})],
    ]
    try:
        for frames in bad_messages:
            raw.send_frames(frames)
            reply = raw.recv(10.0)
            assert reply is not None, f"no reply to {frames[:1]}"
            assert reply["type"] == "error" and reply["code"] == "bad_request"
    finally:
        raw.close()
    with Client(fleet.cfg.frontend, timeout_s=30) as client:
        assert client.generate("ok", model="demo", max_tokens=3).token_ids


def test_models_and_status(fleet):
    with Client(fleet.cfg.frontend, timeout_s=30) as client:
        models = client.models()
        status = client.status()
    assert [m["name"] for m in models] == ["demo"]
    (worker,) = status["models"]["demo"]["workers"]
    assert worker["info"]["blas"]["name"] in ("openblas", "mkl", "reference", "custom")


def test_async_client_concurrent_requests(fleet):
    async def main() -> list:
        async with AsyncClient(fleet.cfg.frontend, timeout_s=60) as client:
            return await asyncio.gather(*(client.generate(p, model="demo", max_tokens=10) for p in PROMPTS))

    results = asyncio.run(main())
    assert [len(r.token_ids) > 0 for r in results] == [True] * len(PROMPTS)


def test_client_times_out_with_no_broker():
    with Client("tcp://127.0.0.1:1", timeout_s=0.5) as client:
        with pytest.raises(FleetError) as info:
            client.generate("x", model="demo")
    assert info.value.code == "timeout"
