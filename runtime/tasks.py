"""What `Model.predict` returns per task: labels, entities or vectors, from the model's outputs.

The task comes from the bundle (the exporter's task name); a bundle compiled from a bare ONNX file
may not know it, so it is then read from the output names and axes: `logits` per sequence is
classification, per token is token classification (NER); `sentence_embedding`, `pooler_output`
or `last_hidden_state` is an embedding model; `start_logits`/`end_logits` is question answering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError

CLASSIFICATION = "text-classification"
TOKEN_CLASSIFICATION = "token-classification"
EMBEDDING = "feature-extraction"
QUESTION_ANSWERING = "question-answering"

_ALIASES = {
    "sequence-classification": CLASSIFICATION,
    "sentiment-analysis": CLASSIFICATION,
    "ner": TOKEN_CLASSIFICATION,
    "sentence-similarity": EMBEDDING,
    "sentence-embedding": EMBEDDING,
}


@dataclass
class Prediction:
    """A text's top label and its softmax score."""

    label: str
    score: float
    label_id: int


@dataclass
class Entity:
    """A run of tokens with one entity type: its text, where it sits in the input string, and
    the mean softmax score of its tokens."""

    label: str
    text: str
    start: int
    end: int
    score: float


def task_of(model_info: dict[str, Any], outputs: list[dict[str, Any]]) -> str:
    """The bundle's task, or the one its outputs imply."""
    task = model_info.get("task")
    if task:
        return _ALIASES.get(task, task)
    by_name = {o["name"]: o for o in outputs}
    if "start_logits" in by_name and "end_logits" in by_name:
        return QUESTION_ANSWERING
    if "logits" in by_name:
        axes = by_name["logits"].get("axes", [])
        return TOKEN_CLASSIFICATION if "seq" in axes else CLASSIFICATION
    if {"sentence_embedding", "pooler_output", "last_hidden_state", "token_embeddings"} & set(
        by_name
    ):
        return EMBEDDING
    return "unknown"


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def labels(logits: np.ndarray, id2label: dict[int, str]) -> list[Prediction]:
    probs = _softmax(logits)
    return [
        Prediction(id2label.get(int(i), str(int(i))), float(p[i]), int(i))
        for p, i in zip(probs, probs.argmax(axis=-1), strict=True)
    ]


def entities(
    logits: np.ndarray, id2label: dict[int, str], texts: list[str], encodings
) -> list[list[Entity]]:
    """Tokens grouped into entities the way transformers' "simple" aggregation does: a `B-`
    label or a change of type starts a new entity, `O` ends one; special tokens are skipped."""
    probs = _softmax(logits)
    results = []
    for row, (text, encoding) in enumerate(zip(texts, encodings, strict=True)):
        found: list[Entity] = []
        current: dict[str, Any] | None = None
        for position, (start, end) in enumerate(encoding.offsets):
            if encoding.special_tokens_mask[position] or start == end:
                continue
            label_id = int(probs[row, position].argmax())
            label = id2label.get(label_id, str(label_id))
            prefix, _, kind = label.rpartition("-") if "-" in label else ("", "", label)
            if kind == "O" or label == "O":
                _close(current, found, text)
                current = None
                continue
            continues = current and current["label"] == kind and prefix != "B"
            if not continues:
                _close(current, found, text)
                current = {"label": kind, "start": start, "scores": []}
            current["end"] = end
            current["scores"].append(float(probs[row, position, label_id]))
        _close(current, found, text)
        results.append(found)
    return results


def _close(current: dict[str, Any] | None, found: list[Entity], text: str) -> None:
    if current:
        start, end = current["start"], current["end"]
        score = float(np.mean(current["scores"]))
        found.append(Entity(current["label"], text[start:end], start, end, score))


def vectors(outputs: dict[str, np.ndarray], attention_mask: np.ndarray) -> np.ndarray:
    """One vector per text: the model's own sentence embedding where it has one, else the mean
    of its token embeddings over the unmasked tokens (sentence-transformers' mean pooling)."""
    if "sentence_embedding" in outputs:
        return np.asarray(outputs["sentence_embedding"], np.float32)
    tokens = outputs.get("last_hidden_state", outputs.get("token_embeddings"))
    if tokens is None:
        if "pooler_output" in outputs:
            return np.asarray(outputs["pooler_output"], np.float32)
        raise InputError(f"no embedding among the model's outputs ({', '.join(outputs)})")
    mask = attention_mask[..., None].astype(np.float32)
    summed = (np.asarray(tokens, np.float32) * mask).sum(axis=1)
    return summed / np.clip(mask.sum(axis=1), 1e-9, None)
