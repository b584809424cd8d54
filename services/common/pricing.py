"""The pricing catalogue and the pure spend computation.

Spend is Decimal from end to end: prices are read from text, token counts are integers, and
the result is quantised to 12 decimal places (ClickHouse ``Decimal(38, 12)``).
"""

from __future__ import annotations

import bisect
import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from schemas import SCHEMAS_DIR

DEFAULT_PRICING_FILE = SCHEMAS_DIR / "pricing.toml"
MILLION = Decimal(1_000_000)
QUANTUM = Decimal("1e-12")


@dataclass(frozen=True)
class Price:
    provider: str
    model: str
    effective: date
    prompt: Decimal
    cached_prompt: Decimal
    cache_write: Decimal
    completion: Decimal
    reasoning: Decimal

    @property
    def version(self) -> str:
        return f"{self.provider}/{self.model}@{self.effective.isoformat()}"


class Spend(NamedTuple):
    """A completion's charge, by class of token (immutable; built once per stored row)."""

    total: Decimal
    input: Decimal
    cache_read: Decimal
    cache_write: Decimal
    reasoning: Decimal
    output: Decimal
    price_version: str


SPEND_CLASSES = (
    "spend_input",
    "spend_cache_read",
    "spend_cache_write",
    "spend_reasoning",
    "spend_output",
)

SPEND_COLUMNS = ("spend", "spend_source", "price_version", *SPEND_CLASSES)
"""The completions table's spend columns, in the order of :func:`spend_values`."""

NOTHING_BY_CLASS: tuple[Decimal, Decimal, Decimal, Decimal, Decimal] = (Decimal(0),) * 5
"""No charge, in each of :data:`SPEND_CLASSES`."""

SpendValues = tuple[Decimal | None, str, str, Decimal, Decimal, Decimal, Decimal, Decimal]


def spend_values(spend: Spend | None, *, source: str = "unknown") -> SpendValues:
    """The values of :data:`SPEND_COLUMNS` for a computed spend; for none, no charge, with
    ``source`` saying why."""
    if spend is None:
        return (None, source, "", *NOTHING_BY_CLASS)
    return (
        spend.total,
        "computed",
        spend.price_version,
        spend.input,
        spend.cache_read,
        spend.cache_write,
        spend.reasoning,
        spend.output,
    )


def spend_columns(spend: Spend | None) -> dict[str, Any]:
    """The completions table's spend columns for a computed spend (or for no price)."""
    return dict(zip(SPEND_COLUMNS, spend_values(spend), strict=True))


def _money(value: Any) -> Decimal:
    return Decimal(str(value))


class PriceCatalog:
    def __init__(self, prices: list[Price]) -> None:
        self._by_key: dict[tuple[str, str], list[Price]] = {}
        for price in sorted(prices, key=lambda p: p.effective):
            self._by_key.setdefault((price.provider, price.model), []).append(price)
        self._providers_by_model: dict[str, set[str]] = {}
        for provider, model in self._by_key:
            self._providers_by_model.setdefault(model, set()).add(provider)
        self._found: dict[tuple[str, str, int], Price | None] = {}
        """Answers of :meth:`find` by (provider, model, UTC day): most records of a day share
        a few models."""

    @classmethod
    def load(cls, path: Path | None = None) -> PriceCatalog:
        data = tomllib.loads((path or DEFAULT_PRICING_FILE).read_text(encoding="utf-8"))
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PriceCatalog:
        prices = []
        for entry in data.get("prices", []):
            prompt = _money(entry["prompt"])
            completion = _money(entry["completion"])
            prices.append(
                Price(
                    provider=str(entry["provider"]),
                    model=str(entry["model"]),
                    effective=date.fromisoformat(str(entry["effective"])),
                    prompt=prompt,
                    cached_prompt=_money(entry.get("cached_prompt", prompt)),
                    cache_write=_money(entry.get("cache_write", prompt)),
                    completion=completion,
                    reasoning=_money(entry.get("reasoning", completion)),
                )
            )
        return cls(prices)

    def find(self, provider: str, model: str, created: float) -> Price | None:
        """The price in force at ``created`` (unix seconds) for this provider and model."""
        key = (provider, model, int(created // 86_400))
        try:
            return self._found[key]
        except KeyError:
            pass
        if len(self._found) >= 10_000:
            self._found.clear()
        found = self._found[key] = self._find(provider, model, created)
        return found

    def _find(self, provider: str, model: str, created: float) -> Price | None:
        provider, model = split_model(provider, model)
        if not provider:
            candidates = self._providers_by_model.get(model, set())
            if len(candidates) != 1:
                return None
            provider = next(iter(candidates))
        history = self._by_key.get((provider, model))
        if not history:
            return None
        day = datetime.fromtimestamp(created, UTC).date()
        position = bisect.bisect_right([p.effective for p in history], day)
        return history[position - 1] if position else None


def split_model(provider: str, model: str) -> tuple[str, str]:
    """``("", "openai/gpt-4o")`` -> ``("openai", "gpt-4o")``; an explicit provider wins."""
    head, sep, tail = model.partition("/")
    if sep and (not provider or provider == head):
        return head, tail
    return provider, model


@cache
def _per_token(price: Price) -> tuple[Decimal, Decimal, Decimal, Decimal, Decimal, str]:
    """A price's USD per token of each class (exact: per million / 10^6), and its version."""
    return (
        price.prompt / MILLION,
        price.cached_prompt / MILLION,
        price.cache_write / MILLION,
        price.reasoning / MILLION,
        price.completion / MILLION,
        price.version,
    )


def compute_spend(price: Price, counts: dict[str, int]) -> Spend:
    """Spend from token counts (as :func:`services.common.records.usage_counts` gives them)."""
    prompt, cached = counts["prompt_tokens"], counts["cached_tokens"]
    cache_write = counts.get("cache_write_tokens", 0)
    completion, reasoning = counts["completion_tokens"], counts["reasoning_tokens"]
    per_input, per_cache_read, per_cache_write, per_reasoning, per_output, version = _per_token(
        price
    )
    # tokens x (price / 10^6) is exact, as (tokens x price) / 10^6 was: the same quantised value
    charged_input = (max(prompt - cached - cache_write, 0) * per_input).quantize(QUANTUM)
    charged_cache_read = (min(cached, prompt) * per_cache_read).quantize(QUANTUM)
    charged_cache_write = (cache_write * per_cache_write).quantize(QUANTUM)
    charged_reasoning = (min(reasoning, completion) * per_reasoning).quantize(QUANTUM)
    charged_output = (max(completion - reasoning, 0) * per_output).quantize(QUANTUM)
    total = (
        Decimal(0)
        + charged_input
        + charged_cache_read
        + charged_cache_write
        + charged_reasoning
        + charged_output
    )
    return Spend(
        total=total,
        input=charged_input,
        cache_read=charged_cache_read,
        cache_write=charged_cache_write,
        reasoning=charged_reasoning,
        output=charged_output,
        price_version=version,
    )
