"""The OpenAI-compatible data plane: /v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/models and the prompt-API endpoints /v1/apis/<slug>.

Async DRF views (adrf): a request waiting on a worker holds no thread of its own while it
waits. Each view validates the body with a serializer, then hands it to
gateway.dataplane, which authenticates from the in-process catalog, admits in one Redis
call, enqueues in one more and awaits the reply stream.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import re
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

from adrf.views import APIView
from django.http import HttpRequest, StreamingHttpResponse
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from sluice import errors
from sluice.errors import SluiceError
from sluice.middleware import new_request_id
from sluice.parsers import SluiceJSONParser

from . import dataplane, prompts
from .dataplane import Call, guarded
from .openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    PromptApiRequest,
)

# OpenAI's finish reasons; the backends also report why they stopped early.
FINISH_REASONS = {"stop": "stop", "length": "length"}
JSON_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


class AnyAccept(DefaultContentNegotiation):
    """Answer in JSON (or SSE) whatever the client's Accept header says."""

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class DataPlaneView(APIView):
    """Base of the /v1 views: no session, no DRF auth (the catalog does it), JSON only."""

    authentication_classes = ()
    permission_classes = ()
    throttle_classes = ()
    parser_classes = (SluiceJSONParser,)
    renderer_classes = (JSONRenderer,)
    content_negotiation_class = AnyAccept
    endpoint = ""

    async def async_dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any):
        # adrf runs DRF's initial() through sync_to_async, a thread hop per request; with
        # no authentication, permission or throttle classes it touches neither the
        # database nor the network, so it runs here, on the event loop.
        self.args, self.kwargs = args, kwargs
        request = self.initialize_request(request, *args, **kwargs)
        self.request = request
        self.headers = self.default_response_headers
        try:
            self.initial(request, *args, **kwargs)
            handler = getattr(self, request.method.lower(), None)
            if request.method.lower() not in self.http_method_names or handler is None:
                handler = self.http_method_not_allowed
                response = handler(request, *args, **kwargs)
            else:
                # Our handlers are coroutines; DRF's own (options) are not.
                response = handler(request, *args, **kwargs)
                if inspect.isawaitable(response):
                    response = await response
        except Exception as exc:
            response = self.handle_exception(exc)
        self.response = self.finalize_response(request, response, *args, **kwargs)
        return self.response

    def new_call(self, request: Request) -> Call:
        # Our own id, even when the client sent X-Request-ID: leases, reservations and
        # reply streams are keyed on it, so a client reusing an id must not collide.
        request_id = new_request_id()
        request._request.request_id = request_id
        return Call(request_id=request_id, endpoint=self.endpoint, caller=None)

    def validated(self, serializer_class, request: Request) -> dict[str, Any]:
        serializer = serializer_class(data=request.data)
        serializer.is_valid(raise_exception=True)
        return serializer.validated_data


def _respond(call: Call, body: dict[str, Any]) -> Response:
    return Response(body, headers=call.headers())


def _usage(call: Call) -> dict[str, int]:
    return {
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.completion_tokens,
        "total_tokens": call.prompt_tokens + call.completion_tokens,
    }


