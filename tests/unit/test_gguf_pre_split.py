"""The text split before BPE, per ``tokenizer.ggml.pre``, against llama.cpp's own regexes.

llama.cpp (src/llama-vocab.cpp, as vendored in llama-cpp-python 0.3.36) rewrites each
tokenizer's split as a regex its engine runs; those regexes are copied here, as the
reference, and run with the ``regex`` module. The pre-tokenizer built for each name
(workers/models/gguf_tokenizer.py, with ``tokenizers``) must cut every text at the same
places.
"""

from __future__ import annotations

import pytest
import regex

from workers.models.gguf_tokenizer import _pre_tokenizer, check_tokenizer
from workers.models.gguf_file import GGUFError

LLAMA_CPP = {
    "llama-bpe": r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "tekken": r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])"
              r"([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
TEXTS = [
    "Hello, world! It's 2024; we've 12345 apples and I'LL eat 7.",
    "  leading  spaces\tand\ttabs\n\n\nnewlines   \r\n end",
    "café naïve résumé Ångström 日本語のテキスト 中文 한국어",
    "def f(x):\n    return x**2  # comment ... !!! ???",
    "CamelCaseWords and HTTPServer2Go, path/to/file.py\n/",
    "emoji 🙂🚀👍🏽 ok, ½ ² Ⅻ",
]


def _bytes_to_text(piece: str) -> str:
    """Undo the byte-level alphabet of a pre-tokenized piece."""
    from tokenizers import decoders

    return str(decoders.ByteLevel().decode([piece]))


@pytest.mark.parametrize("pre", list(LLAMA_CPP))
def test_split_equals_llama_cpp(pre: str) -> None:
    splitter = _pre_tokenizer(pre)
    for text in TEXTS:
        ours = [_bytes_to_text(piece) for piece, _ in splitter.pre_tokenize_str(text)]
        want = [m.group(0) for m in regex.finditer(LLAMA_CPP[pre], text)]
        assert ours == want, (pre, text)


def test_an_unknown_pre_split_is_refused_by_name() -> None:
    check_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"})
    with pytest.raises(GGUFError, match="tokenizer pre-split 'deepseek-v3' is not supported"):
        check_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-v3"})
