"""Prefix keys: a prompt as a chain of cumulative block hashes, computed from the request alone.

The broker has no tokenizer, yet routes a request to the replica whose prompt cache holds the
longest prefix of it. Both sides therefore key prefixes by what a request carries, with this one
function set: a worker reports the keys of each prompt-cache entry it stores (its request's
prompt plus the answer it produced) and drops them when the entry is evicted; the broker computes
the keys of a new request and finds the replica holding the longest run of them.

Each key hashes everything before it, so holding key *i* means holding the whole prefix up to
block *i*; comparing keys compares prefixes. Blocks, by the form of the prompt:

- ``prompt_tokens``: every ``BLOCK_TOKENS`` token ids;
- ``messages``: one key at the end of each message (its role and content), chained, plus one
  every ``BLOCK_CHARS`` characters inside a long message, so two conversations that share a long
  message's beginning (a pasted document) share keys too;
- a text ``prompt``: every ``BLOCK_CHARS`` characters.

A partial last block has no key. Keys are 63-bit integers (BLAKE2b, 8 bytes, top bit cleared) so
they travel as plain msgpack integers; each form starts from its own seed, so a text prompt never
matches a chat. At most ``MAX_BLOCKS`` keys are made for one prompt: past that, prompts count as
equal (a prefix that long already decides the routing). The exact algorithm is in
docs/protocol.md, for workers written in other languages.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Sequence

BLOCK_TOKENS = 16
BLOCK_CHARS = 64  # about 16 tokens of English text
MAX_BLOCKS = 512
_MASK = (1 << 63) - 1
_SEED_TEXT, _SEED_MESSAGES, _SEED_TOKENS = b"mlxf-prefix-text", b"mlxf-prefix-messages", b"mlxf-prefix-tokens"


def _digest(prev: bytes, *parts: bytes) -> bytes:
    h = hashlib.blake2b(prev, digest_size=8)
    for part in parts:
        h.update(struct.pack("<I", len(part)))
        h.update(part)
    return h.digest()


def _key(digest: bytes) -> int:
    return int.from_bytes(digest, "big") & _MASK


class _Chain:
    """Cumulative digests, and the keys made so far (at most MAX_BLOCKS)."""

    def __init__(self, seed: bytes) -> None:
        self.digest = _digest(seed)
        self.keys: list[int] = []

    @property
    def full(self) -> bool:
        return len(self.keys) >= MAX_BLOCKS

    def add(self, *parts: bytes, key: bool = True) -> None:
        self.digest = _digest(self.digest, *parts)
        if key and not self.full:
            self.keys.append(_key(self.digest))


def _text_blocks(chain: _Chain, text: str) -> str:
    """Key every whole BLOCK_CHARS of ``text``; return what is left over (under one block)."""
    whole = len(text) - len(text) % BLOCK_CHARS
    for start in range(0, whole, BLOCK_CHARS):
        if chain.full:
            return ""
        chain.add(text[start:start + BLOCK_CHARS].encode("utf-8"))
    return text[whole:]


def text_keys(text: str) -> list[int]:
    """The keys of a text prompt (or of a prompt and its answer, concatenated)."""
    chain = _Chain(_SEED_TEXT)
    _text_blocks(chain, text)
    return chain.keys


def message_keys(messages: Sequence[dict[str, Any]]) -> list[int]:
    """The keys of chat messages: blocks inside each long message, and one at each message's end."""
    chain = _Chain(_SEED_MESSAGES)
    for message in messages:
        if chain.full:
            break
        chain.add(str(message.get("role", "")).encode("utf-8"), key=False)
        rest = _text_blocks(chain, str(message.get("content", "")))
        chain.add(rest.encode("utf-8"), b"\x00end")
    return chain.keys


def token_keys(tokens: Sequence[int]) -> list[int]:
    """The keys of token ids: one every BLOCK_TOKENS."""
    chain = _Chain(_SEED_TOKENS)
    for start in range(0, len(tokens) - len(tokens) % BLOCK_TOKENS, BLOCK_TOKENS):
        if chain.full:
            break
        chain.add(struct.pack(f"<{BLOCK_TOKENS}I", *(t & 0xFFFFFFFF for t in tokens[start:start + BLOCK_TOKENS])))
    return chain.keys


def prompt_keys(prompt: str | None, messages: Sequence[dict[str, Any]] | None,
                prompt_tokens: Sequence[int] | None) -> list[int]:
    """The keys of a request's prompt, whichever form it has (the first given of tokens, messages, text)."""
    if prompt_tokens is not None:
        return token_keys(prompt_tokens)
    if messages is not None:
        return message_keys(messages)
    return text_keys(prompt or "")


def entry_keys(prompt: str | None, messages: Sequence[dict[str, Any]] | None, prompt_tokens: Sequence[int] | None,
               *, answer_text: str, answer_tokens: Sequence[int]) -> list[int]:
    """The keys of a finished request's prompt-cache entry: its prompt followed by its answer.

    The answer extends the prompt as the next request of the same conversation would send it:
    token ids after token ids, an ``assistant`` message after the messages, text after text.
    """
    if prompt_tokens is not None:
        return token_keys([*prompt_tokens, *answer_tokens])
    if messages is not None:
        return message_keys([*messages, {"role": "assistant", "content": answer_text}])
    return text_keys((prompt or "") + answer_text)


def matched_blocks(keys: Sequence[int], held: Any) -> int:
    """How many leading ``keys`` are in ``held`` (a set of keys).

    Keys are cumulative, so a holder of key *i* holds every key before it: a binary search
    finds the last one held.
    """
    lo, hi = 0, len(keys)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if keys[mid - 1] in held:
            lo = mid
        else:
            hi = mid - 1
    return lo
