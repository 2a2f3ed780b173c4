"""OpenAI's generation routes for text-generation bundles: `POST /v1/completions` and
`POST /v1/chat/completions`, whole or streamed as server-sent events (`stream: true`).

Requests decode together: the `Generator` advances every running request in one batched step
(continuous batching, runtime/generate.py), so the server only feeds it from worker threads. A
client that disconnects mid-stream has its stream closed, which frees its sequence at the next
step. Sampling fields map one to one (`temperature`, `top_p`, `max_tokens`, `stop`, `seed`,
plus `top_k` and `repetition_penalty` as extensions); `n` > 1, `logprobs`, `tools` and
`response_format` are refused by name rather than ignored.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..generate import TEXT_GENERATION, GenerationResult, Generator
from .errors import ServeError
from .protocol import parse_json
from .routing import ServerState, endpoint, openai_error

#: OpenAI fields this server does not implement: refused, never silently ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "response_format", "suffix")
DEFAULT_MAX_TOKENS = 256


def _generator(state: ServerState, body: Any) -> tuple[str, Generator]:
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise ServeError(400, 'a completion request is a JSON object with a "model" name')
    name = body["model"]
    model = state.model(name)
    if not isinstance(model, Generator):
        generators = [n for n, m in state.models.items() if isinstance(m, Generator)]
        raise ServeError(
            400,
            f"model {name!r} is a {model.task} model, not a {TEXT_GENERATION} model; the "
            f"completion routes serve generation bundles (here: {', '.join(generators) or 'none'})",
        )
    return name, model


def _options(body: dict[str, Any]) -> dict[str, Any]:
    """Generator options from an OpenAI request body; what it cannot honour is a 400."""
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, [], {}):
            raise ServeError(400, f"{key} is not supported by this server")
    if body.get("n", 1) != 1:
        raise ServeError(400, "n must be 1 (one completion per request)")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
    numbers = {
        "max_new_tokens": (max_tokens, int),
        "temperature": (body.get("temperature", 1.0), float),
        "top_p": (body.get("top_p", 1.0), float),
        "top_k": (body.get("top_k", 0), int),
        "repetition_penalty": (body.get("repetition_penalty", 1.0), float),
    }
    options: dict[str, Any] = {}
    for key, (value, kind) in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ServeError(400, f"{key} must be a number, not {value!r}")
        if kind is int and int(value) != value:
            raise ServeError(400, f"{key} must be an integer, not {value!r}")
        options[key] = kind(value)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ServeError(400, f"seed must be an integer, not {seed!r}")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ServeError(400, "stop must be a string or a list of strings")
    options.update(seed=seed, stop=stop or None)
    return options


def _usage(result: GenerationResult) -> dict[str, Any]:
    """OpenAI's usage: cached_tokens are the prompt's tokens a kept sequence held (prefix cache)."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def completion_routes(state: ServerState) -> list[Route]:
    """The two routes, wrapped like every other (api key, errors, metrics, log)."""

    async def run(request: Request, chat: bool) -> Response:
        body = parse_json(await state.body(request))
        name, generator = _generator(state, body)
        request.state.model = name
        options = _options(body)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ServeError(400, '"messages" must be a non-empty list of {role, content}')
            request_args: dict[str, Any] = {"messages": messages}
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            token_ids = isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt
            )
            if not (isinstance(prompt, str) or (token_ids and prompt)):
                raise ServeError(400, '"prompt" must be a string or a list of token ids')
            request_args = {"prompt": prompt}
        created, ident = int(time.time()), uuid.uuid4().hex[:24]
        kind = "chat.completion" if chat else "text_completion"
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{ident}"
        if not body.get("stream"):
            result = await run_in_threadpool(generator.generate, **request_args, **options)
            state.metrics.generated(name, result)
            choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": result.text}
            else:
                choice.update(text=result.text, logprobs=None)
            return JSONResponse(
                {
                    "id": ident,
                    "object": kind,
                    "created": created,
                    "model": name,
                    "choices": [choice],
                    "usage": _usage(result),
                }
            )
        # Validation errors (prompt too long, bad ids) raise here, before the 200 is sent.
        stream = await run_in_threadpool(
            lambda: generator.generate(**request_args, **options, stream=True)
        )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any] | str, finish: str | None) -> bytes:
            if chat:
                part: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                part = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
            kind_chunk = "chat.completion.chunk" if chat else "text_completion"
            payload = {
                "id": ident,
                "object": kind_chunk,
                "created": created,
                "model": name,
                "choices": [part],
            }
            return _sse(payload)

        async def events():
            ended = False  # the generation's end counted in the metrics
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""}, None)
                async for piece in iterate_in_threadpool(iter(stream)):
                    yield chunk({"content": piece} if chat else piece, None)
                result = stream.result
                state.metrics.generated(name, result)
                ended = True
                yield chunk({} if chat else "", result.finish_reason)
                if include_usage:
                    yield _sse(
                        {
                            "id": ident,
                            "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created,
                            "model": name,
                            "choices": [],
                            "usage": _usage(result),
                        }
                    )
                yield _sse("[DONE]")
            except (asyncio.CancelledError, GeneratorExit):  # the client went away
                if not ended:
                    state.metrics.streams_abandoned.labels(name).inc()
                raise
            finally:  # the client went away (or the stream ended): free the sequence
                stream.close()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def completions(request: Request) -> Response:
        return await run(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await run(request, chat=True)

    return [
        Route(
            "/v1/completions",
            endpoint(state, "v1_completions", completions, error=openai_error),
            methods=["POST"],
        ),
        Route(
            "/v1/chat/completions",
            endpoint(state, "v1_chat_completions", chat_completions, error=openai_error),
            methods=["POST"],
        ),
    ]
