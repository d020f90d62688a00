"""Options as data: the dataclasses a config's nested mapping becomes (``model.matryoshka_2d``,
``model.embedding_loss``), read back from checkpoints' hyperparameters with the same checks."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def options_from_mapping(cls: type[T], value: Any, name: str) -> T | None:
    """``value`` as options of dataclass ``cls``: itself, ``None``, or a mapping of its fields
    (``ValueError`` naming unknown keys, or a value that is no mapping, as option ``name``)."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping of options, got {value!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown {name} option(s) {unknown}; the options are {sorted(known)}")
    return cls(**value)
