"""Step 1, pure: Kafka bytes -> a validated :class:`CompletionEvent`."""

from __future__ import annotations

from pydantic import ValidationError

from schemas.events import CompletionEvent
from services.common.codec import JSONDecodeError, loads
from services.worker.pipeline.types import Invalid


def decode(value: bytes | None) -> CompletionEvent | Invalid:
    if value is None:
        return Invalid("empty message")
    try:
        raw = loads(value)
    except JSONDecodeError as exc:
        return Invalid(f"not JSON: {exc}")
    if not isinstance(raw, dict):
        return Invalid("event is not a JSON object")
    if raw.get("v") != 1:
        return Invalid(f"unknown event version: {raw.get('v')!r}")
    try:
        return CompletionEvent.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        return Invalid(f"invalid event at {loc}: {first['msg']}")
