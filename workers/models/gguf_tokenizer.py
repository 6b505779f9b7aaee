"""A Hugging Face tokenizer built from a GGUF file's vocabulary, merges and special tokens.

llama.cpp's converter stores one of two tokenizers, and this module rebuilds each
with the ``tokenizers`` library:

- a byte-level BPE (``tokenizer.ggml.model`` = ``gpt2``: SmolLM, Llama 3, Qwen 2/3) as its token
  strings, merge rules and token types, naming the text split before BPE with
  ``tokenizer.ggml.pre``;
- a SentencePiece BPE (``llama``: Llama 2, TinyLlama, Mistral, Phi 3, Gemma 3) as its pieces and their
  scores. There are no merge rules: SentencePiece merges the pair whose merged piece
  scores highest, so the rules are derived from the scores (:func:`spm_merges`), with
  byte fallback for characters outside the vocabulary and ``▁`` for spaces.

It writes the files ``mlx_lm.load`` reads: ``tokenizer.json``, ``tokenizer_config.json``
(with the chat template and the BOS, EOS and pad tokens) and ``special_tokens_map.json``.
Only the splitting rules known here are accepted; any other tokenizer is refused with
an error naming it, because a wrong split gives a model that serves nonsense. No MLX here.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from workers.models.gguf_file import GGUFError

# Token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The GPT-2 split, as in tokenizers' ByteLevel(use_regex=True).
_GPT2_FAMILY = ("gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion")
# Each digit on its own, then the GPT-2 split.
_DIGITS_FAMILY = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
# Llama 3's split: up to three digits together, case-insensitive contractions.
_LLAMA3_FAMILY = ("llama-bpe", "llama3")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen 2/3's split: Llama 3's with each digit on its own.
_QWEN2_FAMILY = ("qwen2", "deepseek-r1-qwen")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Mistral's Tekken (Nemo and later): words split at case changes, digits alone; whole-word
# vocabulary entries win over merges.
_TEKKEN_FAMILY = ("tekken",)
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {**{p: LLAMA3_SPLIT for p in _LLAMA3_FAMILY}, **{p: QWEN2_SPLIT for p in _QWEN2_FAMILY},
           **{p: TEKKEN_SPLIT for p in _TEKKEN_FAMILY}}
SUPPORTED_PRE = (*_GPT2_FAMILY, *_DIGITS_FAMILY, *_LLAMA3_FAMILY, *_QWEN2_FAMILY, *_TEKKEN_FAMILY)
SPACE = "\u2581"  # SentencePiece's stand-in for a space


def check_tokenizer(meta: Mapping[str, Any]) -> None:
    """Refuse, cheaply, a tokenizer :func:`build_tokenizer` would refuse (its kind and pre-split)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise GGUFError(f"tokenizer model {kind!r} is not supported (supported: 'gpt2', byte-level BPE; "
                        f"'llama', SentencePiece BPE)")
    if kind == "llama":
        return
    pre = str(meta.get("tokenizer.ggml.pre", "gpt-2"))
    if pre not in SUPPORTED_PRE:
        raise GGUFError(f"tokenizer pre-split {pre!r} is not supported (supported: {', '.join(SUPPORTED_PRE)})")


def _pre_tokenizer(pre: str) -> Any:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_FAMILY:
        return byte_level
    if pre in _DIGITS_FAMILY:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise AssertionError(pre)  # check_tokenizer refused it


def _ints(values: Any) -> list[int]:
    """A list of ints from a list or an array (``mx.load`` gives arrays)."""
    return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def _token_id(meta: Mapping[str, Any], key: str) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}_token_id")
    if value is None:
        return None
    return int(value.item() if hasattr(value, "item") else value)


def _flag(meta: Mapping[str, Any], key: str, default: bool) -> bool:
    value = meta.get(f"tokenizer.ggml.{key}")
    if value is None:
        return default
    return bool(value.item() if hasattr(value, "item") else value)


