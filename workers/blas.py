"""Pick and preload an optimized BLAS for MLX's CPU backend (stdlib only; never imports mlx).

``libmlx.so`` in the ``mlx[cpu]`` wheel links a bundled netlib reference BLAS (~4-6 GFLOP/s
float32 GEMM) and imports ``cblas_sgemm`` & co. as unversioned symbols, so a library put in
the *global* symbol scope before ``import mlx.core`` wins. Measured (1024^3 float32 GEMM,
OpenBLAS): ``ctypes.CDLL(path, RTLD_GLOBAL)`` and ``LD_PRELOAD`` both give ~190 GFLOP/s.
In-process preloading is the primary mechanism; :func:`blas_env` gives the ``LD_PRELOAD``
form for child processes. Use ``preload_blas(find_blas(setting))`` first thing in a
spawned worker, then ``import mlx.core``.

Thread variables are read when the library initialises, so they are set before loading.
Workers of one fleet on one machine split its cores (:func:`share_threads`): N processes each
running a BLAS as wide as the machine oversubscribe it, and OpenBLAS threads spin while they
wait (two replicas of ``demo-small`` on 2 cores: +23% tok/s with one thread each).
``OPENBLAS_CORETYPE`` forces an OpenBLAS kernel family (AVX-512 EPYC: auto ``Cooperlake``
~190, ``Haswell`` ~160, ``Prescott`` ~60 GFLOP/s); set but empty, OpenBLAS prints "Core
not found" on stderr and autodetects.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BlasChoice", "blas_env", "describe_blas", "find_blas", "preload_blas", "setting_from_env", "share_threads",
           "usable_cpus"]

log = logging.getLogger(__name__)

ENV_SETTING = "MLX_FLEET_BLAS"
ENV_DIR = "MLX_FLEET_BLAS_DIR"
_NAMED = ("auto", "reference", "openblas", "mkl")
# Sonames OpenBLAS needs that a dpkg -x tree may carry but the system may lack (load order matters).
_DEP_SONAMES = ("libquadmath.so.0", "libgfortran.so.5")
_MAPS_MARKERS = ("libopenblas", "libmkl_rt", "mlx_cpu.libs/libblas", "libblas.so")


@dataclass(frozen=True)
class BlasChoice:
    """A BLAS library to use: ``name`` is openblas | mkl | reference | custom; ``path`` is the
    .so to preload (None for reference); ``source`` says how it was chosen
    (config | env | auto | fallback | platform); ``note`` explains fallbacks."""

    name: str
    path: str | None
    source: str
    note: str = ""


_loaded: BlasChoice | None = None  # what preload_blas put in this process
_handles: list[ctypes.CDLL] = []  # keep the handles alive for the process lifetime


def setting_from_env() -> str | None:
    """Return ``$MLX_FLEET_BLAS`` (stripped), or None when unset/empty. The caller decides
    precedence (CLI > env > config > default) and passes the winner to :func:`find_blas`."""
    return os.environ.get(ENV_SETTING, "").strip() or None


def _multiarch() -> str:
    machine = platform.machine().lower()
    return "aarch64-linux-gnu" if machine in ("aarch64", "arm64") else f"{machine}-linux-gnu"


def _fetched_dirs() -> list[Path]:
    """Folders scripts/fetch-openblas.sh may have filled, most specific first."""
    if os.environ.get(ENV_DIR):
        dirs = [Path(os.environ[ENV_DIR]).expanduser()]
    else:
        dirs = [Path(__file__).resolve().parent.parent / ".cache" / "blas", Path.cwd() / ".cache" / "blas"]
    dirs.append(Path.home() / ".cache" / "mlx-fleet" / "blas")
    return list(dict.fromkeys(dirs))  # dedupe, keep order


def _openblas_candidates() -> list[Path]:
    triplet = _multiarch()
    fetched = [d for root in _fetched_dirs() for d in (root / "usr/lib" / triplet, root)]
    system = [Path(d) for d in (f"/usr/lib/{triplet}", f"/lib/{triplet}", "/usr/lib64", "/usr/lib")]
    names = ("openblas-pthread/libopenblas.so.0", "libopenblas.so.0", "libopenblasp.so.0")
    return [d / n for d in fetched + system for n in names]  # fetched copies first


def _mkl_candidates() -> list[Path]:
    return [Path(sys.prefix) / "lib" / name for name in ("libmkl_rt.so.2", "libmkl_rt.so.3")]


def _first_file(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _name_for(path: Path) -> str:
    lowered = path.name.lower()
    return "openblas" if "openblas" in lowered else "mkl" if "mkl" in lowered else "custom"


def find_blas(setting: str = "auto", *, source: str | None = None) -> BlasChoice:
    """Resolve a BLAS setting to a :class:`BlasChoice`; never raises.

    ``setting`` is ``auto`` (fetched copy, then system OpenBLAS, then the PyPI ``mkl``
    wheel in ``sys.prefix/lib``), ``reference`` (keep the wheel's bundled BLAS, load
    nothing), ``openblas``, ``mkl``, or a path to a .so. ``source`` labels where the
    setting came from (default: ``auto`` for "auto", else ``config``). Anything not found
    logs a warning and yields the reference BLAS with ``source="fallback"``. Off Linux
    (macOS uses Accelerate/Metal) it always returns reference with ``source="platform"``.
    """
    raw = (setting or "auto").strip()
    key = raw.lower() if raw.lower() in _NAMED else raw
    src = source or ("auto" if key == "auto" else "config")
    if not sys.platform.startswith("linux"):
        return BlasChoice("reference", None, "platform", f"{sys.platform}: platform BLAS, nothing to load")
    if key == "reference":
        return BlasChoice("reference", None, src)

    def fallback(why: str) -> BlasChoice:
        # A specific request that fails deserves a warning; "auto" finding nothing is normal.
        level = logging.WARNING if key != "auto" else logging.INFO
        log.log(level, "BLAS setting %r: %s; using the reference BLAS", raw, why)
        return BlasChoice("reference", None, "fallback", why)

    if key in ("auto", "openblas"):
        hit = _first_file(_openblas_candidates())
        if hit is not None:
            return BlasChoice("openblas", str(hit), src)
    if key in ("auto", "mkl"):
        hit = _first_file(_mkl_candidates())
        if hit is not None:
            return BlasChoice("mkl", str(hit), src)
    if key in _NAMED:
        hint = "pip install mkl" if key == "mkl" else "run scripts/fetch-openblas.sh"
        return fallback(f"no {'optimized' if key == 'auto' else key} BLAS found ({hint})")
    path = Path(raw).expanduser()
    if not path.is_file():
        return fallback(f"{path} is not a file")
    return BlasChoice(_name_for(path), str(path.absolute()), src)


def _deps_for(lib: Path) -> list[Path]:
    """Runtime deps (libgfortran, libquadmath) shipped next to ``lib`` in a dpkg -x tree.

    Why: the dynamic loader does not search the extracted tree, but once a library with a
    given soname is loaded, later NEEDED lookups of that soname reuse it."""
    hits = (_first_file([lib.parent / soname, lib.parent.parent / soname]) for soname in _DEP_SONAMES)
    return [hit for hit in hits if hit is not None]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1


def share_threads(share: int, cpus: int | None = None) -> int | None:
    """BLAS threads for one of ``share`` worker processes on this machine: its part of the ``cpus``
    (at least 1); None for a worker alone, which keeps the library's default (every core)."""
    if share <= 1:
        return None
    return max(1, (usable_cpus() if cpus is None else cpus) // share)


def _set_thread_env(choice: BlasChoice, threads: int | None, env: MutableMapping[str, str]) -> None:
    """Fill BLAS threading variables in ``env`` without overriding what the user set."""
    if choice.name == "mkl":
        # Why: MKL's default OpenMP layer may pull libiomp5 and fight MLX's own threads.
        env.setdefault("MKL_THREADING_LAYER", "SEQUENTIAL")
    if threads is not None and threads > 0:
        var = "MKL_NUM_THREADS" if choice.name == "mkl" else "OPENBLAS_NUM_THREADS"
        env.setdefault(var, str(threads))


def preload_blas(choice: BlasChoice, threads: int | None = None) -> BlasChoice:
    """dlopen ``choice`` (and its bundled deps) with RTLD_GLOBAL; return what is in effect.

    Must run before ``mlx.core`` is imported: a later load has no effect (measured).
    Decision: if ``mlx.core`` is already imported, nothing is loaded, a warning is logged,
    and a reference choice with a ``note`` is returned (a serving process keeps running
    with a slow BLAS rather than crashing). A load failure (OSError) likewise falls back
    to reference. ``threads`` sets ``OPENBLAS_NUM_THREADS`` (``MKL_NUM_THREADS`` for MKL)
    unless already set. The first library loaded stays; later calls return it unchanged.
    """
    global _loaded
    if _loaded is not None and _loaded.path is not None:
        if choice.path != _loaded.path:  # the first library in the global scope wins anyway
            log.warning("BLAS: %s already preloaded; ignoring %s", _loaded.path, choice.path)
        return _loaded
    if choice.path is None:
        _loaded = choice
        return choice
    if "mlx.core" in sys.modules:
        note = f"mlx.core already imported; {choice.path} not loaded (call preload_blas first)"
        log.warning("BLAS: %s", note)
        _loaded = BlasChoice("reference", None, "fallback", note)
        return _loaded
    _set_thread_env(choice, threads, os.environ)  # read by the library's constructor: set first
    lib = Path(choice.path)
    try:
        for dep in _deps_for(lib):
            _handles.append(ctypes.CDLL(str(dep), mode=ctypes.RTLD_GLOBAL))
        _handles.append(ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL))
    except OSError as exc:
        log.warning("BLAS: loading %s failed (%s); using the reference BLAS", lib, exc)
        _loaded = BlasChoice("reference", None, "fallback", f"load failed: {exc}")
        return _loaded
    _loaded = choice
    log.info("BLAS: preloaded %s from %s (%s)", choice.name, choice.path, choice.source)
    return choice


