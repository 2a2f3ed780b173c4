"""The ONNX export a generation bundle carries: optimum's `text-generation-with-past` graph, fp32.

The compiled code does not come from this graph (it comes from the decoder definition,
decoder/lower.py); the export is the bundle's ONNX Runtime engine (the baseline, and the fallback
where no artifact runs: runtime/decode_onnx.py) and the compile gate's second reference
(decoder/parity.py). Its own agreement with transformers is checked in the gate stage.

A model of 2 GB or more is written by the exporter with its weights in external-data files
beside `model.onnx`; those files travel into the bundle with it (package.write_bundle). Where
optimum refuses a model, the bundle is built without an export and the manifest says why: the
compiled artifacts are still gated against transformers; only the ONNX Runtime engine is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..frontend.export import check_onnx, external_data_files, optimum_export

logger = logging.getLogger(__name__)

TASK = "text-generation-with-past"


@dataclass
class DecoderExport:
    """What the export stage left: the graph (None where there is none) and the manifest record
    (`model.onnx_export`)."""

    onnx_path: Path | None
    record: dict[str, Any] = field(default_factory=dict)


def skipped(why: str) -> DecoderExport:
    return DecoderExport(None, {"file": None, "detail": why})


def export_decoder(model_dir: Path, work_dir: Path) -> DecoderExport:
    """Export the merged or converted HF folder with optimum; a refusal is recorded, not raised."""
    from importlib.metadata import version

    work_dir.mkdir(parents=True, exist_ok=True)
    try:  # do_validation off: the gate compares it with transformers on our prompts
        optimum_export(model_dir, work_dir, task=TASK, do_validation=False)
        onnx_path = work_dir / "model.onnx"
        if not onnx_path.is_file():
            raise ValueError(f"no model.onnx written for task {TASK}")
        check_onnx(onnx_path)
    except Exception as err:  # noqa: BLE001 - optimum and torch.onnx raise many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        why = f"optimum could not export it ({type(err).__name__}: {first})"
        logger.warning("  no ONNX export in the bundle: %s", why)
        return skipped(why)
    record = {
        "file": "model.onnx",
        "task": TASK,
        "dtype": "float32",
        "exporter": f"optimum-onnx {version('optimum-onnx')}",
        "external_data": external_data_files(onnx_path),
    }
    return DecoderExport(onnx_path, record)
