"""Unit tests for workers.engine.grammar: compiling, the reasoning gate, parallel mask fills. No MLX.

llguidance over the demo model's tokenizer (trained here from the bundled corpus).
"""

from __future__ import annotations

import llguidance
import numpy as np
import pytest

from workers.engine.grammar import Grammar, GrammarError, MaskFiller, ThinkMarkers, grammar_text
from workers.models import demo_tokenizer as dtok

pytestmark = pytest.mark.timeout(60)

START, END = 2, 3  # two special tokens of the demo vocabulary, standing in for <think> and </think>
VOCAB = 2048 + 32  # logits wider than the tokenizer, as some models' are


@pytest.fixture(scope="module")
def tok() -> tuple[llguidance.LLTokenizer, dtok.Tokenizer]:
    trained = dtok.train_demo_tokenizer()
    return llguidance.LLTokenizer(trained.to_str(), n_vocab=VOCAB, eos_token=[dtok.EOS_TOKEN_ID]), trained


def compiled(tok: tuple[llguidance.LLTokenizer, dtok.Tokenizer], spec: dict, think: ThinkMarkers | None = None) -> Grammar:
    matcher = llguidance.LLMatcher(tok[0], grammar_text(spec), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return Grammar(matcher, think)


def allowed(mask_row: np.ndarray) -> set[int]:
    bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")
    return {int(i) for i in np.nonzero(bits)[0]}


def encode(tok: tuple[llguidance.LLTokenizer, dtok.Tokenizer], text: str) -> list[int]:
    return list(tok[1].encode(text, add_special_tokens=False).ids)


def test_a_choice_allows_only_its_strings_then_only_eos(tok: tuple[llguidance.LLTokenizer, dtok.Tokenizer]) -> None:
    g = compiled(tok, {"type": "choice", "choices": ["yes", "no"]})
    state = g.start([])
    filler = MaskFiller(VOCAB)
    first = allowed(filler.fill([state])[0])
    assert first and all(t < 2048 for t in first) and dtok.EOS_TOKEN_ID not in first
    for t in encode(tok, "yes"):
        state.consume(t)
    assert state.done and state.output_matches()
    assert allowed(filler.fill([state])[0]) == {dtok.EOS_TOKEN_ID}


def test_rows_are_filled_together_each_from_its_own_state(tok: tuple[llguidance.LLTokenizer, dtok.Tokenizer]) -> None:
    g = compiled(tok, {"type": "regex", "pattern": "[0-9]+"})
    a, b = g.start([]), g.start([])
    for t in encode(tok, "12"):
        b.consume(t)
    mask = MaskFiller(VOCAB).fill([a, b])
    assert dtok.EOS_TOKEN_ID not in allowed(mask[0]) and dtok.EOS_TOKEN_ID in allowed(mask[1])


def test_reasoning_opened_in_the_prompt_is_free_until_it_closes(tok: tuple[llguidance.LLTokenizer, dtok.Tokenizer]) -> None:
    g = compiled(tok, {"type": "choice", "choices": ["yes"]}, ThinkMarkers((START,), (END,)))
    state = g.start([0, START, 100])  # the prompt opened a block and did not close it
    filler = MaskFiller(VOCAB)
    assert len(allowed(filler.fill([state])[0])) == VOCAB  # unconstrained
    for t in encode(tok, "anything at all"):
        state.consume(t)
    assert not state.constrained
    state.consume(END)
    assert state.constrained and allowed(filler.fill([state])[0]) == set(encode(tok, "yes")[:1])


def test_a_first_token_may_open_reasoning_and_then_the_grammar_waits(tok: tuple[llguidance.LLTokenizer,
                                                                                    dtok.Tokenizer]) -> None:
    g = compiled(tok, {"type": "choice", "choices": ["yes"]}, ThinkMarkers((START,), (END,)))
    filler = MaskFiller(VOCAB)
    state = g.start([0, START, 100, END])  # a closed block in the prompt: the grammar, or a new block
    assert allowed(filler.fill([state])[0]) == {START, *encode(tok, "yes")[:1]}
    state.consume(START)
    assert not state.constrained
    state.consume(END)
    assert allowed(filler.fill([state])[0]) == set(encode(tok, "yes")[:1])
    direct = g.start([])
    direct.consume(encode(tok, "yes")[0])  # no block: the grammar from the first token
    assert direct.constrained and not direct.may_think


@pytest.mark.parametrize("spec", [{"type": "regex", "pattern": "(["}, {"type": "lark", "grammar": "start: nope"},
                                  {"type": "json_schema", "schema": {"type": "nope"}}])
def test_what_llguidance_refuses_is_an_error_with_its_message(tok: tuple[llguidance.LLTokenizer, dtok.Tokenizer],
                                                               spec: dict) -> None:
    try:
        text = grammar_text(spec)
    except GrammarError as exc:
        assert str(exc)
        return
    matcher = llguidance.LLMatcher(tok[0], text, log_level=0)
    assert matcher.is_error() and matcher.get_error()


def test_the_dense_mask_allows_everything_on_rows_without_a_grammar() -> None:
    filler = MaskFiller(40)
    packed = np.zeros((1, 2), dtype=np.int32)
    packed[0, 0] = 0b101  # tokens 0 and 2
    packed.view(np.uint32)[0, 1] = np.uint32(1 << 31)  # token 63: past the width of 40
    dense = filler.dense(packed, [1], 3, 40)
    assert dense.shape == (3, 40) and dense[0].all() and dense[2].all()
    assert set(np.nonzero(dense[1])[0]) == {0, 2}
    alone = filler.dense(packed, [0], 1, 40)
    assert set(np.nonzero(alone[0])[0]) == {0, 2}
