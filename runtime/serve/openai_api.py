"""OpenAI's API: `GET /v1/models` and `POST /v1/embeddings` (for embedding bundles).

Errors use OpenAI's body (`{"error": {"message": ...}}`), which the `openai` client raises with
that message. `add_generation_routes` adds `/v1/completions` and `/v1/chat/completions`
(serve/completions.py).
"""

from __future__ import annotations

import base64
import time

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..tasks import EMBEDDING, vectors
from .errors import ServeError
from .protocol import parse_json
from .routing import ServerState, endpoint, openai_error


def openai_routes(state: ServerState) -> list[Route]:
    created = int(time.time())

    async def models(request: Request) -> Response:
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "tvmdeploy"}
            for name in state.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def embeddings(request: Request) -> Response:
        body = parse_json(await state.body(request))
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise ServeError(400, 'an embeddings request is a JSON object with a "model" name')
        name = body["model"]
        request.state.model = name
        model = state.model(name)
        if model.task != EMBEDDING:
            embedders = [n for n, m in state.models.items() if m.task == EMBEDDING]
            raise ServeError(
                400,
                f"model {name!r} is a {model.task} model, not an embedding model; /v1/embeddings "
                f"serves {EMBEDDING} bundles (here: {', '.join(embedders) or 'none'})",
            )
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise ServeError(400, f"encoding_format must be 'float' or 'base64', not {encoding!r}")
        if body.get("dimensions") is not None:
            raise ServeError(400, "dimensions is not supported: the model's vectors are fixed")
        inputs = body.get("input")
        if _is_tokens(inputs):
            rows = [inputs] if isinstance(inputs[0], int) else inputs
            arrays = _token_arrays(rows, model.pad_token_id, model.input_names)
            outputs = await state.infer(name, arrays)
        elif isinstance(inputs, str) or (isinstance(inputs, list) and inputs):
            outputs, arrays, _ = await state.infer_texts(name, inputs)
        else:
            raise ServeError(
                400, '"input" must be a string, a list of strings, or token ids (list of ints)'
            )
        mask = arrays.get("attention_mask", np.ones_like(arrays["input_ids"]))
        found = vectors(outputs, mask)
        data = []
        for index, vector in enumerate(np.asarray(found, np.float32)):
            if encoding == "base64":
                embedding = base64.b64encode(vector.astype("<f4").tobytes()).decode()
            else:
                embedding = vector.tolist()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = int(mask.sum())
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": name, "usage": usage})

    routes = [
        Route("/v1/models", endpoint(state, "v1_models", models, error=openai_error)),
        Route(
            "/v1/embeddings",
            endpoint(state, "v1_embeddings", embeddings, error=openai_error),
            methods=["POST"],
        ),
    ]
    add_generation_routes(routes, state)
    return routes


def add_generation_routes(routes: list[Route], state: ServerState) -> None:
    """OpenAI's generation routes (`/v1/completions`, `/v1/chat/completions`, serve/completions.py)
    for the text-generation bundles."""
    from .completions import completion_routes

    routes.extend(completion_routes(state))


def _is_tokens(inputs) -> bool:
    if not isinstance(inputs, list) or not inputs:
        return False
    if all(isinstance(t, int) and not isinstance(t, bool) for t in inputs):
        return True
    return all(
        isinstance(row, list) and row and all(isinstance(t, int) for t in row) for row in inputs
    )


def _token_arrays(rows: list[list[int]], pad_id: int, names: list[str]) -> dict[str, np.ndarray]:
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad_id, np.int64)
    mask = np.zeros((len(rows), longest), np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    arrays = {"input_ids": ids}
    if "attention_mask" in names:
        arrays["attention_mask"] = mask
    return arrays
