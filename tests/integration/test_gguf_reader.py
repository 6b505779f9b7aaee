"""workers/models/gguf_file.py: the ``gguf`` package's reader, faster, with errors that name file and tensor.

Its reading must equal the plain ``gguf.GGUFReader``'s on the same file (the reading
goes through an override of a private method, so a new ``gguf`` release that changed
it would fail here), and damaged files must fail with messages naming what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from workers.models.gguf_file import GGUFError, read_gguf

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _write(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_string("general.name", "tiny ☕")
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "ünï", ""])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.25, 0.0])
    w.add_array("tokenizer.ggml.token_type", [1, 3, 4, 6])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((4, 64)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(rng.standard_normal((64, 64)).astype(np.float32),
                                                             gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reads_what_the_plain_reader_reads(tmp_path: Path) -> None:
    import gguf

    path = _write(tmp_path / "tiny.gguf")
    plain = gguf.GGUFReader(path)
    ours = read_gguf(path)
    assert ours.version == 3
    want = {k: f.contents() for k, f in plain.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == want
    assert ours.metadata["tokenizer.ggml.tokens"] == ["a", "b", "ünï", ""]
    assert ours.metadata["tokenizer.ggml.token_type"] == [1, 3, 4, 6]
    assert [(t.name, t.dims, t.type_name, t.n_bytes) for t in ours.tensors] == \
        [(t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, int(t.n_bytes)) for t in plain.tensors]
    for a, b in zip(ours.tensors, plain.tensors):
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data))


def test_a_truncated_tensor_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.gguf")
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(GGUFError, match=r"t\.gguf: truncated or corrupt GGUF: tensor 'blk\.0\.attn_q\.weight' ends at byte"):
        read_gguf(path)


def test_a_truncated_header_fails_clearly(tmp_path: Path) -> None:
    path = _write(tmp_path / "h.gguf")
    os.truncate(path, 80)
    with pytest.raises(GGUFError, match=r"h\.gguf: truncated or corrupt GGUF"):
        read_gguf(path)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match=r"x\.gguf: not a GGUF file \(magic b'PK\\x03\\x04'"):
        read_gguf(tmp_path / "x.gguf")
    (tmp_path / "short.gguf").write_bytes(b"GGUF")
    with pytest.raises(GGUFError, match=r"short\.gguf: not a GGUF file \(4 bytes\)"):
        read_gguf(tmp_path / "short.gguf")
    with pytest.raises(GGUFError, match=r"missing\.gguf: cannot read"):
        read_gguf(tmp_path / "missing.gguf")