def blas_env(
    choice: BlasChoice, threads: int | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment entries that make a *child* process use ``choice`` via ``LD_PRELOAD``.

    Merge the result into the child's environment (``{**os.environ, **blas_env(c)}``).
    Deps come first in ``LD_PRELOAD``; an existing ``LD_PRELOAD`` in ``base`` (default:
    ``os.environ``) is kept after ours. Also sets ``MLX_FLEET_BLAS`` so a Python child that
    calls :func:`preload_blas` picks the same library. Empty for reference/non-Linux.
    """
    if choice.path is None or not sys.platform.startswith("linux"):
        return {}
    base = os.environ if base is None else base
    libs = [str(p) for p in _deps_for(Path(choice.path))] + [choice.path]
    if base.get("LD_PRELOAD"):
        libs.append(base["LD_PRELOAD"])
    env = {k: base[k] for k in ("MKL_THREADING_LAYER", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in base}
    _set_thread_env(choice, threads, env)
    env.update({"LD_PRELOAD": ":".join(libs), ENV_SETTING: choice.path})
    return env


def _mapped_blas_libs() -> list[str]:
    """BLAS-looking libraries actually mapped into this process (Linux /proc only)."""
    try:
        rows = [line.split(maxsplit=5) for line in Path("/proc/self/maps").read_text().splitlines()]
    except OSError:
        return []
    return sorted({r[5] for r in rows if len(r) == 6 and any(m in r[5] for m in _MAPS_MARKERS)})


def describe_blas() -> dict[str, str | int | list[str] | None]:
    """Summary of the BLAS in this process for logs and the worker's ``ready`` message.

    ``name``/``path``/``source``/``note`` come from :func:`preload_blas`; if it never ran,
    from an OpenBLAS/MKL found mapped (e.g. via ``LD_PRELOAD``, source ``env``), else
    reference. ``mapped`` lists the BLAS libraries the OS really mapped; ``threads`` is
    the thread-count variable in effect, if any. Values are msgpack-friendly.
    """
    mapped = _mapped_blas_libs()
    choice = _loaded
    if choice is None:
        fast = [p for p in mapped if "libopenblas" in p or "libmkl_rt" in p]
        choice = (BlasChoice(_name_for(Path(fast[0])), fast[0], "env", "mapped without preload_blas")
                  if fast else BlasChoice("reference", None, "auto", "preload_blas not called"))
    threads = os.environ.get("MKL_NUM_THREADS" if choice.name == "mkl" else "OPENBLAS_NUM_THREADS", "")
    return {
        "name": choice.name,
        "path": choice.path,
        "source": choice.source,
        "note": choice.note,
        "threads": int(threads) if threads.isdigit() else None,
        "mapped": mapped,
    }
