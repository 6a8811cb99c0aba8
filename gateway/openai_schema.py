"""Request bodies of the /v1 data plane, validated with DRF serializers.

The names, types and ranges follow OpenAI's API, so the official client's requests pass
unchanged. Validation is strict where OpenAI is strict: unknown fields are refused (OpenAI
answers "Unrecognized request argument"), numbers must be JSON numbers and flags JSON
booleans (DRF alone would accept "0.5" and "true"), and parameters Sluice cannot honour
(tools, logprobs, n > 1, ...) are refused with `unsupported_parameter` rather than ignored.
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from sluice import errors
from sluice.api import StrictSerializer

# Parameters OpenAI defines that Sluice's backends do not implement. Sending them with a
# value that changes the answer is refused; silently ignoring them would be a lie.
UNSUPPORTED_CHAT = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "presence_penalty",
    "frequency_penalty",
)
UNSUPPORTED_COMPLETION = (
    "logprobs",
    "logit_bias",
    "suffix",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
)
# Accepted for compatibility and ignored: they change nothing about the answer.
IGNORED = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key")

MAX_STOP_SEQUENCES = 4
MAX_EMBEDDING_INPUTS = 256
# Generous bounds on raw text, checked before anything is queued; the model's own context
# limit is checked again by the worker, which knows the real token count.
MAX_TEXT_CHARS = 200_000
MAX_EMBEDDING_ITEM_CHARS = 20_000


class SharedFields:
    """Build a serializer's fields once per class instead of once per request.

    DRF deep-copies every declared field for each serializer instance; on the data plane
    that was a tenth of the gateway's CPU per request. These serializers only validate,
    synchronously, on one event loop, and their fields keep no state between validations
    (no context, no instance, no partial updates), so every instance can use the fields
    bound to the first one.
    """

    @property
    def fields(self):
        cls = type(self)
        shared = cls.__dict__.get("_shared_fields")
        if shared is None:
            shared = serializers.Serializer.fields.func(self)
            cls._shared_fields = shared
        return shared


class StrictFloat(serializers.FloatField):
    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictInteger(serializers.IntegerField):
    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBoolean(serializers.BooleanField):
    default_error_messages = {"invalid": "Must be true or false."}

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class StrictString(serializers.CharField):
    default_error_messages = {"invalid": "Must be a string."}

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StopField(serializers.Field):
    """A string or a list of up to four non-empty strings; always a list afterwards."""

    default_error_messages = {
        "invalid": f"Must be a string or a list of up to {MAX_STOP_SEQUENCES} non-empty strings."
    }

    def to_internal_value(self, data: Any) -> list[str]:
        items = [data] if isinstance(data, str) else data
        if (
            not isinstance(items, list)
            or len(items) > MAX_STOP_SEQUENCES
            or not all(isinstance(item, str) and item for item in items)
        ):
            self.fail("invalid")
        return items

    def to_representation(self, value: Any) -> Any:
        return value


class ContentField(serializers.Field):
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""

    default_error_messages = {
        # Doubled braces: DRF formats these messages with str.format.
        "invalid": 'Must be a string or a list of {{"type": "text", "text": "..."}} parts.',
        "image": "Only text content is supported by this gateway's models.",
    }

    def to_internal_value(self, data: Any) -> str:
        if isinstance(data, str):
            return data
        if not isinstance(data, list) or not data:
            self.fail("invalid")
        texts = []
        for part in data:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                self.fail("invalid")
            if part["type"] != "text":
                self.fail("image")
            if not isinstance(part.get("text"), str):
                self.fail("invalid")
            texts.append(part["text"])
        return "".join(texts)

    def to_representation(self, value: Any) -> Any:
        return value


class ChatMessage(SharedFields, StrictSerializer):
    role = serializers.ChoiceField(
        choices=["system", "developer", "user", "assistant"],
        error_messages={
            "invalid_choice": (
                '"{input}" is not a supported role; use system, developer, user or assistant.'
            )
        },
    )
    content = ContentField()
    name = StrictString(required=False, max_length=64)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # "developer" is OpenAI's newer name for the system role.
        role = "system" if attrs["role"] == "developer" else attrs["role"]
        return {"role": role, "content": attrs["content"]}


def _refuse_unsupported(data: Any, names: tuple[str, ...]) -> None:
    if not isinstance(data, dict):
        return
    for name in names:
        # None, false, 0, [] and {} are what clients send for "off": accepted.
        if name in data and data[name] not in (None, False, [], {}):
            raise errors.SluiceError(
                errors.UNSUPPORTED_PARAMETER,
                f"{name!r} is not supported by Sluice's models; remove it from the request.",
                param=name,
            )


class _Generation(SharedFields, StrictSerializer):
    """What chat and text completions share."""

    model = StrictString(max_length=100)
    max_tokens = StrictInteger(required=False, allow_null=True, min_value=1, max_value=2**31 - 1)
    temperature = StrictFloat(required=False, allow_null=True, min_value=0.0, max_value=2.0)
    top_p = StrictFloat(required=False, allow_null=True, min_value=0.0, max_value=1.0)
    n = StrictInteger(required=False, allow_null=True, min_value=1, max_value=1)
    stop = StopField(required=False, allow_null=True)
    seed = StrictInteger(required=False, allow_null=True, min_value=-(2**63), max_value=2**63 - 1)
    stream = StrictBoolean(required=False, default=False)
    stream_options = serializers.DictField(required=False, allow_null=True)
    unsupported: tuple[str, ...] = ()

    def to_internal_value(self, data: Any) -> Any:
        _refuse_unsupported(data, self.unsupported)
        if isinstance(data, dict):
            dropped = {*IGNORED, *self.unsupported}
            data = {key: value for key, value in data.items() if key not in dropped}
        return super().to_internal_value(data)

    def validate_stream_options(self, value: dict | None) -> dict:
        value = value or {}
        unknown = sorted(set(value) - {"include_usage", "include_obfuscation"})
        if unknown:
            raise serializers.ValidationError(f"Unknown stream option {unknown[0]!r}.")
        return value


class ChatCompletionRequest(_Generation):
    messages = ChatMessage(many=True, allow_empty=False)
    max_completion_tokens = StrictInteger(
        required=False, allow_null=True, min_value=1, max_value=2**31 - 1
    )
    response_format = serializers.DictField(required=False, allow_null=True)
    unsupported = UNSUPPORTED_CHAT

    def validate_response_format(self, value: dict | None) -> dict | None:
        if value and value.get("type") != "text":
            raise errors.SluiceError(
                errors.UNSUPPORTED_PARAMETER,
                "Only response_format {'type': 'text'} is supported; for JSON output, publish "
                "a prompt-API with output_type 'json' and an output schema.",
                param="response_format",
            )
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # max_completion_tokens is OpenAI's newer name for max_tokens.
        newer = attrs.pop("max_completion_tokens", None)
        if newer is not None:
            attrs["max_tokens"] = newer
        if sum(len(message["content"]) for message in attrs["messages"]) > MAX_TEXT_CHARS:
            raise errors.SluiceError(
                errors.CONTEXT_LENGTH_EXCEEDED,
                f"The messages hold more than {MAX_TEXT_CHARS:,} characters.",
                param="messages",
            )
        if not any(message["content"].strip() for message in attrs["messages"]):
            raise serializers.ValidationError({"messages": ["Every message is empty."]})
        return attrs


class CompletionRequest(_Generation):
    prompt = serializers.JSONField()
    echo = StrictBoolean(required=False, default=False)
    unsupported = UNSUPPORTED_COMPLETION

    def validate_prompt(self, value: Any) -> str:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, list):
            raise errors.SluiceError(
                errors.UNSUPPORTED_PARAMETER,
                "Send one prompt per request (a string); lists of prompts and token arrays "
                "are not supported.",
                param="prompt",
            )
        if not isinstance(value, str):
            raise serializers.ValidationError("Must be a string.")
        if not value.strip():
            raise serializers.ValidationError("Must not be empty.")
        if len(value) > MAX_TEXT_CHARS:
            raise errors.SluiceError(
                errors.CONTEXT_LENGTH_EXCEEDED,
                f"The prompt holds more than {MAX_TEXT_CHARS:,} characters.",
                param="prompt",
            )
        return value

    def validate_echo(self, value: bool) -> bool:
        if value:
            raise errors.SluiceError(
                errors.UNSUPPORTED_PARAMETER, "'echo' is not supported.", param="echo"
            )
        return value


class EmbeddingRequest(SharedFields, StrictSerializer):
    model = StrictString(max_length=100)
    input = serializers.JSONField()
    encoding_format = serializers.ChoiceField(choices=["float", "base64"], default="float")
    dimensions = StrictInteger(required=False, allow_null=True, min_value=1, max_value=2**31 - 1)

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            data = {key: value for key, value in data.items() if key not in IGNORED}
        return super().to_internal_value(data)

    def validate_input(self, value: Any) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise serializers.ValidationError("Must be a non-empty string or list of strings.")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise serializers.ValidationError(
                f"At most {MAX_EMBEDDING_INPUTS} inputs per request; split the list."
            )
        for index, item in enumerate(items):
            if not isinstance(item, str):
                raise errors.SluiceError(
                    errors.UNSUPPORTED_PARAMETER
                    if isinstance(item, int | list)
                    else errors.INVALID_REQUEST,
                    f"input[{index}] must be a string (token arrays are not supported).",
                    param=f"input[{index}]",
                )
            if not item.strip():
                raise serializers.ValidationError(f"input[{index}] is empty.")
            if len(item) > MAX_EMBEDDING_ITEM_CHARS:
                raise errors.SluiceError(
                    errors.CONTEXT_LENGTH_EXCEEDED,
                    f"input[{index}] holds more than {MAX_EMBEDDING_ITEM_CHARS:,} characters.",
                    param=f"input[{index}]",
                )
        return items


class PromptApiRequest(SharedFields, StrictSerializer):
    inputs = serializers.DictField()
    parameters = serializers.DictField(required=False)
    stream = StrictBoolean(required=False, default=False)
