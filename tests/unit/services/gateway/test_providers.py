from __future__ import annotations

from typing import Any

import pytest

from services.common.errors import NotFound
from services.gateway.providers import DEFAULT_PROVIDERS_FILE, Catalog

CONFIG: dict[str, Any] = {
    "providers": {
        "openai": {"base_url": "https://api.openai.com/v1/", "api_key_env": "OPENAI_API_KEY"},
        "openrouter": {"base_url": "https://openrouter.ai/api/v1", "timeout_s": 30},
    },
    "containers": {"support": {"model": "openai:gpt-4o-mini"}, "loop": {"model": "maniac/support"}},
}


@pytest.mark.parametrize(
    ("slug", "provider", "upstream", "normalized", "container"),
    [
        ("openai/gpt-4o", "openai", "gpt-4o", "openai/gpt-4o", None),
        ("openai:gpt-4o", "openai", "gpt-4o", "openai/gpt-4o", None),
        (
            "openrouter/anthropic/claude-sonnet-4",
            "openrouter",
            "anthropic/claude-sonnet-4",
            "openrouter/anthropic/claude-sonnet-4",
            None,
        ),
        (
            "openrouter:anthropic/claude-sonnet-4",
            "openrouter",
            "anthropic/claude-sonnet-4",
            "openrouter/anthropic/claude-sonnet-4",
            None,
        ),
        ("maniac:support", "openai", "gpt-4o-mini", "openai/gpt-4o-mini", "support"),
        ("maniac/support", "openai", "gpt-4o-mini", "openai/gpt-4o-mini", "support"),
    ],
)
def test_resolve(
    slug: str, provider: str, upstream: str, normalized: str, container: str | None
) -> None:
    route = Catalog.from_dict(CONFIG).resolve(slug)
    assert (route.provider.name, route.upstream_model, route.slug, route.container) == (
        provider,
        upstream,
        normalized,
        container,
    )


@pytest.mark.parametrize("slug", ["gpt-4o", "nobody/x", "maniac:none", "maniac:loop", "openai/"])
def test_resolve_refuses(slug: str) -> None:
    with pytest.raises(NotFound):
        Catalog.from_dict(CONFIG).resolve(slug)


def test_base_url_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = Catalog.from_dict(CONFIG)
    openai = catalog.providers["openai"]
    assert openai.base_url == "https://api.openai.com/v1"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert openai.api_key() == "sk-x"
    assert catalog.providers["openrouter"].api_key() is None
    assert catalog.providers["openrouter"].timeout_s == 30


def test_reserved_provider_name() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Catalog.from_dict({"providers": {"maniac": {"base_url": "http://x"}}})


def test_shipped_default_file_loads() -> None:
    catalog = Catalog.load(DEFAULT_PROVIDERS_FILE)
    assert {"openai", "openrouter", "ollama", "vllm"} <= set(catalog.providers)
    assert catalog.resolve("maniac:default").provider.name == "openai"
