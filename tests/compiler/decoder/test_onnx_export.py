"""The export stage of generation bundles (optimum, text-generation-with-past): what it records
where optimum refuses a model, and an export that disagrees with transformers left out."""

from __future__ import annotations

import json

from tvmdeploy.compiler.decoder.config import read_decoder_config
from tvmdeploy.compiler.decoder.onnx_export import export_decoder
from tvmdeploy.compiler.drivers.compile_decoder import reference_runs

from tests.conftest import save_tiny_llm


def test_a_model_optimum_cannot_export_is_recorded_not_raised(tiny_llm_dir, tmp_path):
    broken = tmp_path / "no-weights"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_llm_dir / "config.json").read_text())
    exported = export_decoder(broken, tmp_path / "onnx")
    assert exported.onnx_path is None
    assert exported.record["file"] is None
    assert exported.record["detail"].startswith("optimum could not export it (")


def test_an_export_that_disagrees_with_transformers_is_left_out(tiny_llm_dir, tmp_path):
    """The export of other weights stands in for a wrong export: the bundle would carry none."""
    other = export_decoder(save_tiny_llm(tmp_path / "other", seed=5), tmp_path / "onnx")
    assert other.onnx_path is not None and other.record["external_data"] == []
    config = read_decoder_config(tiny_llm_dir)
    references, export_parity = reference_runs(tiny_llm_dir, config, other, 256)
    assert export_parity["ok"] is False and export_parity["max_abs_diff"] > 0.1
    assert other.onnx_path is None
    assert other.record["detail"].startswith("left out: its parity against transformers failed")
    assert references.onnxruntime is None and len(references.transformers) == 3
    json.dumps(export_parity)  # the manifest can hold it
