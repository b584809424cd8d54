"""The spec against the running stack: schemathesis generates requests for every operation and
checks each answer — no 5xx, only documented statuses and content types, bodies that match the
documented schemas."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any
from urllib.parse import quote

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from schemas import OPENAPI_PATH
from tests.e2e.conftest import KEY_A, StackFactory

Operation = APIOperation[Any, Any, Any, Any]


def _operations() -> list[Operation]:
    """Every operation in the spec; one that cannot be loaded fails collection."""
    operations = []
    for result in schemathesis.openapi.from_path(OPENAPI_PATH).get_all_operations():
        if isinstance(result, Ok):
            operations.append(result.ok())
        else:
            raise AssertionError(f"schemathesis cannot load an operation: {result.err()}")
    return operations


OPERATIONS = _operations()
COMPLETIONS = "/v1/chat/completions"
COMPLETION = "/v1/chat/completions/{completion_id}"
REGISTER = "/v1/chat/completions/register"
CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

# Cases per operation: requests the spec allows (positive) and requests that break it on
# purpose (negative: a 4xx; some lose the Authorization header, a 401), with the key of projA.
POSITIVE = 40
NEGATIVE = 25
# And a few that must all be refused with a 401: with the bearer tokens schemathesis makes up
# for the spec's security scheme, and with a well-formed key that does not exist.
UNAUTHENTICATED = 5
UNAUTHENTICATED_HEADERS: list[dict[str, str]] = [{}, {"Authorization": "Bearer wrong-key"}]

# schemathesis draws some choices from the global `random` inside its strategies, which
# Hypothesis reports as deprecated. Hypothesis seeds that generator for every example, so runs
# stay deterministic; only this warning is let through.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)


def _fuzz(
    operation: Operation,
    mode: GenerationMode,
    max_examples: int,
    base_url: str,
    headers: dict[str, str],
) -> Counter[int]:
    """Send ``max_examples`` generated cases of ``operation``; the statuses they got."""
    statuses: Counter[int] = Counter()
    with requests.Session() as session:
        # derandomize: the same cases on every run (reproducible, never flaky); no example
        # database (nothing read or written under .hypothesis/); no deadline and no health
        # checks, which time generation and would flake on a busy machine and on large bodies.
        @settings(
            max_examples=max_examples,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Case[Operation]) -> None:
            response = case.call_and_validate(
                base_url=base_url, session=session, headers=headers, checks=CHECKS, timeout=30
            )
            statuses[response.status_code] += 1

        run()
    return statuses


def _read_back(list_operation: Operation, get_operation: Operation, base_url: str) -> int:
    """List every stored record and fetch each by id, every answer checked; how many."""
    ids: list[str] = []
    with requests.Session() as session:
        while True:
            page = list_operation.Case(query={"limit": 100, "offset": len(ids), "order": "asc"})
            response = page.call_and_validate(
                base_url=base_url, session=session, headers=KEY_A, checks=CHECKS, timeout=30
            )
            data = response.json()["data"]
            ids += [record["id"] for record in data]
            if len(data) < 100:
                break
        for completion_id in ids:
            # quoted here: schemathesis leaves a "#" in a path parameter as it is, which turns
            # the rest of the id into a URL fragment (and the request into a list)
            path = {"completion_id": quote(completion_id, safe="")}
            one = get_operation.Case(path_parameters=path)
            response = one.call_and_validate(
                base_url=base_url, session=session, headers=KEY_A, checks=CHECKS, timeout=30
            )
            assert response.status_code == 200, response.text
    return len(ids)


async def test_every_operation_answers_as_documented(start_stack: StackFactory) -> None:
    api = await start_stack(rate_limit_per_minute=0)
    by_label = {operation.label: operation for operation in OPERATIONS}
    writes = [by_label.pop(f"POST {path}") for path in (REGISTER, COMPLETIONS)]
    list_, get = reads = [by_label.pop(f"GET {path}") for path in (COMPLETIONS, COMPLETION)]
    assert not by_label, f"operations this test does not know about: {list(by_label)}"

    # The requests are synchronous (requests + Hypothesis) and the stack is served by this same
    # event loop: sending them from here would block the loop the server needs to answer them.
    # They are sent from a worker thread while the loop keeps serving.
    async def fuzz(operation: Operation) -> None:
        runs = [
            (GenerationMode.POSITIVE, POSITIVE, dict(KEY_A)),
            (GenerationMode.NEGATIVE, NEGATIVE, dict(KEY_A)),
            *((GenerationMode.POSITIVE, UNAUTHENTICATED, h) for h in UNAUTHENTICATED_HEADERS),
        ]
        results = [
            await asyncio.to_thread(_fuzz, operation, mode, examples, api.base_url, headers)
            for mode, examples, headers in runs
        ]
        positive, negative, *unauthenticated = results
        assert positive.total() > 0
        assert negative.total() > 0
        assert all(set(statuses) == {401} for statuses in unauthenticated), unauthenticated

    # Writes first, so that the reads return what the generated writes stored; generated
    # models are unknown to the gateway, so two completions are created through the fake
    # upstream as well, one of them streamed.
    for operation in writes:
        await fuzz(operation)
    chat: dict[str, Any] = {"model": "mock/ok", "messages": [{"role": "user", "content": "hi"}]}
    created = writes[1].Case(body=chat, media_type="application/json")
    await asyncio.to_thread(
        created.call_and_validate, base_url=api.base_url, headers=KEY_A, checks=CHECKS
    )
    # The stream is checked by status only: schemathesis validates each SSE event on its own
    # against the schema the spec gives the whole stream (a binary string), which never fits.
    async with api.client(KEY_A) as client:
        response = await client.post(COMPLETIONS, json={**chat, "stream": True})
        assert response.status_code == 200, response.text
    # Whatever the gateway accepted, the worker stored or dead-lettered: no generated item may
    # stall a partition or stop the worker.
    worker, publisher = api.stack.worker, api.stack.publisher
    assert worker is not None
    assert publisher is not None
    await publisher.flush()
    assert await worker.drain(dict(publisher.acked), timeout_s=20)
    for operation in reads:
        await fuzz(operation)
    # Every stored record, listed and fetched, matches the spec too.
    assert await asyncio.to_thread(_read_back, list_, get, api.base_url) > 0
