"""Step 2, pure: a :class:`CompletionEvent` -> one ClickHouse row (a JSONCompactEachRow line:
the values of ``COMPLETIONS_INSERT_COLUMNS``, in their order).

The row carries the columns list queries and dashboards filter on, the full request, and the
response exactly as list/get return it (``ChatResRelaxed``), so reads never rebuild it.
``response`` and ``request`` are written into the row as JSON objects (``orjson.Fragment``),
not as escaped strings: the insert stores an object given for a ``String`` column as its text
(``input_format_json_read_objects_as_strings``), which is byte for byte what they encode to.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

from orjson import Fragment

from schemas.events import CompletionEvent
from services.common.codec import dumps
from services.common.pricing import (
    NOTHING_BY_CLASS,
    PriceCatalog,
    SpendValues,
    compute_spend,
    spend_values,
)
from services.common.records import (
    RecordError,
    content_completion_id,
    normalize_slug,
    parse_created,
    parse_spend,
    usage_counts,
    usage_flags,
)
from services.worker.pipeline.types import Invalid, Row


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _merge_metadata(*parts: Any) -> dict[str, Any] | None:
    merged: dict[str, Any] = {}
    for part in parts:
        if isinstance(part, dict):
            merged.update(part)
    return merged or None


@lru_cache(maxsize=4096)  # a request's items share received_at, often created too
def datetime64(seconds: float) -> str:
    """ClickHouse DateTime64(3) text; bare numbers are ambiguous to its parser."""
    moment = datetime.fromtimestamp(round(seconds, 3), UTC).replace(tzinfo=None)
    return moment.isoformat(" ", "milliseconds")


def _seconds(value: float) -> int | float:
    return int(value) if value == int(value) else value


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


OperationValues = tuple[str, str, int, float | None, float | None, str]

_NO_OPERATION: OperationValues = ("", "", 0, None, None, "")


def _operation_values(operation: dict[str, Any]) -> OperationValues:
    """Columns of a created completion: its operation id, status, latency and attempts."""
    if not operation:
        return _NO_OPERATION
    attempts = operation.get("attempts")
    return (
        str(operation.get("id") or ""),
        str(operation.get("status") or ""),
        1 if operation.get("stream") else 0,
        _number(operation.get("ttft_ms")),
        _number(operation.get("latency_ms")),
        dumps(attempts).decode() if isinstance(attempts, list) else "",
    )


def _priced(
    prices: PriceCatalog | None,
    caller_spend: Decimal | None,
    provider: str,
    model: str,
    created: float,
    counts: dict[str, int],
    has_usage: bool,
) -> SpendValues:
    """Spend columns: the caller's spend kept, else computed at the price then in force."""
    if caller_spend is not None:
        return (caller_spend, "caller", "", *NOTHING_BY_CLASS)
    if not has_usage:
        return spend_values(None, source="no_usage")
    price = prices.find(provider, model, created) if prices and model else None
    return spend_values(compute_spend(price, counts) if price else None)


def _usage_source(has_usage: bool, operation: dict[str, Any]) -> str:
    if not has_usage:
        return "none"
    return "partial_stream" if operation.get("status") == "partial" else "provider"


def to_row(event: CompletionEvent, prices: PriceCatalog | None = None) -> Row | Invalid:
    item = event.item
    request = _dict(item.get("input"))
    output = _dict(item.get("output"))
    try:
        created = parse_created(output.get("created"))
        usage = output.get("usage") if isinstance(output.get("usage"), dict) else None
        counts = usage_counts(usage)
        spend = parse_spend(output.get("spend"))
    except RecordError as exc:
        return Invalid(f"{'.'.join(str(p) for p in exc.loc)}: {exc.message}")
    if created is None:
        created = event.received_at_ms / 1000.0
    created = round(created, 3)  # the column's milliseconds: the response says the same time

    model = output.get("model") or request.get("model")
    slug = normalize_slug(model) if model else ""
    provider = output.get("provider") or ""
    operation = _dict(item.get("operation"))
    priced = _priced(prices, spend, provider, slug, created, counts, usage is not None)
    tags = item.get("tags") or output.get("tags") or request.get("tags") or []
    trace = output.get("trace") or request.get("trace")
    container = event.container if event.container is not None else output.get("container")
    response = {
        **output,
        "id": event.completion_id,
        "choices": output.get("choices") or [],
        "created": _seconds(created),
        "model": model,
        "object": "chat.completion",
        "usage": usage,
        "provider": output.get("provider"),
        "container": container,
        "model_id": output.get("model_id"),
        "spend": priced[0],
        "tags": tags,
        "metadata": _merge_metadata(
            request.get("metadata"), output.get("metadata"), item.get("metadata")
        ),
        "trace": trace,
    }
    if operation:
        response["operation"] = operation
    choices = response["choices"]
    first_choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    values = [  # COMPLETIONS_INSERT_COLUMNS
        event.project,
        event.completion_id,
        datetime64(created),
        datetime64(event.received_at_ms / 1000.0),
        event.kind,
        slug,
        provider,
        container or "",
        output.get("model_id") or "",
        first_choice.get("finish_reason") or "",
        counts["prompt_tokens"],
        counts["completion_tokens"],
        counts["total_tokens"],
        counts["cached_tokens"],
        counts["reasoning_tokens"],
        counts["cache_write_tokens"],
        *priced,
        _usage_source(usage is not None, operation),
        usage_flags(counts, usage is not None),
        tags,
        _dict(trace).get("id") or "",
        Fragment(dumps(response)),
        Fragment(dumps(request)),
        *_operation_values(operation),
        1,  # agg_sign: a version, not a retraction
    ]
    content_id = (  # the gateway's hash of the item (checked: any producer may write here)
        event.kind == "register"
        and not output.get("id")
        and content_completion_id(event.project, event.container or "", item) == event.completion_id
    )
    return Row(
        dumps(values), event.project, event.completion_id, event.received_at_ms, False, content_id
    )
