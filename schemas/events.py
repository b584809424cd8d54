"""The Kafka contract between the gateway and the workers.

Topic ``maniac.completions.v1`` carries one :class:`CompletionEvent` per completion, encoded as
JSON (orjson), keyed by ``project/completion_id`` so that all records of one completion land in
one partition, in order. The gateway is the only producer; workers are the only consumers.

Versioning: ``v`` is bumped on any incompatible change, and a new topic suffix is used with it.
A worker sends an event whose ``v`` it does not know to the dead-letter topic.

Dead letters go to ``maniac.completions.dlq.v1``: the original bytes as value, the original key,
and headers ``reason``, ``source_topic``, ``source_partition``, ``source_offset``.
Workers also keep each one in ClickHouse (``dead_letters``, under the project of its key), and
``maniac dlq replay`` re-publishes them here with their original key and value.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

EVENT_VERSION = 1

COMPLETIONS_TOPIC = "maniac.completions.v1"
DEAD_LETTER_TOPIC = "maniac.completions.dlq.v1"


class CompletionEvent(BaseModel):
    """One completion to record, as published by the gateway.

    ``item`` is the register item exactly as the client sent it (already validated against
    :class:`schemas.api.Item` by the gateway), so that nothing the client said is lost.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    kind: Literal["register", "create"]
    project: str = Field(min_length=1)
    container: str | None
    completion_id: str = Field(min_length=1)
    received_at_ms: int = Field(ge=0, description="Gateway receive time, unix milliseconds.")
    item: dict[str, Any]

    @classmethod
    def trusted(cls, fields: dict[str, Any]) -> CompletionEvent:
        """The event of a dict that holds exactly these fields, already valid, unvalidated.

        What ``model_construct`` does for such a dict (every field given, so no defaults to
        fill in), for a fifth of its cost: the worker builds one per message. The caller
        guarantees the fields and their types (see ``services.worker.pipeline.decode``).
        """
        event = cls.__new__(cls)
        object.__setattr__(event, "__dict__", fields)
        object.__setattr__(event, "__pydantic_fields_set__", _EVENT_FIELDS)
        object.__setattr__(event, "__pydantic_extra__", None)
        object.__setattr__(event, "__pydantic_private__", None)
        return event


_EVENT_FIELDS = frozenset(CompletionEvent.model_fields)


def message_key(project: str, completion_id: str) -> bytes:
    """Partitioning key: every record of one completion goes to the same partition."""
    return f"{project}/{completion_id}".encode()


MESSAGE_KEY_SQL = "concat(project, '/', completion_id)"
""":func:`message_key` of a stored row, in ClickHouse."""


def split_key(key: bytes | None) -> tuple[str, str]:
    """``(project, completion_id)`` from a message key; empty strings where it has none.

    Used for what cannot be decoded (dead letters): the key names the project even when the
    value is garbage.
    """
    if not key:
        return "", ""
    text = key.decode(errors="replace")
    project, sep, completion_id = text.partition("/")
    return (project, completion_id) if sep else ("", text)


def encode_event(
    *,
    kind: Literal["register", "create"],
    project: str,
    container: str | None,
    completion_id: str,
    received_at_ms: int,
    item: dict[str, Any],
) -> bytes:
    """The wire form of a :class:`CompletionEvent`, built without a second validation.

    The gateway has validated ``item`` already; the worker validates the envelope on receipt.
    """
    return orjson.dumps(
        {
            "v": EVENT_VERSION,
            "kind": kind,
            "project": project,
            "container": container,
            "completion_id": completion_id,
            "received_at_ms": received_at_ms,
            "item": item,
        }
    )
