"""Step 1, pure: Kafka bytes -> a :class:`CompletionEvent`, or why it can never be stored.

The gateway is the only producer and validated the item against the API's ``Item`` before
publishing, so the item is not validated again here. The envelope is: an event of the shape
the gateway writes is recognised by a few type checks and built without pydantic's validator
(which cost as much as the rest of the step); anything else goes through
``CompletionEvent.model_validate``, so what is accepted and every dead-letter reason stay
exactly what the model says.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from schemas.events import EVENT_VERSION, CompletionEvent
from services.common.codec import JSONDecodeError, loads
from services.worker.pipeline.types import Invalid

_FIELDS = frozenset(CompletionEvent.model_fields)
_KINDS = frozenset(("register", "create"))


def _as_written(raw: dict[str, Any]) -> bool:
    """True when ``raw`` has exactly the fields and types the gateway writes."""
    project, container, completion_id = raw["project"], raw["container"], raw["completion_id"]
    received = raw["received_at_ms"]
    return (
        raw["kind"] in _KINDS
        and type(project) is str
        and project != ""
        and (container is None or type(container) is str)
        and type(completion_id) is str
        and completion_id != ""
        and type(received) is int
        and received >= 0
        and type(raw["item"]) is dict
    )


def decode(value: bytes | None) -> CompletionEvent | Invalid:
    if value is None:
        return Invalid("empty message")
    try:
        raw = loads(value)
    except JSONDecodeError as exc:
        return Invalid(f"not JSON: {exc}")
    if not isinstance(raw, dict):
        return Invalid("event is not a JSON object")
    if raw.get("v") != EVENT_VERSION:
        return Invalid(f"unknown event version: {raw.get('v')!r}")
    if raw.keys() == _FIELDS and _as_written(raw):
        return CompletionEvent.trusted(raw)
    try:
        return CompletionEvent.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        return Invalid(f"invalid event at {loc}: {first['msg']}")