def _finish(done: dict[str, Any]) -> str:
    return FINISH_REASONS.get(str(done.get("finish_reason")), "length")


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _generation_payload(data: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    payload: dict[str, Any] = {"max_tokens": max_tokens}
    for name in ("temperature", "top_p", "stop", "seed"):
        if data.get(name) is not None:
            payload[name] = data[name]
    return payload


async def _stream_response(
    call: Call,
    events: AsyncIterator[tuple[str, dict[str, Any]]],
    first: tuple[str, dict[str, Any]],
    *,
    piece,
    final,
    usage_chunk,
) -> StreamingHttpResponse:
    """Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`.

    The first event has already arrived, so an error before any output (a prompt too long
    for the model, say) was answered with a proper status code instead of a broken stream.
    `piece(text)`, `final(done)` and `usage_chunk()` build the chunks of one endpoint.
    """

    async def body() -> AsyncIterator[bytes]:
        response.started = True
        try:
            event = first
            while True:
                kind, data = event
                if kind == "chunk":
                    if data.get("text"):
                        yield _sse(piece(data["text"]))
                else:
                    yield _sse(final(data))
                    chunk = usage_chunk()
                    if chunk is not None:
                        yield _sse(chunk)
                    yield b"data: [DONE]\n\n"
                    return
                event = await anext(events)
        except SluiceError as exc:
            # The status line has gone out; the error travels as an event, which the
            # openai client raises as APIError.
            call.fail(exc)
            await call.release(cancel=True)
            payload = errors.error_payload(exc.error, exc.message, request_id=call.request_id)
            yield _sse(payload)
        except BaseException:
            await call.client_gone()
            raise
        finally:
            await call.log()

    response = _EventStream(call, body())
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass events on as they come
    for name, value in call.headers().items():
        response[name] = value
    return response


class _EventStream(StreamingHttpResponse):
    """The SSE response; from here on the body owns the call (Call.detach()).

    Should the client leave before the body starts (while the status line goes out, say),
    Django closes the response without ever running the body: close() then gives the lease
    and the reservation back and logs the call, which the body would have done.
    """

    def __init__(self, call: Call, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, content_type="text/event-stream")
        self.call = call
        self.started = False
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        super().close()  # Django calls this from a worker thread (sync_to_async)
        if not self.started:
            asyncio.run_coroutine_threadsafe(self._never_sent(), self._loop)

    async def _never_sent(self) -> None:
        try:
            await self.call.client_gone()
        finally:
            await self.call.log()


class _GenerationView(DataPlaneView):
    serializer_class: type = ChatCompletionRequest
    tasks: tuple[str, ...] = ("chat",)
    object_name = ""
    id_prefix = ""

    def prompt(self, data: dict[str, Any]) -> tuple[dict[str, Any], list[str], str | None]:
        """(payload part, texts for the token estimate, task override)."""
        raise NotImplementedError

    def choice(self, text: str, done: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, text: str | None, finish: str | None) -> dict[str, Any]:
        raise NotImplementedError

    async def post(self, request: Request) -> Response | StreamingHttpResponse:
        call = self.new_call(request)
        async with guarded(call):
            call.caller = await dataplane.authenticate(request._request)
            data = self.validated(self.serializer_class, request)
            deployment = await dataplane.access_deployment(
                call.caller, data["model"], tasks=self.tasks
            )
            max_tokens = dataplane.resolve_max_tokens(
                call.caller, deployment, data.get("max_tokens")
            )
            _, deadline_ms = dataplane.deadline_for(request._request, deployment)
            prompt, texts, task = self.prompt(data)
            payload = {**prompt, **_generation_payload(data, max_tokens)}
            await call.submit(
                deployment=deployment,
                deadline_ms=deadline_ms,
                reserve_tokens=dataplane.estimate_tokens(*texts) + max_tokens,
                payload=payload,
                stream=data["stream"],
                task=task,
            )
            created = int(time.time())
            head = {"id": f"{self.id_prefix}{call.request_id[4:]}", "created": created}
            head["model"] = deployment.slug
            if data["stream"]:
                events = call.events()
                first = await anext(events)
                call.detach()
                include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
                return await _stream_response(
                    call,
                    events,
                    first,
                    piece=lambda text: self.chunk(head, self.delta(text, None)),
                    final=lambda done: self.chunk(head, self.delta(None, _finish(done))),
                    usage_chunk=lambda: (
                        {**self.chunk(head, None), "choices": [], "usage": _usage(call)}
                        if include_usage
                        else None
                    ),
                )
            outcome = await call.result()
            text = (outcome.done or {}).get("text") or "".join(outcome.chunks)
            body = {
                **head,
                "object": self.object_name,
                "choices": [self.choice(text, outcome.done or {})],
                "usage": _usage(call),
            }
            return _respond(call, body)

    def chunk(self, head: dict[str, Any], choice: dict[str, Any] | None) -> dict[str, Any]:
        return {**head, "object": self.chunk_object, "choices": [choice] if choice else []}


class ChatCompletionsView(_GenerationView):
    """POST /v1/chat/completions"""

    endpoint = "chat.completions"
    serializer_class = ChatCompletionRequest
    tasks = ("chat",)
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def prompt(self, data):
        messages = [dict(message) for message in data["messages"]]
        return {"messages": messages}, [m["content"] for m in messages], "chat"

    def choice(self, text, done):
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": _finish(done),
        }

    def delta(self, text, finish):
        delta = {} if text is None else {"role": "assistant", "content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


class CompletionsView(_GenerationView):
    """POST /v1/completions"""

    endpoint = "completions"
    serializer_class = CompletionRequest
    tasks = ("completion", "chat")
    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def prompt(self, data):
        return {"prompt": data["prompt"]}, [data["prompt"]], "completion"

    def choice(self, text, done):
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(done)}

    def delta(self, text, finish):
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


