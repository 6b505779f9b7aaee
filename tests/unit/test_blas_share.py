"""How local workers split the machine's cores between their BLAS libraries (no MLX)."""

from __future__ import annotations

import pytest

from workers.blas import share_threads, usable_cpus


@pytest.mark.parametrize(("share", "cpus", "threads"), [(1, 2, None), (0, 8, None), (2, 2, 1), (4, 2, 1),
                                                        (2, 8, 4), (3, 8, 2)])
def test_each_worker_gets_its_part_of_the_cores(share: int, cpus: int, threads: int | None) -> None:
    assert share_threads(share, cpus) == threads


def test_the_default_is_the_cpus_this_process_may_use() -> None:
    assert share_threads(usable_cpus() + 1) == 1
    assert usable_cpus() >= 1