def _tokens_and_types(meta: Mapping[str, Any]) -> tuple[list[str], list[int]]:
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise GGUFError("the GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = _ints(meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    if len(types) != len(tokens):
        raise GGUFError(f"{len(types)} token types for {len(tokens)} tokens")
    return tokens, types


def _first_ids(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a repeated string keeps its first id, as llama.cpp does
    return vocab


def _merges(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for i, rule in enumerate(meta.get("tokenizer.ggml.merges") or []):
        left, sep, right = str(rule).partition(" ")
        if not sep or not left or not right:
            raise GGUFError(f"merge rule #{i} {rule!r} is not 'LEFT RIGHT'")
        merges.append((left, right))
    if not merges:
        raise GGUFError("the GGUF's BPE tokenizer has no merges (tokenizer.ggml.merges)")
    return merges


def spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """Merge rules that reproduce SentencePiece BPE: every split of a normal piece into two
    pieces of the vocabulary, ranked by the merged piece's score, highest first."""
    ids = _first_ids(tokens)
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for piece_id, piece in enumerate(tokens):
        if types[piece_id] not in (NORMAL, USER_DEFINED):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-float(scores[piece_id]), piece_id, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(meta: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer a GGUF's ``tokenizer.ggml.*`` metadata describes.

    Raises :class:`GGUFError` for a tokenizer model other than ``gpt2`` or ``llama``,
    or a pre-split this module does not know.
    """
    check_tokenizer(meta)
    tokens, types = _tokens_and_types(meta)
    if meta.get("tokenizer.ggml.model") == "llama":
        tokenizer = _sentencepiece_bpe(meta, tokens, types)
    else:
        pre = str(meta.get("tokenizer.ggml.pre", "gpt-2"))
        tokenizer = Tokenizer(models.BPE(vocab=_first_ids(tokens), merges=_merges(meta),
                                         ignore_merges=pre in _TEKKEN_FAMILY))
        tokenizer.pre_tokenizer = _pre_tokenizer(pre)
        tokenizer.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=t == CONTROL, normalized=False)
             for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
    tokenizer.add_tokens(added)
    tokenizer.post_processor = _post_processor(meta, tokens)
    return tokenizer


def _sentencepiece_bpe(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    found = meta.get("tokenizer.ggml.scores", [])
    scores = list(found.tolist() if hasattr(found, "tolist") else found)
    if len(scores) != len(tokens):
        raise GGUFError(f"{len(scores)} token scores for {len(tokens)} tokens (tokenizer.ggml.scores)")
    unk = _token_id(meta, "unknown")
    tokenizer = Tokenizer(models.BPE(vocab=_first_ids(tokens), merges=spm_merges(tokens, scores, types),
                                     unk_token=tokens[unk] if unk is not None else None, fuse_unk=True,
                                     byte_fallback=True))
    prefix = _flag(meta, "add_space_prefix", True)
    tokenizer.normalizer = normalizers.Sequence([*([normalizers.Prepend(SPACE)] if prefix else []),
                                                 normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    return tokenizer


def _add_bos_default(meta: Mapping[str, Any]) -> bool:
    # llama.cpp's default: SentencePiece models and Tekken start with BOS
    return meta.get("tokenizer.ggml.model") == "llama" or meta.get("tokenizer.ggml.pre") in _TEKKEN_FAMILY


def _post_processor(meta: Mapping[str, Any], tokens: Sequence[str]) -> Any:
    """BOS/EOS added around a single text when the GGUF says so."""
    bos, eos = _token_id(meta, "bos"), _token_id(meta, "eos")
    add_bos = _flag(meta, "add_bos_token", _add_bos_default(meta)) and bos is not None
    add_eos = _flag(meta, "add_eos_token", False) and eos is not None
    if not (add_bos or add_eos):
        return processors.ByteLevel(trim_offsets=False) if meta.get("tokenizer.ggml.model") == "gpt2" else None
    first = f"{tokens[bos]}:0 " if add_bos else ""  # type: ignore[index]
    last = f" {tokens[eos]}:0" if add_eos else ""  # type: ignore[index]
    specials = ([(tokens[bos], bos)] if add_bos else []) + ([(tokens[eos], eos)] if add_eos and eos != bos else [])  # type: ignore[index]
    return processors.TemplateProcessing(single=f"{first}$A:0{last}", pair=f"{first}$A:0{last} {first}$B:1{last}",
                                         special_tokens=specials)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def tokenizer_files(meta: Mapping[str, Any], *, model_max_length: int) -> dict[str, bytes]:
    """The tokenizer files of a model folder, name to bytes, from GGUF metadata."""
    tokenizer = build_tokenizer(meta)
    tokens = list(meta["tokenizer.ggml.tokens"])
    named = {key: tokens[i] for key in ("bos", "eos", "unknown", "padding")
             if (i := _token_id(meta, key)) is not None and 0 <= i < len(tokens)}
    if "eos" not in named:
        raise GGUFError("the GGUF names no end-of-sequence token (tokenizer.ggml.eos_token_id)")
    specials = {"bos_token": named.get("bos"), "eos_token": named["eos"],
                "pad_token": named.get("padding", named["eos"]), "unk_token": named.get("unknown")}
    specials = {k: v for k, v in specials.items() if v is not None}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", **specials,
        "add_bos_token": _flag(meta, "add_bos_token", _add_bos_default(meta)),
        "add_eos_token": _flag(meta, "add_eos_token", False),
        "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
    }
    if template := meta.get("tokenizer.chat_template"):
        config["chat_template"] = str(template)
    return {
        "tokenizer.json": (tokenizer.to_str(pretty=True) + "\n").encode("utf-8"),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(specials),
    }


def end_token_ids(meta: Mapping[str, Any]) -> list[int]:
    """Token ids that end generation: EOS, and the end-of-turn / end-of-message tokens when named."""
    ids = [i for key in ("eos", "eot", "eom") if (i := _token_id(meta, key)) is not None]
    return list(dict.fromkeys(ids))
