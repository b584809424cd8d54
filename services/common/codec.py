"""JSON encoding in one place: orjson in and out, Decimal written as an exact JSON number."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(format(value, "f").encode())
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(value: Any) -> bytes:
    """Encode to JSON bytes; Decimals keep every digit."""
    return orjson.dumps(value, default=_default)


def dumps_canonical(value: Any) -> bytes:
    """Encode with sorted keys: the same value always gives the same bytes."""
    return orjson.dumps(value, default=_default, option=orjson.OPT_SORT_KEYS)


loads = orjson.loads
JSONDecodeError = orjson.JSONDecodeError
