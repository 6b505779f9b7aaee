"""Model sources: local folders, GGUF files, the built-in real and demo models, the model store, precision.

:mod:`workers.models.sources` resolves a ``--model`` source to an MLX model folder.
"""
