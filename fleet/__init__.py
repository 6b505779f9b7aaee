"""mlx-fleet's composition root: the command line, the wiring of a fleet's children, the embedded fleet.

The only package that imports ``actors``, ``broker`` and ``workers`` together
(docs/architecture.md).
"""
