"""Request and response models of the Maniac Inference Gateway API.

These follow `schemas/openapi.json` field for field: names, optionality, defaults and
`additionalProperties` (`false` -> ``extra="forbid"``, `true` -> ``extra="allow"``, absent ->
pydantic's default). `tests/unit/schemas/test_api.py` compares every model with the spec.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JsonObject = dict[str, Any]


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Allow(BaseModel):
    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------- errors


class ManiacError(_Forbid):
    """Standard Maniac API error envelope payload."""

    code: str
    message: str
    details: JsonObject | None = None


class ErrorResponse(_Forbid):
    """Response body for errors."""

    error: ManiacError


# --------------------------------------------------------------------------- shared parts


class TraceContext(_Forbid):
    """External trace/span context used to group related requests."""

    id: str
    span_id: str | None = None
    parent_span_id: str | None = None
    name: str | None = None
    source: str | None = None
    metadata: JsonObject | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextContentPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ImageURL(_Allow):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageContentPart(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


class InputAudio(_Forbid):
    data: str
    format: Literal["wav", "mp3"]


class InputAudioContentPart(BaseModel):
    type: Literal["input_audio"] = "input_audio"
    input_audio: InputAudio


class FileRef(_Allow):
    file_id: str | None = None
    filename: str | None = None
    file_data: str | None = None


class FileContentPart(BaseModel):
    type: Literal["file"] = "file"
    file: FileRef


ContentPart = Annotated[
    TextContentPart | ImageContentPart | InputAudioContentPart | FileContentPart,
    Field(discriminator="type"),
]


class Message(_Forbid):
    """OpenAI-style chat message."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ReasoningConfig(_Forbid):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    max_tokens: int | None = None
    exclude: bool | None = None
    enabled: bool | None = None


class ResponseFormatText(BaseModel):
    type: Literal["text"] = "text"


class JsonSchemaConfig(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str
    description: str | None = None
    schema_: JsonObject | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatJsonSchema(BaseModel):
    type: Literal["json_schema"] = "json_schema"
    json_schema: JsonSchemaConfig


class ResponseFormatJsonObject(BaseModel):
    type: Literal["json_object"] = "json_object"


class StreamOptions(BaseModel):
    include_usage: bool | None = None


class ToolChoiceFunctionName(BaseModel):
    name: str


class ToolChoiceFunction(BaseModel):
    type: Literal["function"] = "function"
    function: ToolChoiceFunctionName


class FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ImageConfig(_Allow):
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    size: (
        Literal[
            "auto",
            "256x256",
            "512x512",
            "1024x1024",
            "1024x1536",
            "1024x1792",
            "1536x1024",
            "1792x1024",
        ]
        | None
    ) = None
    background: Literal["auto", "transparent", "opaque"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = None
    moderation: Literal["auto", "low"] | None = None


class AudioOutputConfig(_Allow):
    voice: Literal[
        "alloy",
        "ash",
        "ballad",
        "coral",
        "echo",
        "fable",
        "nova",
        "onyx",
        "sage",
        "shimmer",
        "verse",
    ]
    format: Literal["wav", "mp3", "flac", "opus", "pcm16", "aac"]


class PredictionContent(_Forbid):
    type: Literal["content"] = "content"
    content: str | list[TextContentPart]


class WebSearchApproximateLocation(_Allow):
    type: Literal["approximate"] = "approximate"
    country: str | None = None
    region: str | None = None
    city: str | None = None
    timezone: str | None = None


class WebSearchOptions(_Allow):
    search_context_size: Literal["low", "medium", "high"] | None = None
    user_location: WebSearchApproximateLocation | None = None


class ChatReq(_Forbid):
    """OpenAI-compatible chat completion request with Maniac extensions."""

    model_config = ConfigDict(extra="forbid", title="ManiacChatRequest")

    messages: list[Message]
    model: str | None = None
    models: list[str] | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: float | None = None
    max_completion_tokens: float | None = None
    max_tokens: float | None = None
    metadata: JsonObject | None = None
    n: int | None = None
    presence_penalty: float | None = None
    reasoning: ReasoningConfig | None = None
    response_format: (
        ResponseFormatText | ResponseFormatJsonSchema | ResponseFormatJsonObject | None
    ) = None
    seed: int | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    tools: list[ToolDefinition] | None = None
    parallel_tool_calls: bool | None = None
    top_p: float | None = None
    top_k: float | None = None
    min_p: float | None = None
    top_a: float | None = None
    repetition_penalty: float | None = None
    image_config: ImageConfig | None = None
    modalities: list[Literal["text", "image", "audio"]] | None = None
    audio: AudioOutputConfig | None = None
    prediction: PredictionContent | None = None
    web_search_options: WebSearchOptions | None = None
    transforms: list[str] | None = None
    preset: str | None = None
    tags: list[str] = Field(default_factory=list)
    store: bool | None = True
    trace: TraceContext | None = None


# --------------------------------------------------------------------------- responses


class ChatResponseUsage(_Allow):
    """Token usage in a chat completion response."""

    prompt_tokens: float
    completion_tokens: float
    total_tokens: float
    completion_tokens_details: JsonObject | None = None
    prompt_tokens_details: JsonObject | None = None


class AudioResponse(_Allow):
    id: str
    data: str
    expires_at: int
    transcript: str


class ChatResponseMessage(_Allow):
    """Assistant message in a choice."""

    role: str
    content: Any | None = None
    refusal: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    audio: AudioResponse | None = None
    images: list[ImageContentPart] | None = None


class ChatResponseChoice(_Forbid):
    """Single choice in a chat completion response."""

    index: float
    message: ChatResponseMessage
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "error"] | None = None
    logprobs: Any | None = None


class ChatRes(_Forbid):
    id: str
    choices: list[ChatResponseChoice]
    created: float
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    usage: ChatResponseUsage | None = None
    provider: str | None = None
    container: str | None = None


class RegisterOutputMessage(_Allow):
    role: str
    content: str | list[Any] | None = None


class RegisterOutputChoice(_Allow):
    index: int | None = None
    message: RegisterOutputMessage
    finish_reason: str | None = None


class ChatResRelaxed(BaseModel):
    """A recorded completion: what list and get return, and what register accepts as output."""

    model_config = ConfigDict(title="ChatResRelaxed")

    id: str | None = None
    choices: list[RegisterOutputChoice]
    created: Any | None = None
    model: str | None = None
    object: Literal["chat.completion"] = "chat.completion"
    usage: ChatResponseUsage | None = None
    provider: str | None = None
    container: str | None = None
    model_id: str | None = None
    spend: float | None = None
    tags: list[str] | None = None
    metadata: JsonObject | None = None
    trace: TraceContext | None = None


class ChatListRes(_Forbid):
    """OpenAI-style list response for chat completions."""

    object: Literal["list"] = "list"
    data: list[ChatResRelaxed]
    total: int = Field(ge=0)


# --------------------------------------------------------------------------- register


class Item(_Forbid):
    input: ChatReq
    output: ChatResRelaxed | None = None
    tags: list[str] | None = None
    metadata: JsonObject | None = None


class RegisterReq(_Forbid):
    """Register completed chat examples for evaluation or analytics."""

    model_config = ConfigDict(extra="forbid", title="RegisterChatCompletionsRequest")

    items: list[Item]
    container: str


class RegisterRes(_Forbid):
    model_config = ConfigDict(extra="forbid", title="RegisterChatCompletionsResponse")

    ok: bool
    container: str
    summary: JsonObject
    errors: list[JsonObject]
