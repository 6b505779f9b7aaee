"""Fixtures shared by the integration tests: a short ipc:// folder, the demo model in-process, SmolLM2's file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.integration.fleets import short_ipc_dir


@pytest.fixture
def ipc_dir() -> Iterator[str]:
    """A fresh short /tmp folder for ``ipc://`` endpoints, removed after the test."""
    path = short_ipc_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_model() -> tuple[Any, Any]:
    """The ``demo`` model and tokenizer as a worker loads them (``workers.models.precision.load_model``), loaded once."""
    from workers.models.demo_model import ensure_demo_model
    from workers.models.precision import load_model

    return load_model(str(ensure_demo_model("demo")))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly written ``demo`` model folder (not the shared cache), written once."""
    from workers.models import demo_model as dm

    return dm.write_demo_model(tmp_path_factory.mktemp("demo") / "demo", "demo")


@pytest.fixture(scope="session")
def demo_loaded(demo_dir: Path) -> tuple[Any, Any]:
    """``demo_dir`` loaded with plain ``mlx_lm.load``."""
    from mlx_lm import load

    return load(str(demo_dir))


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    """SmolLM2's verified GGUF, fetched if absent; the test skips without network (fails under
    ``MLX_FLEET_REQUIRE_REAL_MODEL=1``, as in CI)."""
    from workers.models.smollm2 import FetchError, smollm2_gguf

    try:
        return smollm2_gguf(progress=print)
    except FetchError as exc:
        if os.environ.get("MLX_FLEET_REQUIRE_REAL_MODEL"):
            pytest.fail(f"MLX_FLEET_REQUIRE_REAL_MODEL is set and SmolLM2 is unavailable: {exc}")
        pytest.skip(f"SmolLM2 is unavailable here: {exc}")


@pytest.fixture(scope="session")
def demo_small_loaded() -> tuple[Any, Any]:
    """The ``demo-small`` model and tokenizer as a worker loads them, in this process (a greedy reference)."""
    from workers.models.demo_model import ensure_demo_model
    from workers.models.precision import load_model

    return load_model(str(ensure_demo_model("demo-small")))
