"""Every model in schemas.api against the spec's component of the same name."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter

from schemas import OPENAPI_PATH, api

SPEC: dict[str, Any] = json.loads(OPENAPI_PATH.read_text())
COMPONENTS: dict[str, Any] = SPEC["components"]["schemas"]

MODELS: dict[str, type[BaseModel]] = {
    "ChatListRes": api.ChatListRes,
    "ChatResRelaxed-Output": api.ChatResRelaxed,
    "ChatResRelaxed-Input": api.ChatResRelaxed,
    "RegisterOutputChoice": api.RegisterOutputChoice,
    "RegisterOutputMessage": api.RegisterOutputMessage,
    "ChatResponseUsage": api.ChatResponseUsage,
    "TraceContext": api.TraceContext,
    "ErrorResponse": api.ErrorResponse,
    "ManiacError": api.ManiacError,
    "ChatReq": api.ChatReq,
    "Message": api.Message,
    "TextContentPart": api.TextContentPart,
    "ImageContentPart": api.ImageContentPart,
    "ImageURL": api.ImageURL,
    "InputAudioContentPart": api.InputAudioContentPart,
    "InputAudio": api.InputAudio,
    "FileContentPart": api.FileContentPart,
    "FileRef": api.FileRef,
    "ToolCall": api.ToolCall,
    "FunctionCall": api.FunctionCall,
    "ReasoningConfig": api.ReasoningConfig,
    "ResponseFormatText": api.ResponseFormatText,
    "ResponseFormatJsonSchema": api.ResponseFormatJsonSchema,
    "JsonSchemaConfig": api.JsonSchemaConfig,
    "ResponseFormatJsonObject": api.ResponseFormatJsonObject,
    "StreamOptions": api.StreamOptions,
    "ToolChoiceFunction": api.ToolChoiceFunction,
    "ToolChoiceFunctionName": api.ToolChoiceFunctionName,
    "ToolDefinition": api.ToolDefinition,
    "FunctionDefinition": api.FunctionDefinition,
    "ImageConfig": api.ImageConfig,
    "AudioOutputConfig": api.AudioOutputConfig,
    "PredictionContent": api.PredictionContent,
    "WebSearchOptions": api.WebSearchOptions,
    "WebSearchApproximateLocation": api.WebSearchApproximateLocation,
    "ChatRes": api.ChatRes,
    "ChatResponseChoice-Output": api.ChatResponseChoice,
    "ChatResponseMessage-Output": api.ChatResponseMessage,
    "AudioResponse": api.AudioResponse,
    "RegisterReq": api.RegisterReq,
    "Item": api.Item,
    "RegisterRes": api.RegisterRes,
}

NOT_MODELLED = {"HTTPValidationError", "ValidationError"}  # FastAPI's own 422 body


def test_every_component_has_a_model() -> None:
    assert set(COMPONENTS) - NOT_MODELLED == set(MODELS)


@pytest.mark.parametrize("component", sorted(MODELS))
def test_model_matches_component(component: str) -> None:
    spec = COMPONENTS[component]
    ours = MODELS[component].model_json_schema(by_alias=True, mode="validation")
    assert set(ours.get("properties", {})) == set(spec.get("properties", {}))
    assert set(ours.get("required", [])) == set(spec.get("required", []))
    assert ours.get("additionalProperties") == spec.get("additionalProperties")
    for name, prop in spec.get("properties", {}).items():
        if "default" in prop:
            assert ours["properties"][name].get("default") == prop["default"], name


def _enum_values(schema: dict[str, Any]) -> set[str]:
    values: set[str] = set(schema.get("enum", []))
    for option in schema.get("anyOf", []):
        values |= set(option.get("enum", []))
    return values


@pytest.mark.parametrize("component", sorted(MODELS))
def test_enums_match(component: str) -> None:
    spec = COMPONENTS[component]
    ours = MODELS[component].model_json_schema(by_alias=True)
    for name, prop in spec.get("properties", {}).items():
        expected = _enum_values(prop)
        if expected:
            assert _enum_values(ours["properties"][name]) == expected, name


@pytest.mark.parametrize(
    ("payload", "valid"),
    [
        pytest.param({"messages": [{"role": "user", "content": "hi"}]}, True, id="minimal"),
        pytest.param({"messages": [], "unknown": 1}, False, id="extra-forbidden"),
        pytest.param({"messages": [{"role": "robot"}]}, False, id="bad-role"),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
            True,
            id="content-parts",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "video", "x": 1}]}]},
            False,
            id="unknown-part",
        ),
        pytest.param({"messages": [], "service_tier": "flex", "stream": True}, True, id="tier"),
    ],
)
def test_chat_req_validation(payload: dict[str, Any], valid: bool) -> None:
    adapter = TypeAdapter(api.ChatReq)
    if valid:
        adapter.validate_python(payload)
    else:
        with pytest.raises(ValueError, match="validation error"):
            adapter.validate_python(payload)


def test_chat_req_defaults() -> None:
    req = api.ChatReq(messages=[])
    assert req.stream is False
    assert req.store is True
    assert req.tags == []
