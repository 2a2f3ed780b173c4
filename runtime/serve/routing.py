"""What every route shares: the served models, the api key, and one wrapper per endpoint that
checks the key, turns errors into 4xx/5xx bodies, counts the request and writes its access log.

No exception leaves an endpoint: a failure answers that one request (500 for the unexpected,
logged with its traceback) and the server goes on serving.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import BundleError, InputError, OptionError
from ..generate import Generator
from ..model import Model
from .batcher import Batcher
from .errors import ServeError
from .metrics import Metrics

log = logging.getLogger("tvmdeploy.serve")
Handler = Callable[[Request], Awaitable[Response]]


class ServerState:
    """The models by name, their batchers, the metrics and the api key of one app."""

    def __init__(
        self,
        models: dict[str, Model | Generator],
        *,
        max_batch_delay_ms: float = 2.0,
        max_queue: int = 256,
        api_key: str | None = None,
        max_body_bytes: int = 64 << 20,
        max_batch: int | None = None,
        length_classes: bool = False,
    ):
        if not models:
            raise OptionError("serve needs at least one model")
        self.models = dict(models)
        self.metrics = Metrics()
        # Generation bundles batch inside their Generator (one decode step for all requests).
        self.batchers = {
            name: Batcher(
                name,
                model,
                self.metrics,
                max_batch_delay_ms,
                max_queue,
                max_batch,
                length_classes=length_classes,
            )
            for name, model in self.models.items()
            if not isinstance(model, Generator)
        }
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.ready = False

    def model(self, name: str) -> Model | Generator:
        """The model served as `name`, or a 404 naming the ones there are."""
        if name not in self.models:
            raise ServeError(
                404, f"unknown model {name!r}; this server has: {', '.join(sorted(self.models))}"
            )
        return self.models[name]

    def tensor_model(self, name: str) -> Model:
        """The model served as `name` for the tensor and text routes; a generation bundle is a
        400 that points at the completion routes."""
        model = self.model(name)
        if isinstance(model, Generator):
            raise ServeError(
                400,
                f"model {name!r} generates text: use /v1/completions or /v1/chat/completions",
            )
        return model

    async def body(self, request: Request) -> bytes:
        """The request body, refused with 413 past `max_body_bytes`."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ServeError(413, f"request body over {self.max_body_bytes} bytes")
        body = await request.body()
        if len(body) > self.max_body_bytes:
            raise ServeError(413, f"request body over {self.max_body_bytes} bytes")
        return body

    async def infer(self, name: str, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Outputs for one request's token arrays: validated here (a 400 naming the input),
        then batched with other requests."""
        model = self.tensor_model(name)
        arrays = model.validate(inputs)
        return await self.batchers[name].run(arrays)

    async def infer_texts(self, name: str, texts: Any):
        """Tokenize `texts` (in a worker thread) and run them: (outputs, arrays, encodings)."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ServeError(400, '"text" must be a string or a non-empty list of strings')
        model = self.tensor_model(name)
        try:
            tokenizer = model.tokenizer
        except BundleError as error:
            raise ServeError(400, str(error)) from None
        encodings = await run_in_threadpool(tokenizer.encode_batch, texts)
        arrays = model.encode(texts, encodings)
        return await self.infer(name, arrays), arrays, encodings

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.api_key.encode()
        )


def v2_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The Open Inference Protocol's error body: {"error": message}."""
    return JSONResponse({"error": message}, status, headers=headers)


def openai_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """OpenAI's error body, which its client shows as the exception's message."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status, headers=headers)


def endpoint(
    state: ServerState,
    route: str,
    handler: Handler,
    *,
    guarded: bool = True,
    error: Callable[..., Response] = v2_error,
) -> Handler:
    """`handler` with the api key checked (unless not `guarded`), errors answered as bodies
    that name the problem, and the request counted and logged. A handler may set
    `request.state.model` to the model it served, for the metrics and the log."""

    async def call(request: Request) -> Response:
        start = time.perf_counter()
        request.state.model = request.path_params.get("name", "")
        try:
            if guarded and not state.authorized(request):
                response = error(
                    401,
                    "missing or wrong api key: send 'Authorization: Bearer KEY'",
                    {"WWW-Authenticate": "Bearer"},
                )
            else:
                response = await handler(request)
        except ServeError as failure:
            response = error(failure.status, str(failure), failure.headers)
        except (InputError, OptionError) as failure:
            response = error(400, str(failure))
        except Exception as failure:  # one request fails, never the server
            log.exception("%s %s failed", request.method, request.url.path)
            response = error(500, f"internal error: {type(failure).__name__}: {failure}")
        seconds = time.perf_counter() - start
        model = str(request.state.model or "")
        state.metrics.observe(route, model, response.status_code, seconds)
        client = request.client.host if request.client else ""
        log.info(
            "%s %s %d %.1f ms",
            request.method,
            request.url.path,
            response.status_code,
            seconds * 1e3,
            extra={
                "method": request.method,
                "path": request.url.path,
                "status": response.status_code,
                "latency_ms": round(seconds * 1e3, 3),
                "model": model,
                "route": route,
                "client": client,
            },
        )
        return response

    return call
