"""Pure functions on completion records shared by the gateway and the workers."""

from __future__ import annotations

import hashlib
import math
import uuid
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from typing import Any

from services.common.codec import dumps_canonical


class RecordError(ValueError):
    """A record that cannot be stored as given; the message says why."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def content_completion_id(project: str, container: str, item: dict[str, Any]) -> str:
    """A stable id for an item whose output carries none.

    The same item registered again into the same container of the same project gets the same
    id, so a retried request never stores it twice.
    """
    digest = hashlib.sha256(f"{project}\x00{container}\x00".encode())
    digest.update(dumps_canonical(item))
    return f"chatcmpl-{digest.hexdigest()[:32]}"


def parse_created(value: Any) -> float | None:
    """Unix seconds from what a client may send as ``created``; None when absent.

    Accepts numbers (seconds, or milliseconds when larger than 1e11), numeric strings and
    ISO-8601 strings (naive ones are UTC).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise RecordError(("output", "created"), "created must be unix seconds or ISO-8601")
    seconds: float
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError as exc:
                raise RecordError(
                    ("output", "created"), f"created is not a timestamp: {value[:64]!r}"
                ) from exc
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            seconds = parsed.timestamp()
    else:
        raise RecordError(("output", "created"), "created must be unix seconds or ISO-8601")
    if not math.isfinite(seconds):
        raise RecordError(("output", "created"), "created must be finite")
    if seconds > 1e11:
        seconds /= 1000.0
    if not 0 <= seconds < 4102444800:  # 1970 .. 2100
        raise RecordError(("output", "created"), "created is out of range (1970-2100)")
    return seconds


# What one record may carry, so that every row can be inserted and the aggregates summing
# many rows (Int64 token sums, Decimal(38, 12) spend sums) cannot overflow.
MAX_TOKENS = 10**12
MAX_SPEND = Decimal(10**15)

TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
COUNT_FIELDS = (*TOKEN_FIELDS, "cached_tokens", "reasoning_tokens", "cache_write_tokens")
"""The counts :func:`usage_counts` gives, each a column of ``completions``."""


def token_count(value: Any, loc: tuple[str | int, ...]) -> int:
    """A token count as a non-negative integer, at most ``MAX_TOKENS``."""
    if type(value) is int and 0 <= value <= MAX_TOKENS:  # nearly every count: checked at once
        return value
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RecordError(loc, "token counts must be finite numbers")
    if value < 0:
        raise RecordError(loc, "token counts must not be negative")
    if value > MAX_TOKENS:
        raise RecordError(loc, f"token counts must be at most {MAX_TOKENS}")
    return round(value)


SPEND_QUANTUM = Decimal("1e-12")
"""The spend columns' scale (``Decimal(38, 12)``)."""
_SPEND_CONTEXT = Context(prec=38)


def parse_spend(value: Any) -> Decimal | None:
    """A caller-given spend as a Decimal (None when absent), at most ``MAX_SPEND``, to the
    spend columns' 12 places (half to even): what the record shows is what the aggregates
    add up, to the last digit."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RecordError(("output", "spend"), "spend must be a number")
    try:
        spend = Decimal(str(value))
    except InvalidOperation as exc:
        raise RecordError(("output", "spend"), "spend must be a number") from exc
    if not spend.is_finite():
        raise RecordError(("output", "spend"), "spend must be finite")
    if abs(spend) > MAX_SPEND:
        raise RecordError(("output", "spend"), f"spend must be at most {MAX_SPEND} in magnitude")
    return spend.quantize(SPEND_QUANTUM, rounding=ROUND_HALF_EVEN, context=_SPEND_CONTEXT)


def usage_counts(usage: dict[str, Any] | None) -> dict[str, int]:
    """prompt/completion/total/cached/reasoning token counts from an OpenAI usage object."""
    if not usage:
        return dict.fromkeys(COUNT_FIELDS, 0)
    counts = {f: token_count(usage.get(f), ("output", "usage", f)) for f in TOKEN_FIELDS}
    prompt_details = _details(usage, "prompt_tokens_details")
    completion_details = _details(usage, "completion_tokens_details")
    counts["cached_tokens"] = token_count(
        prompt_details.get("cached_tokens"),
        ("output", "usage", "prompt_tokens_details", "cached_tokens"),
    )
    cache_write = prompt_details.get("cache_write_tokens")
    cache_write_loc: tuple[str, ...] = (
        "output",
        "usage",
        "prompt_tokens_details",
        "cache_write_tokens",
    )
    if cache_write is None:  # Anthropic's name, at the top of its usage
        cache_write = usage.get("cache_creation_input_tokens")
        cache_write_loc = ("output", "usage", "cache_creation_input_tokens")
    counts["cache_write_tokens"] = token_count(cache_write, cache_write_loc)
    counts["reasoning_tokens"] = token_count(
        completion_details.get("reasoning_tokens"),
        ("output", "usage", "completion_tokens_details", "reasoning_tokens"),
    )
    return counts


def _details(usage: dict[str, Any], name: str) -> dict[str, Any]:
    details = usage.get(name) or {}
    if not isinstance(details, dict):
        raise RecordError(("output", "usage", name), "token details must be an object")
    return details


def normalize_slug(slug: str) -> str:
    """``provider:model`` and ``provider/model`` name the same model; store and filter on ``/``.

    Only the first separator is the provider's: ``ollama/llama3:8b`` stays as it is and
    ``openrouter:anthropic/claude-sonnet-4`` becomes ``openrouter/anthropic/claude-sonnet-4``.
    """
    colon = slug.find(":")
    if colon == -1:
        return slug
    slash = slug.find("/")
    if slash != -1 and slash < colon:
        return slug
    return f"{slug[:colon]}/{slug[colon + 1 :]}"


def usage_flags(counts: dict[str, int], has_usage: bool) -> list[str]:
    """Invariants a usage object breaks; such usage is stored as given and flagged."""
    if not has_usage:
        return []
    flags = []
    if counts["cached_tokens"] > counts["prompt_tokens"]:
        flags.append("cached_gt_prompt")
    if counts["reasoning_tokens"] > counts["completion_tokens"]:
        flags.append("reasoning_gt_completion")
    if counts["total_tokens"] != counts["prompt_tokens"] + counts["completion_tokens"]:
        flags.append("total_mismatch")
    return flags
