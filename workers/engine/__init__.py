"""The engine: the adapter over mlx-lm that decodes a worker's requests.

:mod:`workers.engine.adapter` (continuous batching and the solo fast path), with its sampling,
prompt cache, text streams and counters. :mod:`workers.engine.interface` and
:mod:`workers.engine.stats` import no MLX, so the worker's pure parts can read them.
This file imports nothing, so importing those two does not load MLX.
"""
