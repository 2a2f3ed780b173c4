"""Stage 1, export: a Hugging Face model directory (or an ONNX file) to a checked ONNX model.

Optimum does the export (task inferred from the model's config unless given) and keeps its own
output validation; we add a parity record of ONNX Runtime against PyTorch on deterministic
inputs, and onnx's checker on every graph we accept.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tvmdeploy.runtime.inputs import synthetic_inputs

from ..errors import ModelLoadError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    # transformers >= 4.43 saves a chat template in a file of its own (generation bundles).
    "chat_template.jinja",
)


@dataclass
class ExportResult:
    onnx_path: Path
    task: str | None
    config: dict[str, Any]  # the HF config.json, or {} for a bare ONNX file
    tokenizer_dir: Path | None
    source: str
    parity: dict[str, Any] = field(default_factory=dict)  # ORT vs PyTorch


def external_data_files(path: Path) -> list[str]:
    """The external-data files (relative to the model) its initializers name; a file that is not
    a readable ONNX model is a ModelLoadError."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError, OSError...
        raise ModelLoadError(
            f"{path}: not a valid ONNX model ({str(err).splitlines()[0]}); check that the file was "
            "copied whole, or export the model again"
        ) from None
    names = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(names)


def optimum_export(model_dir: Path, work_dir: Path, **options) -> None:
    """optimum's `main_export` of a local HF folder into `work_dir`, offline, without its
    post-processing, its log lines and the tracer's warnings (what a caller checks afterwards
    is what matters); `options` go to `main_export` (task, opset, atol, do_validation)."""
    import transformers
    from optimum.exporters.onnx import main_export

    logging.getLogger("optimum").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(
            str(model_dir),
            output=str(work_dir),
            no_post_process=True,
            local_files_only=True,
            library_name="transformers",
            **options,
        )


def check_onnx(path: Path) -> None:
    """Run onnx's checker; a broken graph or a missing external-data file is a ModelLoadError
    naming the file."""
    import onnx

    for name in external_data_files(path):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelLoadError(
                f"{path}: an initializer's external data points outside the model's folder "
                f"({name!r}); save the model with its data files beside it"
            )
        if not (path.parent / name).is_file():
            raise ModelLoadError(
                f"{path}: its weights live in the external-data file {name!r}, which is not beside "
                "it; copy that file next to the model (or save the model with its data inside)"
            )
    try:
        onnx.checker.check_model(str(path))
    except Exception as err:  # noqa: BLE001 - onnx raises ValidationError, DecodeError, OSError...
        raise ModelLoadError(
            f"{path}: not a valid ONNX model ({str(err).splitlines()[0]}); check that the file was "
            "copied whole, or export the model again"
        ) from None


def read_config(model_dir: Path) -> dict[str, Any]:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{model_dir}: not a Hugging Face model directory (no config.json). "
            "Pass a directory saved with `save_pretrained`, or an .onnx file."
        )
    try:
        return json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{config_path}: unreadable ({err})") from None


def infer_task(model_dir: Path, config: dict[str, Any]) -> str:
    """The optimum task for a local model, from the architecture class its config names."""
    import transformers
    from optimum.exporters.tasks import TasksManager

    architectures = config.get("architectures") or []
    for name in architectures:
        model_class = getattr(transformers, name, None)
        if model_class is None:
            continue
        try:
            return TasksManager._infer_task_from_model_or_model_class(model_class=model_class)
        except (KeyError, ValueError):
            continue
    raise ModelLoadError(
        f"{model_dir}: cannot infer the task from config.json architectures {architectures}; "
        "pass --task (e.g. text-classification, feature-extraction, token-classification)"
    )


def deterministic_inputs(
    config: dict[str, Any], input_names: list[str], batch: int, seq: int, seed: int = 0
):
    """Seeded token ids within the config's vocabulary; the second row's mask has a padded tail."""
    return synthetic_inputs(
        input_names, int(config.get("vocab_size", 1000)), batch, seq, seed, padded_row=True
    )


def torch_parity(
    model_dir: Path, task: str, onnx_path: Path, config: dict[str, Any], atol: float
) -> dict[str, Any]:
    """Max abs diff of ONNX Runtime against PyTorch on the first output, batch 2 x seq 16."""
    import onnxruntime
    import torch
    from optimum.exporters.tasks import TasksManager

    model = TasksManager.get_model_from_task(  # the transformers model, as exported (a
        task,  # sentence-transformers folder would otherwise load its pooling wrapper)
        str(model_dir),
        framework="pt",
        local_files_only=True,
        library_name="transformers",
    )
    model.eval()
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    arrays = deterministic_inputs(config, names, batch=2, seq=16)
    reference = session.run(None, {n: arrays[n] for n in names})[0]
    with torch.no_grad():
        out = model(**{n: torch.from_numpy(arrays[n]) for n in names})
    expected = (out[0] if isinstance(out, tuple) else next(iter(out.values()))).numpy()
    diff = float(np.abs(reference - expected).max())
    return {
        "reference": "pytorch",
        "engine": "onnxruntime",
        "max_abs_diff": diff,
        "tolerance": atol,
        "ok": diff <= atol,
    }


def export_model(
    model_path: str | Path,
    work_dir: str | Path,
    task: str | None = None,
    opset: int | None = None,
    atol: float = 1e-4,
) -> ExportResult:
    """Export `model_path` (HF directory or .onnx file) into `work_dir`; returns the ONNX path."""
    model_path = Path(model_path)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if not model_path.exists():
        raise ModelLoadError(f"{model_path}: no such file or directory")
    if model_path.is_file():
        if model_path.suffix != ".onnx":
            raise ModelLoadError(f"{model_path}: expected a model directory or an .onnx file")
        check_onnx(model_path)
        onnx_path = work_dir / "model.onnx"
        shutil.copyfile(model_path, onnx_path)
        for name in external_data_files(model_path):  # the weights travel with the graph
            (work_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_path.parent / name, work_dir / name)
        sibling_config = model_path.parent / "config.json"
        config = json.loads(sibling_config.read_text()) if sibling_config.is_file() else {}
        tokenizer_dir = (
            model_path.parent if (model_path.parent / "tokenizer.json").is_file() else None
        )
        return ExportResult(onnx_path, task, config, tokenizer_dir, str(model_path))

    config = read_config(model_path)
    task = task or infer_task(model_path, config)
    try:  # optimum's own validation still reports
        optimum_export(model_path, work_dir, task=task, opset=opset, atol=atol)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{model_path}: optimum could not export this model: {err}") from None
    onnx_path = work_dir / "model.onnx"
    if not onnx_path.is_file():
        raise ModelLoadError(f"{model_path}: optimum produced no model.onnx (task {task})")
    check_onnx(onnx_path)
    parity = torch_parity(model_path, task, onnx_path, config, atol)
    tokenizer_dir = model_path if (model_path / "tokenizer.json").is_file() else None
    return ExportResult(onnx_path, task, config, tokenizer_dir, str(model_path.resolve()), parity)
