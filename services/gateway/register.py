"""Register: validate each item on its own, turn the valid ones into events.

Pure functions: the endpoint does the I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import ErrorDetails

from schemas.api import Item, RegisterReq
from schemas.events import encode_event, message_key
from services.common.records import (
    RecordError,
    content_completion_id,
    parse_created,
    parse_spend,
    usage_counts,
)
from services.gateway.validation import ListValidator

MAX_ERRORS = 200

_ITEMS = ListValidator(Item)


class RegisterEnvelope(RegisterReq):
    """The spec's ``RegisterReq`` but for its items, validated one by one afterwards."""

    items: list[Any]


@dataclass
class Validated:
    messages: list[tuple[bytes, bytes]] = field(default_factory=list)
    """One per completion: an id given twice is published once, as its later item."""
    errors: list[dict[str, Any]] = field(default_factory=list)
    accepted: int = 0
    rejected: int = 0

    def reject(self, index: int, loc: tuple[str | int, ...], message: str, kind: str) -> None:
        self.rejected += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(
                {"index": index, "loc": ["items", index, *loc], "message": message, "type": kind}
            )


def item_errors(items: list[Any]) -> dict[int, list[ErrorDetails]]:
    """Each invalid item's validation errors against the spec's ``Item``, by index.

    Strict: the item is stored as given and read back through the spec, so its values must
    already have the spec's JSON types (``false`` is no choice index, ``"1"`` no number).
    """
    return _ITEMS.invalid_items(items, strict=True)


def check_record(raw: dict[str, Any]) -> None:
    """Raise RecordError when a valid item still cannot be stored (timestamps, counts, spend)."""
    output = raw.get("output") or {}
    parse_created(output.get("created"))
    usage_counts(output.get("usage"))
    parse_spend(output.get("spend"))


def build_events(
    envelope: RegisterEnvelope,
    *,
    project: str,
    received_at_ms: int,
    hold: Callable[[int], None] | None = None,
) -> Validated:
    """``hold``: called with each record's size as it is built (it may raise to stop)."""
    result = Validated()
    invalid = item_errors(envelope.items)
    published: dict[str, int] = {}  # completion id -> its message's position
    for index, raw in enumerate(envelope.items):
        errors = invalid.get(index)
        if errors is not None:
            first = errors[0]
            message = first["msg"] if len(errors) == 1 else f"{first['msg']} (+{len(errors) - 1})"
            result.reject(index, first["loc"], message, first["type"])
            continue
        try:
            check_record(raw)
        except RecordError as exc:
            result.reject(index, exc.loc, exc.message, "value_error")
            continue
        output = raw.get("output") or {}
        try:
            completion_id = output.get("id") or content_completion_id(
                project, envelope.container, raw
            )
            value = encode_event(
                kind="register",
                project=project,
                container=envelope.container,
                completion_id=completion_id,
                received_at_ms=received_at_ms,
                item=raw,
            )
        except TypeError:  # orjson writes at most 254 levels (and parses 1024)
            result.reject(index, (), "JSON nested too deeply to be stored", "value_error")
            continue
        if hold is not None:
            hold(len(value))
        record = (message_key(project, completion_id), value)
        result.accepted += 1
        position = published.setdefault(completion_id, len(result.messages))
        if position < len(result.messages):  # the same id again: the later item replaces it,
            result.messages[position] = record  # as if registered after it
        else:
            result.messages.append(record)
    return result