class EmbeddingsView(DataPlaneView):
    """POST /v1/embeddings"""

    endpoint = "embeddings"

    async def post(self, request: Request) -> Response:
        call = self.new_call(request)
        async with guarded(call):
            call.caller = await dataplane.authenticate(request._request)
            data = self.validated(EmbeddingRequest, request)
            deployment = await dataplane.access_deployment(
                call.caller, data["model"], tasks=("embedding",)
            )
            dimensions = data.get("dimensions")
            native = deployment.config.get("dimensions")
            if dimensions is not None and dimensions != native:
                raise SluiceError(
                    errors.UNSUPPORTED_PARAMETER,
                    f"'{deployment.slug}' returns vectors of {native or 'its own'} dimensions "
                    "and cannot shorten them; leave 'dimensions' out.",
                    param="dimensions",
                )
            _, deadline_ms = dataplane.deadline_for(request._request, deployment)
            await call.submit(
                deployment=deployment,
                deadline_ms=deadline_ms,
                reserve_tokens=dataplane.estimate_tokens(*data["input"]),
                payload={"input": data["input"]},
                stream=False,
            )
            done = (await call.result()).done or {}
            vectors = done.get("embeddings") or []
            encode = _base64_floats if data["encoding_format"] == "base64" else list
            body = {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": index, "embedding": encode(vector)}
                    for index, vector in enumerate(vectors)
                ],
                "model": deployment.slug,
                "usage": {"prompt_tokens": call.prompt_tokens, "total_tokens": call.prompt_tokens},
            }
            return _respond(call, body)


def _base64_floats(vector: list[float]) -> str:
    """OpenAI's base64 encoding: little-endian float32s (the openai client's default)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _model(deployment) -> dict[str, Any]:
    return {
        "id": deployment.slug,
        "object": "model",
        "created": deployment.created,
        "owned_by": "sluice",
        "task": deployment.task,
    }


class ModelListView(DataPlaneView):
    """GET /v1/models: the models this key's tenant may call."""

    endpoint = "models"

    async def get(self, request: Request) -> Response:
        call = self.new_call(request)
        async with guarded(call):
            call.caller = await dataplane.authenticate(request._request)
            found = await dataplane.catalog.subscribed_deployments(call.caller.tenant)
            return Response({"object": "list", "data": [_model(entry) for entry in found]})


class ModelDetailView(DataPlaneView):
    """GET /v1/models/<model>"""

    endpoint = "models"

    async def get(self, request: Request, model: str) -> Response:
        call = self.new_call(request)
        async with guarded(call):
            call.caller = await dataplane.authenticate(request._request)
            deployment = await dataplane.catalog.deployment(model)
            if (
                deployment is None
                or not deployment.enabled
                or model not in call.caller.tenant.deployments
            ):
                raise SluiceError(
                    errors.MODEL_NOT_FOUND,
                    f"The model '{model}' does not exist or your key may not use it.",
                    param="model",
                )
            return Response(_model(deployment))


