"""Shared test set-up.

The test process loads the same BLAS as the workers (before anything imports
mlx), so in-process reference generations match served ones bit for bit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.blas import find_blas, preload_blas

preload_blas(find_blas(os.environ.get("MLX_FLEET_BLAS", "auto")))

# One model cache per test session, shared with every spawned worker via the env,
# and removed when the session ends.
_OWN_CACHE = None
if "MLX_FLEET_CACHE" not in os.environ:
    _OWN_CACHE = os.environ["MLX_FLEET_CACHE"] = tempfile.mkdtemp(prefix="mlxf-cache-")
# Fetched model files (SmolLM2's GGUF) outlive the session: fetched once per checkout.
os.environ.setdefault("MLX_FLEET_DOWNLOADS", str(Path(__file__).resolve().parents[1] / ".cache" / "downloads"))


@pytest.fixture(autouse=True)
def _mlx_lm_attention_between_tests() -> Iterator[None]:
    """``make_engine`` puts the worker's grouped decode attention into mlx-lm's model modules for the
    whole process (workers/engine/attention.py); undo it after each test, so that what a later test
    compares with mlx-lm in this process does not depend on the order the tests ran in."""
    yield
    from tests.integration.reference import restore_mlx_lm_attention

    restore_mlx_lm_attention()


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001 (pytest hook signature)
    """Remove the session's model cache."""
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_addoption(parser):
    """``--connect ADDR`` points tests/conformance at a running fleet instead of one it starts."""
    parser.addoption("--connect", action="store", default=None, metavar="ADDR",
                     help="run tests/conformance against the fleet at ADDR (e.g. tcp://127.0.0.1:5555)")
