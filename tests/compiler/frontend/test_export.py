"""Export: optimum on a real model directory, clear errors on bad input, onnx checker."""

import json

import pytest
from tvmdeploy.compiler.errors import ModelLoadError
from tvmdeploy.compiler.frontend.export import export_model, infer_task, read_config


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        export_model(tmp_path / "nope", tmp_path / "out")


def test_directory_without_config(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        export_model(tmp_path / "model", tmp_path / "out")


def test_unreadable_config(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable"):
        export_model(tmp_path / "model", tmp_path / "out")


def test_corrupt_onnx_file(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model")
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        export_model(bad, tmp_path / "out")


def test_task_inferred_from_architecture(tiny_model_dir):
    assert infer_task(tiny_model_dir, read_config(tiny_model_dir)) == "text-classification"


def test_task_not_inferable(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelClass"]}))
    with pytest.raises(ModelLoadError, match="--task"):
        infer_task(tmp_path / "m", read_config(tmp_path / "m"))


def test_export_records_parity_against_pytorch(tiny_model_dir, tmp_path):
    result = export_model(tiny_model_dir, tmp_path / "onnx")
    assert result.onnx_path.is_file() and result.task == "text-classification"
    assert result.parity["reference"] == "pytorch"
    assert result.parity["max_abs_diff"] < 1e-4
    assert result.tokenizer_dir == tiny_model_dir


def test_a_sentence_transformers_folder_exports_its_transformer(tmp_path):
    """all-MiniLM-L6-v2 as sentence-transformers saves it (modules.json, pooling folder): the
    PyTorch reference must be the transformers encoder that was exported, not the pooling
    wrapper sentence-transformers would load (whose forward takes other arguments)."""
    from tests.conftest import minilm_dir

    exported = export_model(minilm_dir(), tmp_path, task="feature-extraction")
    assert (minilm_dir() / "modules.json").is_file()
    assert exported.parity["ok"] and exported.parity["max_abs_diff"] < 1e-4
