"""Prefix keys: chains of cumulative block hashes made from a request alone (actors/prefix_keys.py)."""

from __future__ import annotations

import pytest

from actors.prefix_keys import (
    BLOCK_CHARS, BLOCK_TOKENS, MAX_BLOCKS, entry_keys, matched_blocks, message_keys, prompt_keys, text_keys, token_keys,
)

pytestmark = pytest.mark.timeout(30)

SYSTEM = {"role": "system", "content": "You are a helpful assistant. " * 5}  # 145 characters: two whole blocks


def test_token_prompts_have_a_key_every_block_and_share_their_common_prefix() -> None:
    a = list(range(100))
    b = list(range(40)) + [999] * 60
    ka, kb = token_keys(a), token_keys(b)
    assert len(ka) == 100 // BLOCK_TOKENS == 6
    assert ka[:2] == kb[:2] and ka[2] != kb[2]  # 40 shared tokens: two whole blocks
    assert token_keys(a[:15]) == []  # a partial block has no key


def test_text_prompts_have_a_key_every_block_of_characters() -> None:
    text = "x" * (3 * BLOCK_CHARS + 10)
    assert len(text_keys(text)) == 3
    assert text_keys(text)[:2] == text_keys("x" * (2 * BLOCK_CHARS) + "y" * BLOCK_CHARS)[:2]
    assert text_keys(text)[2] != text_keys("x" * (2 * BLOCK_CHARS) + "y" * BLOCK_CHARS)[2]


def test_messages_key_each_message_chained_and_blocks_inside_long_ones() -> None:
    turn1 = [SYSTEM, {"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    k1, k2 = message_keys(turn1), message_keys(turn2)
    assert len(k1) == 1 + 2 + 1  # the system message's two inner blocks and its end, the user's end
    assert k2[: len(k1)] == k1 and len(k2) == len(k1) + 2
    # The same content under another role, or after another history, is another key.
    assert message_keys([{"role": "user", "content": "hi"}]) != message_keys([{"role": "system", "content": "hi"}])
    assert message_keys([SYSTEM, {"role": "user", "content": "hi"}])[-1] != message_keys(
        [{"role": "system", "content": "other"}, {"role": "user", "content": "hi"}])[-1]
    # Two long user messages that begin alike share the inner blocks of that beginning.
    doc = "d" * (2 * BLOCK_CHARS)
    qa, qb = message_keys([{"role": "user", "content": doc + "question A"}]), message_keys(
        [{"role": "user", "content": doc + "question B"}])
    assert qa[:2] == qb[:2] and qa[2] != qb[2]


def test_the_forms_never_match_each_other() -> None:
    text = "a" * BLOCK_CHARS
    assert set(text_keys(text)).isdisjoint(message_keys([{"role": "user", "content": text}]))
    assert set(text_keys(text)).isdisjoint(token_keys([97] * BLOCK_TOKENS))


def test_an_entrys_keys_extend_its_prompt_as_the_next_turn_sends_it() -> None:
    turn1 = [SYSTEM, {"role": "user", "content": "hi"}]
    stored = entry_keys(None, turn1, None, answer_text="hello there", answer_tokens=[5, 6])
    turn2 = [*turn1, {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "and?"}]
    assert matched_blocks(prompt_keys(None, turn2, None), set(stored)) == len(stored)
    tokens = list(range(20))
    stored_tokens = entry_keys(None, None, tokens, answer_text="", answer_tokens=list(range(20, 40)))
    assert stored_tokens == token_keys(list(range(40)))
    assert entry_keys("ab" * 40, None, None, answer_text="c" * 60, answer_tokens=[]) == text_keys("ab" * 40 + "c" * 60)


def test_matched_blocks_is_the_longest_run_held() -> None:
    keys = token_keys(list(range(16 * 10)))
    assert matched_blocks(keys, set(keys[:4])) == 4
    assert matched_blocks(keys, set(keys)) == 10
    assert matched_blocks(keys, set()) == 0
    assert matched_blocks([], set(keys)) == 0


def test_keys_are_bounded_and_fit_a_signed_64_bit_integer() -> None:
    keys = text_keys("z" * (BLOCK_CHARS * (MAX_BLOCKS + 50)))
    assert len(keys) == MAX_BLOCKS
    assert all(0 <= k < 2**63 for k in keys)
    long_chat = [{"role": "user", "content": "w" * (BLOCK_CHARS * 300)}] * 4
    assert len(message_keys(long_chat)) == MAX_BLOCKS


def test_the_algorithm_as_docs_protocol_md_writes_it() -> None:
    """An implementation written from docs/protocol.md (Prefix keys) makes the same keys."""
    import hashlib
    import struct

    def h(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=8).digest()

    def step(d: bytes, *parts: bytes) -> bytes:
        return h(d + b"".join(struct.pack("<I", len(p)) + p for p in parts))

    def key(d: bytes) -> int:
        return int.from_bytes(d, "big") & (2**63 - 1)

    tokens = list(range(40))
    d, want = h(b"mlxf-prefix-tokens"), []
    for i in (0, 16):
        d = step(d, struct.pack("<16I", *tokens[i:i + 16]))
        want.append(key(d))
    assert token_keys(tokens) == want

    messages = [{"role": "system", "content": "s" * 70}, {"role": "user", "content": "hi"}]
    d, want = h(b"mlxf-prefix-messages"), []
    for m in messages:
        d = step(d, m["role"].encode())
        content = m["content"]
        whole = len(content) - len(content) % 64
        for i in range(0, whole, 64):
            d = step(d, content[i:i + 64].encode())
            want.append(key(d))
        d = step(d, content[whole:].encode(), b"\x00end")
        want.append(key(d))
    assert message_keys(messages) == want

    d = step(h(b"mlxf-prefix-text"), ("t" * 64).encode())
    assert text_keys("t" * 100) == [key(d)]
