"""Upstream providers and containers, from configuration (a TOML file), and slug routing."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import SCHEMAS_DIR
from services.common.errors import NotFound
from services.common.records import normalize_slug

DEFAULT_PROVIDERS_FILE = SCHEMAS_DIR / "providers.default.toml"
CONTAINER_PROVIDER = "maniac"


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    api_key_env: str | None = None
    timeout_s: float = 120.0
    headers: dict[str, str] = field(default_factory=dict)

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


@dataclass(frozen=True)
class Route:
    """Where one model slug goes."""

    provider: Provider
    upstream_model: str
    slug: str
    container: str | None = None


@dataclass(frozen=True)
class Catalog:
    providers: dict[str, Provider]
    containers: dict[str, str]

    @classmethod
    def load(cls, path: Path | None) -> Catalog:
        data = tomllib.loads((path or DEFAULT_PROVIDERS_FILE).read_text(encoding="utf-8"))
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Catalog:
        providers: dict[str, Provider] = {}
        for name, conf in data.get("providers", {}).items():
            if name == CONTAINER_PROVIDER:
                raise ValueError(f"provider name {name!r} is reserved for containers")
            providers[name] = Provider(
                name=name,
                base_url=str(conf["base_url"]).rstrip("/"),
                api_key_env=conf.get("api_key_env"),
                timeout_s=float(conf.get("timeout_s", 120.0)),
                headers={str(k): str(v) for k, v in conf.get("headers", {}).items()},
            )
        containers = {name: str(conf["model"]) for name, conf in data.get("containers", {}).items()}
        return cls(providers, containers)

    def resolve(self, model: str) -> Route:
        """The route for a slug; :class:`NotFound` for an unknown provider or container."""
        slug = normalize_slug(model.strip())
        provider_name, sep, rest = slug.partition("/")
        if not sep or not rest:
            raise NotFound(
                f"Unknown model {model!r}: use 'provider/model' or 'maniac:<container>'.",
                details={"model": model, "providers": sorted(self.providers)},
            )
        if provider_name == CONTAINER_PROVIDER:
            target = self.containers.get(rest)
            if target is None:
                raise NotFound(
                    f"Unknown container {rest!r}.",
                    details={"container": rest, "containers": sorted(self.containers)},
                )
            if normalize_slug(target).startswith(f"{CONTAINER_PROVIDER}/"):
                raise NotFound(f"Container {rest!r} is configured to route to another container.")
            route = self.resolve(target)
            return Route(route.provider, route.upstream_model, route.slug, container=rest)
        provider = self.providers.get(provider_name)
        if provider is None:
            raise NotFound(
                f"Unknown provider {provider_name!r} in model {model!r}.",
                details={"model": model, "providers": sorted(self.providers)},
            )
        return Route(provider, rest, slug)
