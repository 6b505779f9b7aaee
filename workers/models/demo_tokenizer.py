"""Byte-level BPE tokenizer for the built-in demo model.

The tokenizer is trained at build time on ``workers/models/data/corpus.txt``, which ships with
the package. Training with the ``tokenizers`` library is deterministic for a given corpus
and library version, so the same ``tokenizer.json`` bytes come out every time.

The files written here are the ones a downloaded Hugging Face model carries
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``), so
``transformers.AutoTokenizer`` and ``mlx_lm.load`` read them with no special casing.
This module does not import ``mlx``.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"

# Order fixes the ids: BOS is 0 and EOS is 1.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
BOS_TOKEN_ID = 0
EOS_TOKEN_ID = 1

VOCAB_SIZE = 2048
# Pairs seen once are noise in a ~40 KB corpus; the vocab still fills to VOCAB_SIZE.
MIN_PAIR_FREQUENCY = 2
MODEL_MAX_LENGTH_TOKENS = 4096

# Each turn is "<|role|>\n{content}<|eos|>\n"; EOS doubles as end of turn so that
# generation stops when the assistant's turn ends.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role: ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ eos_token ~ '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

_CORPUS_PACKAGE = "workers.models"
_CORPUS_NAME = "corpus.txt"


def read_corpus_text() -> str:
    """Return the bundled training corpus, with line endings normalised to ``\\n``.

    Normalising keeps the corpus hash and the trained vocab the same on a checkout
    that converted line endings.
    """
    raw = resources.files(_CORPUS_PACKAGE).joinpath("data", _CORPUS_NAME).read_bytes()
    return raw.decode("utf-8").replace("\r\n", "\n")


def corpus_sha256() -> str:
    """Return the hex SHA-256 of the normalised corpus text."""
    return hashlib.sha256(read_corpus_text().encode("utf-8")).hexdigest()


def train_demo_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the demo byte-level BPE tokenizer on the bundled corpus.

    Every byte is in the initial alphabet, so any text encodes without an unknown
    token. Encoding a single sequence prepends ``<|bos|>``; decoding maps byte-level
    symbols back to UTF-8.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_PAIR_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    paragraphs = [p for p in read_corpus_text().split("\n\n") if p.strip()]
    tokenizer.train_from_iterator(paragraphs, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
    )
    # The ids are fixed by SPECIAL_TOKENS' order; a mismatch would break config.json.
    for token, want_id in ((BOS_TOKEN, BOS_TOKEN_ID), (EOS_TOKEN, EOS_TOKEN_ID)):
        if tokenizer.token_to_id(token) != want_id:
            raise RuntimeError(f"{token} got id {tokenizer.token_to_id(token)}, want {want_id}")
    return tokenizer


def widen_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> Tokenizer:
    """The trained tokenizer with merges of its own tokens' pairs appended until it holds ``vocab_size`` tokens.

    A large vocabulary (a Llama 3's 128k) for measuring what scales with it (logits,
    grammar masks) on a small model. Appended merges rank after the trained ones, so
    it is still a valid byte-level BPE; deterministic, like the training.
    """
    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges: list[list[str]] = data["model"]["merges"]
    specials = set(SPECIAL_TOKENS)
    base = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in specials]
    next_id = max(vocab.values()) + 1
    for left in base:
        for right in base:
            if next_id >= vocab_size:
                return Tokenizer.from_str(json.dumps(data))
            if left + right not in vocab:
                vocab[left + right] = next_id
                merges.append([left, right])
                next_id += 1
    raise ValueError(f"cannot widen a vocabulary of {len(base)} tokens to {vocab_size}")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, bytes]:
    """Return the tokenizer files of a model folder, name to exact bytes."""
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "model_max_length": MODEL_MAX_LENGTH_TOKENS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    special_tokens_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": [SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
    }
    return {
        "tokenizer.json": (tokenizer.to_str(pretty=True) + "\n").encode("utf-8"),
        "tokenizer_config.json": _json_bytes(tokenizer_config),
        "special_tokens_map.json": _json_bytes(special_tokens_map),
    }
