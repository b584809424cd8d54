"""The deployment files parse, use one image for every service, and set real settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.settings import ServeSettings

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
KNOWN = {f"MANIAC_{name.upper()}" for name in ServeSettings.model_fields}


def _documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        found += pod.get("containers", [])
    return found


def test_compose_runs_every_service_from_one_image_with_known_settings() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    ours = {n: s for n, s in services.items() if s.get("image") == "maniac-telemetry:latest"}
    assert set(ours) == {"migrate", "gateway", "worker", "query"}
    commands = {s["command"][0] for s in ours.values()}
    assert commands == {"migrate", "gateway", "worker", "query"}
    for service in ours.values():
        assert set(service["environment"]) <= KNOWN
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")


def test_kubernetes_manifests_use_one_image_and_known_settings() -> None:
    docs = _documents()
    containers = [c for c in _containers(docs) if c["image"].startswith("maniac-telemetry")]
    assert {c["args"][0] for c in containers} == {"migrate", "gateway", "worker", "query"}
    config = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "maniac-config"
    )
    secret = next(d for d in docs if d["kind"] == "Secret")
    settings = {k for k in [*config["data"], *secret["stringData"]] if k.startswith("MANIAC_")}
    assert settings <= KNOWN
    assert {"MANIAC_KAFKA_BOOTSTRAP", "MANIAC_CLICKHOUSE_URL"} <= settings


@pytest.mark.parametrize("name", ["gateway", "query"])
def test_http_services_have_probes(name: str) -> None:
    [container] = [c for c in _containers(_documents()) if c.get("args", [""])[0] == name]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_grafana_dashboard_queries_the_aggregate_tables() -> None:
    import json

    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "maniac-usage.json").read_text())
    sqls = [t["rawSql"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(sqls) == 5
    assert all("maniac.usage_" in sql and "project = '${project}'" in sql for sql in sqls)


def test_the_image_build_context_holds_only_what_the_dockerfile_copies() -> None:
    copied = set()
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            copied |= set(words[1:-1])
    ignore = [
        line.strip()
        for line in (DEPLOY.parent / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # everything is left out (a local .venv, .maniac, .env), then what is copied let back in
    assert ignore[0] == "*"
    assert copied == {line[1:] for line in ignore if line.startswith("!")}


def _nginx_directives(conf: str) -> list[str]:
    conf = re.sub(r"#[^\n]*", "", conf).replace("maniac-gateway:", "gateway:")
    conf = conf.replace("maniac-query:", "query:")
    return sorted(d.strip() for d in re.split(r"[;{}]", " ".join(conf.split())) if d.strip())


def test_the_kubernetes_proxy_routes_as_the_compose_one_and_keeps_the_clients_host() -> None:
    compose = _nginx_directives((DEPLOY / "nginx.conf").read_text())
    proxy = next(
        d
        for d in _documents()
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "maniac-proxy"
    )
    assert _nginx_directives(proxy["data"]["nginx.conf"]) == compose
    # the services build redirects (a trailing slash) from Host: the client's, port and all
    assert "proxy_set_header Host $http_host" in compose
