"""A plain-Python byte-level BPE encoder, the tests' independent check of the GGUF tokenizer.

It reads nothing through MLX or the ``tokenizers`` library: the vocabulary and merges
come from :func:`workers.models.gguf_file.read_gguf`, the text split follows llama.cpp's
rules for the file's ``tokenizer.ggml.pre``, and merges apply by rank, lowest first.
Slow, and only meant for a handful of test strings.
"""

from __future__ import annotations

from typing import Sequence

import regex

GPT2_SPLIT = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
DIGIT = regex.compile(r"\p{N}")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ReferenceBPE:
    """Encode text with a GGUF's tokens and merges, the way llama.cpp does for 'gpt2' tokenizers."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], specials: Sequence[str], *, split_digits: bool) -> None:
        self.ids: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            self.ids.setdefault(tok, i)
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.specials = sorted(specials, key=len, reverse=True)
        self.split_digits = split_digits
        self.alphabet = byte_alphabet()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens in it are matched literally)."""
        out: list[int] = []
        pattern = "(" + "|".join(regex.escape(s) for s in self.specials) + ")"
        for part in regex.split(pattern, text) if self.specials else [text]:
            if part in self.specials:
                out.append(self.ids[part])
            elif part:
                for word in self._words(part):
                    out.extend(self.ids[sym] for sym in self._merge(word))
        return out

    def _words(self, text: str) -> list[str]:
        pieces = [text]
        if self.split_digits:
            pieces = [p for p in regex.split(r"(\p{N})", text) if p]
        return [w for piece in pieces for w in GPT2_SPLIT.findall(piece)]

    def _merge(self, word: str) -> list[str]:
        symbols = [self.alphabet[b] for b in word.encode("utf-8")]
        while len(symbols) > 1:
            pairs = [(self.ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
            ranked = [(r, i) for r, i in pairs if r is not None]
            if not ranked:
                break
            best = min(ranked)[0]
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and self.ranks.get((symbols[i], symbols[i + 1])) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols
