"""The ASGI app: KServe's Open Inference Protocol v2, a text route per task, OpenAI's API and
Prometheus metrics over the models given.

Routes (NAME is a model's name; `/versions/1` may follow it, as tritonclient sends):
`GET /v2/health/live|ready` (no api key), `GET /v2`, `GET /v2/models/NAME`,
`GET /v2/models/NAME/ready`, `POST /v2/models/NAME/infer` (JSON or binary tensors),
`POST /v2/models/NAME/predict` ({"text": [...]}: labels, entities or embeddings),
`GET /v1/models`, `POST /v1/embeddings`, `POST /v1/completions` and `/v1/chat/completions`
(generation bundles, streamed as server-sent events with `stream: true`), `GET /metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..generate import Generator
from ..model import Model
from ..tasks import CLASSIFICATION, EMBEDDING, TOKEN_CLASSIFICATION, entities, labels, vectors
from .errors import ServeError
from .openai_api import openai_routes
from .protocol import HEADER_LENGTH, decode_infer, encode_infer, metadata, parse_json
from .routing import ServerState, endpoint

VERSION = "1"


def create_app(
    models: dict[str, Model | Generator],
    *,
    max_batch_delay_ms: float = 2.0,
    max_queue: int = 256,
    api_key: str | None = None,
    max_body_bytes: int = 64 << 20,
    max_batch: int | None = None,
    length_classes: bool = False,
) -> Starlette:
    """A Starlette app serving `models` by name; `app.state.server` is its `ServerState`.

    Concurrent requests for a model are batched within `max_batch_delay_ms` up to its largest
    bucket's batch (or `max_batch` rows; 1 runs each request alone), first come first served
    (`length_classes=True`: rows of one length class together); past `max_queue` waiting rows
    a request gets 429. With `api_key`, every route but health needs `Authorization: Bearer KEY`.
    The batchers start with the app's lifespan (uvicorn, or `with TestClient(app)`), which is
    ready once each has timed its model's buckets, and stop after the last request is answered.
    """
    state = ServerState(
        models,
        max_batch_delay_ms=max_batch_delay_ms,
        max_queue=max_queue,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        max_batch=max_batch,
        length_classes=length_classes,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        for batcher in state.batchers.values():
            batcher.start()
        for batcher in state.batchers.values():  # its buckets timed: no request waits on that
            await asyncio.to_thread(batcher.warmed.wait, 600)
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            for batcher in state.batchers.values():
                await asyncio.to_thread(batcher.stop)

    app = Starlette(routes=v2_routes(state) + openai_routes(state), lifespan=lifespan)
    app.state.server = state
    return app


def _versioned(path: str) -> list[str]:
    """A model route, and the same under `/versions/{version}`."""
    return [path, path.replace("{name}", "{name}/versions/{version}")]


def _check_version(request: Request) -> None:
    version = request.path_params.get("version")
    if version is not None and version != VERSION:
        name = request.path_params["name"]
        raise ServeError(404, f"model {name!r} has only version {VERSION}, not {version!r}")


def v2_routes(state: ServerState) -> list[Route]:
    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": state.ready}, 200 if state.ready else 503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(
            {"name": "tvmdeploy", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
        )

    async def model_metadata(request: Request) -> Response:
        _check_version(request)
        name = request.path_params["name"]
        model = state.tensor_model(name)
        return JSONResponse(metadata(name, model.input_names, model.bundle.outputs))

    async def model_ready(request: Request) -> Response:
        _check_version(request)
        name = request.path_params["name"]
        state.model(name)
        return JSONResponse({"name": name, "ready": state.ready}, 200 if state.ready else 503)

    async def infer(request: Request) -> Response:
        _check_version(request)
        name = request.path_params["name"]
        model = state.tensor_model(name)
        body = await state.body(request)
        decoded = decode_infer(body, request.headers.get(HEADER_LENGTH), model.input_names)
        outputs = await state.infer(name, decoded.inputs)
        content, headers = encode_infer(name, outputs, decoded)
        return Response(content, headers=headers)

    async def predict(request: Request) -> Response:
        name = request.path_params["name"]
        model = state.tensor_model(name)
        body = parse_json(await state.body(request))
        if not isinstance(body, dict) or "text" not in body:
            raise ServeError(400, 'a predict request is a JSON object {"text": [strings]}')
        task = model.task
        if task not in (CLASSIFICATION, TOKEN_CLASSIFICATION, EMBEDDING):
            raise ServeError(
                400,
                f"predict covers classification, token classification and embeddings; model "
                f"{name!r} is {task}: send token ids to /v2/models/{name}/infer",
            )
        texts = [body["text"]] if isinstance(body["text"], str) else body["text"]
        outputs, arrays, encodings = await state.infer_texts(name, texts)
        found = _predictions(model, texts, outputs, arrays, encodings)
        return JSONResponse({"model_name": name, "task": task, **found})

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    def route(path: str, name: str, handler, methods=("GET",), guarded=True) -> Route:
        return Route(path, endpoint(state, name, handler, guarded=guarded), methods=list(methods))

    routes = [
        route("/v2/health/live", "health_live", live, guarded=False),
        route("/v2/health/ready", "health_ready", ready, guarded=False),
        route("/v2", "server_metadata", server_metadata),
        route("/metrics", "metrics", metrics),
    ]
    for path in _versioned("/v2/models/{name}"):
        routes.append(route(path, "model_metadata", model_metadata))
    for path in _versioned("/v2/models/{name}/ready"):
        routes.append(route(path, "model_ready", model_ready))
    for path in _versioned("/v2/models/{name}/infer"):
        routes.append(route(path, "infer", infer, methods=("POST",)))
    routes.append(route("/v2/models/{name}/predict", "predict", predict, methods=("POST",)))
    return routes


def _predictions(model: Model, texts: list[str], outputs, arrays, encodings) -> dict[str, Any]:
    """What `Model.predict` gives, as JSON: labels, entities or embeddings."""
    task = model.task
    if task == EMBEDDING:
        mask = arrays.get("attention_mask", np.ones_like(arrays["input_ids"]))
        return {"embeddings": np.asarray(vectors(outputs, mask), np.float32).tolist()}
    logits = outputs["logits"] if "logits" in outputs else next(iter(outputs.values()))
    id2label = {int(k): v for k, v in model.bundle.model.get("id2label", {}).items()}
    if task == TOKEN_CLASSIFICATION:
        found = entities(logits, id2label, texts, encodings)
        return {"entities": [[vars(e) for e in row] for row in found]}
    return {"labels": [vars(p) for p in labels(logits, id2label)]}
