"""Baselines for `bench --compare`: what the user would run instead, timed beside tvmdeploy.

Tooling, not device code (docs/design.md): PyTorch eager on the source model needs torch and
transformers, which a device that installs only the runtime does not have. ONNX Runtime here is
the user's plain ORT session on the bundle's `model.onnx` (the same one the runtime falls back to).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from tvmdeploy.runtime.bundle import Bundle
from tvmdeploy.runtime.engine import OnnxRuntimeEngine
from tvmdeploy.runtime.timing import BenchConfig, BenchReport, Runner, run_bench

from ..errors import OptionError

_TASK_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "fill-mask": "AutoModelForMaskedLM",
    "question-answering": "AutoModelForQuestionAnswering",
    "feature-extraction": "AutoModel",
}


def torch_runner(bundle: Bundle, model_dir: str | None) -> Runner:
    """PyTorch eager on the source model (the baseline a team starts from)."""
    import torch
    import transformers

    source = model_dir or bundle.model.get("source")
    if not source or not Path(source, "config.json").is_file():
        raise OptionError(
            f"the PyTorch baseline needs the Hugging Face model directory; {source!r} is not one "
            "(pass --torch-model DIR)"
        )
    cls = getattr(transformers, _TASK_CLASSES.get(bundle.model.get("task") or "", "AutoModel"))
    model = cls.from_pretrained(source, local_files_only=True).eval()

    def run(arrays: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in arrays.items()})
        return out[0].numpy()

    return run


def onnxruntime_runner(bundle: Bundle) -> Runner:
    """ONNX Runtime with default session options on the bundle's ONNX model."""
    session = OnnxRuntimeEngine(bundle)
    return lambda arrays: session.run(None, arrays)[0]


def baseline_runners(
    bundle: Bundle, engines: list[str], torch_model: str | None = None
) -> dict[str, Runner]:
    """Runners for the baselines named in `engines` ("onnxruntime", "torch"; others are ignored)."""
    makers: dict[str, Callable[[], Runner]] = {
        "onnxruntime": lambda: onnxruntime_runner(bundle),
        "torch": lambda: torch_runner(bundle, torch_model),
    }
    return {engine: makers[engine]() for engine in engines if engine in makers}


def run_bench_with_baselines(
    config: BenchConfig, progress: Callable[[str], None] = lambda _: None
) -> BenchReport:
    """`run_bench` with the baselines `config.engines` names, made here."""
    bundle = Bundle(config.bundle)
    return run_bench(config, progress, baseline_runners(bundle, config.engines, config.torch_model))
