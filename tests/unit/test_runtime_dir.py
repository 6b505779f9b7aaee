"""Unit tests for the supervisor's runtime folders: each names its owner; stale ones are removed at start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from actors.control import OWNER_FILE, RUNTIME_PREFIX, clean_stale_runtime_dirs, make_runtime_dir

pytestmark = pytest.mark.timeout(10)

NO_SUCH_PID = 2**22 + 1  # above Linux's largest pid_max (and macOS's): never a running process


def folder(root: Path, name: str, owner: str | None) -> Path:
    path = root / name
    path.mkdir(mode=0o700)
    (path / "control").write_text("")
    if owner is not None:
        (path / OWNER_FILE).write_text(owner)
    return path


def test_a_new_runtime_folder_is_private_and_names_its_owner(tmp_path: Path) -> None:
    path = Path(make_runtime_dir(str(tmp_path)))
    assert path.name.startswith(RUNTIME_PREFIX) and path.parent == tmp_path
    assert path.stat().st_mode & 0o777 == 0o700
    assert int((path / OWNER_FILE).read_text()) == os.getpid()


def test_only_folders_whose_owner_is_gone_are_removed(tmp_path: Path) -> None:
    stale = folder(tmp_path, RUNTIME_PREFIX + "stale", str(NO_SUCH_PID))
    live = folder(tmp_path, RUNTIME_PREFIX + "live", str(os.getpid()))
    unowned = folder(tmp_path, RUNTIME_PREFIX + "new", None)  # being made now, or another version's
    garbage = folder(tmp_path, RUNTIME_PREFIX + "junk", "not a pid")
    other = folder(tmp_path, "someone-else", str(NO_SUCH_PID))
    target = folder(tmp_path, "target", str(NO_SUCH_PID))
    (tmp_path / (RUNTIME_PREFIX + "link")).symlink_to(target)
    assert clean_stale_runtime_dirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists()
    assert all(p.exists() for p in (live, unowned, garbage, other, target, tmp_path / (RUNTIME_PREFIX + "link")))
    assert clean_stale_runtime_dirs(str(tmp_path)) == []


def test_a_missing_root_is_not_an_error(tmp_path: Path) -> None:
    assert clean_stale_runtime_dirs(str(tmp_path / "absent")) == []
