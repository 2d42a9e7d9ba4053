"""Where a value (a result, a part of one, its JSON) holds a NaN or an infinity, and the error that names where.

Torch-free: the API imports it with the results (``jobs.results``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from pydantic import BaseModel

from models.errors import NonFiniteResultError

SHOWN_PATHS = 5  # of the non-finite numbers, how many a message names


def _all_finite(value: Any) -> bool:
    """Whether ``value`` holds no NaN or infinity anywhere (``non_finite_paths`` without the
    paths: every result is checked several times on its way, and almost always passes)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (str, int)) or value is None:  # bool is an int
        return True
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    if isinstance(value, BaseModel):
        return _all_finite([getattr(value, k) for k in type(value).model_fields]) and _all_finite(
            value.model_extra or {}
        )
    return not (
        isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value)
    )


def non_finite_paths(value: Any, path: str = "") -> list[str]:
    """Where a result, a part of one or its JSON holds a NaN or an infinity: paths such as
    ``probs.cat`` or ``targets[1].faithfulness.deletion_curve[3]``. Walks dicts, lists, tuples
    and models (fields and kept keys); integers and booleans are always finite."""
    return [] if _all_finite(value) else _paths(value, path)


def _paths(value: Any, path: str) -> list[str]:
    if isinstance(value, BaseModel):
        value = {**{k: getattr(value, k) for k in type(value).model_fields}, **(value.model_extra or {})}
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _paths(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _paths(v, f"{path}[{i}]")]
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
        return [path or "(the value itself)"]
    return []


def check_finite(value: Any, what: str) -> None:
    """NonFiniteResultError when ``value`` (``what``, in words) holds a NaN or an infinity
    anywhere (``non_finite_paths``); the message names where, never more than SHOWN_PATHS."""
    paths = non_finite_paths(value)
    if paths:
        shown = ", ".join(paths[:SHOWN_PATHS]) + (
            f" and {len(paths) - SHOWN_PATHS} more" if len(paths) > SHOWN_PATHS else ""
        )
        raise NonFiniteResultError(
            f"{what} holds {len(paths)} number{'s that are' if len(paths) > 1 else ' that is'} NaN or infinite "
            f"({shown}); no result is kept from it"
        )
