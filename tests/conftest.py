"""Shared test set-up.

The test process loads the same BLAS as the workers (before anything imports
mlx), so in-process reference generations match served ones bit for bit.
"""

from __future__ import annotations

import os
import tempfile

from workers.blas import find_blas, preload_blas

preload_blas(find_blas(os.environ.get("MLX_FLEET_BLAS", "auto")))

# One model cache per test session, shared with every spawned worker via the env.
os.environ.setdefault("MLX_FLEET_CACHE", tempfile.mkdtemp(prefix="mlxf-cache-"))
