"""Random JSON Schemas for the constrained-decoding tests: nested objects, arrays, enums, bounded numbers.

Seeded, so a failure names the schema that caused it. Strings, arrays and the digits of
numbers are bounded (``maxLength``, ``maxItems``, ``multipleOf``): a schema that allows
unbounded output lets a model (a sampled real one writes 0.1234567...) run to
``max_tokens``, which ends with ``length`` and a prefix, not a document.
"""

from __future__ import annotations

import random
from typing import Any

WORDS = ["red", "green", "blue", "north", "south", "alpha", "beta", "gamma", "cat", "dog", "yes", "no"]


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """One random schema; objects and arrays nest at most two levels deep."""
    kinds = ["integer", "number", "enum", "string", "boolean"] + (["array", "object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":  # multipleOf bounds the digits (a power of two: exact in binary, as jsonschema checks it)
        low = rng.randint(-50, 50)
        return {"type": "number", "minimum": low, "maximum": low + rng.randint(1, 100),
                "multipleOf": rng.choice([0.5, 0.25, 0.125])}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4)) + ([rng.randint(0, 9)] if rng.random() < 0.3 else [])}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 12)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}
    return random_object(rng, depth + 1)


def random_object(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """An object schema with 1-4 properties, some required, no others allowed."""
    names = rng.sample(["id", "name", "size", "tags", "kind", "score", "owner", "items", "flag"], rng.randint(1, 4))
    props = {n: random_schema(rng, depth) for n in names}
    required = sorted(rng.sample(names, rng.randint(1, len(names))))
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def random_schemas(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` random top-level object schemas."""
    rng = random.Random(seed)
    return [random_object(rng) for _ in range(count)]
