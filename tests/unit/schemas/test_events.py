from __future__ import annotations

from typing import Any

import pytest

from schemas.events import CompletionEvent


@pytest.mark.parametrize("container", ["c", None])
def test_a_trusted_event_is_the_event_validation_builds(container: str | None) -> None:
    fields: dict[str, Any] = {
        "v": 1,
        "kind": "register",
        "project": "p",
        "container": container,
        "completion_id": "id-1",
        "received_at_ms": 1_767_225_600_000,
        "item": {"input": {"messages": []}},
    }
    trusted = CompletionEvent.trusted(dict(fields))
    validated = CompletionEvent.model_validate(fields)
    assert trusted == validated
    assert trusted.model_dump() == validated.model_dump() == fields
    assert trusted.model_fields_set == validated.model_fields_set
    assert trusted.item["input"] == {"messages": []}
    assert trusted.container == container
    with pytest.raises(ValueError, match="frozen"):
        trusted.project = "other"  # type: ignore[misc]
