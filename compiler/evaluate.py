"""Task accuracy of each artifact on labelled examples, against fp32, for the accuracy gate.

A reduced precision is worth taking only if it keeps the task's accuracy; that is measured, not
assumed: `tvmdeploy compile --eval-data FILE` (and the demo, on its held-out split) runs every
artifact this machine can run on the examples and records, per artifact, its accuracy, the fp32
accuracy (ONNX Runtime on the exported graph, the reference every parity check uses) and how
often its label agrees with fp32's. The runtime's `precision="auto"` reads those figures.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tvmdeploy.runtime import load
from tvmdeploy.runtime.bundle import Bundle
from tvmdeploy.runtime.probe import missing_requirements, probe

from .errors import OptionError


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: int


def read_examples(path: str | Path, id2label: dict[str, str]) -> list[LabelledText]:
    """Examples from a JSONL (`{"text": ..., "label": ...}` per line) or CSV (`text,label`
    header) file; a label is the class index or its name in the model's id2label."""
    path = Path(path)
    by_name = {str(v): int(k) for k, v in id2label.items()}

    def label_of(value: Any, where: str) -> int:
        if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
            return int(value)
        if str(value) in by_name:
            return by_name[str(value)]
        raise OptionError(
            f"{where}: label {value!r} is neither a class index nor one of the model's labels "
            f"({', '.join(by_name) or 'none'})"
        )

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise OptionError(f"cannot read --eval-data {path}: {err.strerror or err}") from None
    examples = []
    if path.suffix == ".csv":
        for k, row in enumerate(csv.DictReader(lines), start=2):
            if "text" not in row or "label" not in row:
                raise OptionError(f"{path}:{k}: a CSV needs 'text' and 'label' columns")
            examples.append(LabelledText(row["text"], label_of(row["label"], f"{path}:{k}")))
    else:
        for k, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, label = row["text"], row["label"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise OptionError(
                    f'{path}:{k}: expected a JSON object {{"text": ..., "label": ...}}'
                ) from None
            examples.append(LabelledText(str(text), label_of(label, f"{path}:{k}")))
    if not examples:
        raise OptionError(f"{path}: no examples")
    return examples


def batched_labels(run, model, texts: list[str], batch_size: int = 8) -> np.ndarray:
    """The argmax label of every text, `run` mapping token arrays to logits; batched in order
    of token length, so each batch pads to a short bucket (the same labels, fewer padded
    tokens: in text order, nearly every batch of short snippets holds one long one)."""
    encodings = model.tokenizer.encode_batch(list(texts))
    order = sorted(range(len(texts)), key=lambda k: len(encodings[k].ids))
    labels = np.zeros(len(texts), np.int64)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        arrays = model.encode([texts[k] for k in rows], [encodings[k] for k in rows])
        labels[rows] = np.asarray(run(arrays)).argmax(axis=-1)
    return labels


def _labels(model, examples: list[LabelledText], batch_size: int) -> np.ndarray:
    output = model.bundle.outputs[0]["name"]
    return batched_labels(
        lambda arrays: model(**arrays)[output], model, [e.text for e in examples], batch_size
    )


def accuracy_records(
    bundle_dir: Path, examples: list[LabelledText], batch_size: int = 8
) -> dict[str, dict[str, Any]]:
    """{artifact name: accuracy record} for every artifact this machine runs natively."""
    bundle = Bundle(bundle_dir)
    device = probe()
    truth = np.array([e.label for e in examples])
    reference = _labels(load(bundle_dir, artifact="onnxruntime"), examples, batch_size)
    fp32 = 100.0 * float((reference == truth).mean())
    records = {}
    for artifact in bundle.artifacts:
        if artifact.is_gpu or missing_requirements(artifact.requires, device):
            continue
        labels = _labels(load(bundle_dir, artifact=artifact.name), examples, batch_size)
        records[artifact.name] = {
            "metric": "accuracy",
            "value": round(100.0 * float((labels == truth).mean()), 3),
            "fp32": round(fp32, 3),
            "agreement": round(100.0 * float((labels == reference).mean()), 3),
            "examples": len(examples),
            "fp32_engine": "onnxruntime (exported graph)",
        }
    return records