class PromptApiView(DataPlaneView):
    """POST /v1/apis/<slug>[?version=N]: run a published prompt-API."""

    endpoint = "apis"

    async def post(self, request: Request, slug: str) -> Response | StreamingHttpResponse:
        call = self.new_call(request)
        async with guarded(call):
            call.caller = await dataplane.authenticate(request._request)
            data = self.validated(PromptApiRequest, request)
            prompt_api = await dataplane.access_prompt_api(call.caller, slug)
            version = _pick_version(prompt_api, request.query_params.get("version"))
            call.version_id = version.id
            errors_found = prompts.schema_errors(
                version.input_validator, data["inputs"], param="input_schema"
            )
            if errors_found:
                first = errors_found[0]
                where = ".".join(str(part) for part in first.absolute_path)
                param = f"inputs.{where}" if where else "inputs"
                raise SluiceError(
                    errors.INVALID_REQUEST,
                    f"{param}: {first.message}",
                    param=param,
                    details=[error.message for error in errors_found[:10]],
                )
            overrides = data.get("parameters") or {}
            prompts.check_parameters(overrides)
            parameters = {**version.parameters, **overrides}
            if data["stream"] and version.output_type == "json":
                raise SluiceError(
                    errors.UNSUPPORTED_PARAMETER,
                    "A prompt-API with JSON output cannot stream: its answer is validated as a "
                    "whole.",
                    param="stream",
                )
            await dataplane.check_owner_access(prompt_api, version)
            deployment = await dataplane.catalog.deployment(version.deployment)
            if deployment is None or not deployment.enabled:
                raise SluiceError(
                    errors.MODEL_NOT_FOUND,
                    f"The model behind '{slug}' v{version.number} ('{version.deployment}') is "
                    "disabled.",
                )
            dataplane.check_task(deployment, ("chat", "completion"))
            max_tokens = dataplane.resolve_max_tokens(
                call.caller, deployment, parameters.get("max_tokens")
            )
            _, deadline_ms = dataplane.deadline_for(request._request, deployment)
            messages = prompts.render_messages(version.messages, data["inputs"])
            await call.submit(
                deployment=deployment,
                deadline_ms=deadline_ms,
                reserve_tokens=dataplane.estimate_tokens(*(m["content"] for m in messages))
                + max_tokens,
                payload={"messages": messages, **_generation_payload(parameters, max_tokens)},
                stream=data["stream"],
                task="chat",
            )
            head = {
                "id": f"papi-{call.request_id[4:]}",
                "object": "prompt_api.result",
                "prompt_api": prompt_api.slug,
                "version": version.number,
                "model": deployment.slug,
            }
            if data["stream"]:
                events = call.events()
                first = await anext(events)
                call.detach()
                return await _stream_response(
                    call,
                    events,
                    first,
                    piece=lambda text: {**head, "object": "prompt_api.chunk", "delta": text},
                    final=lambda done: {
                        **head,
                        "object": "prompt_api.chunk",
                        "delta": "",
                        "finish_reason": _finish(done),
                        "usage": _usage(call),
                    },
                    usage_chunk=lambda: None,
                )
            outcome = await call.result()
            done = outcome.done or {}
            text = done.get("text") or "".join(outcome.chunks)
            output: Any = text
            if version.output_type == "json":
                output = _json_output(text, version)
            body = {**head, "output": output, "finish_reason": _finish(done), "usage": _usage(call)}
            return _respond(call, body)


def _pick_version(prompt_api, raw: str | None):
    if raw is None:
        number = prompt_api.active_number
        if number is None or number not in prompt_api.versions:
            raise SluiceError(
                errors.NOT_FOUND, f"The prompt-API '{prompt_api.slug}' has no published version."
            )
        return prompt_api.versions[number]
    if not re.fullmatch(r"[0-9]{1,9}", raw):
        raise SluiceError(
            errors.INVALID_REQUEST, "version must be a version number.", param="version"
        )
    version = prompt_api.versions.get(int(raw))
    if version is None:
        raise SluiceError(
            errors.NOT_FOUND,
            f"The prompt-API '{prompt_api.slug}' has no published version {raw}.",
            param="version",
        )
    return version


def _json_output(text: str, version) -> Any:
    fenced = JSON_FENCE.match(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        raise SluiceError(
            errors.INVALID_MODEL_OUTPUT,
            "The model's answer is not JSON, so it cannot be returned as this prompt-API's "
            "output. Tokens were charged; retrying may help.",
            details={"text": text[:2000]},
        ) from None
    if version.output_validator is not None:
        problems = prompts.schema_errors(version.output_validator, value, param="output_schema")
        if problems:
            raise SluiceError(
                errors.INVALID_MODEL_OUTPUT,
                f"The model's JSON does not match the output schema: {problems[0].message}",
                details={"text": text[:2000], "errors": [p.message for p in problems[:10]]},
            )
    return value
