"""The ONNX Runtime engine of a generation bundle (its optimum export, past key/values in NumPy):
forced with `artifact="onnxruntime"`, and taken by `load()` when no compiled artifact runs on the
device. Checked against transformers, and against the compiled artifact through the same
Generator API (streaming, stop strings, sampling, concurrent requests)."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
from tvmdeploy.runtime import BundleError, load
from tvmdeploy.runtime.errors import IncompatibleDeviceError
from tvmdeploy.runtime.probe import DeviceInfo

from tests.conftest import hf_greedy

PROMPT = "The bundle holds"


@pytest.fixture(scope="module")
def ort_generator(tiny_llm_bundle):
    return load(tiny_llm_bundle, artifact="onnxruntime")


@pytest.fixture(scope="module")
def compiled(tiny_llm_bundle):
    return load(tiny_llm_bundle)


@pytest.fixture(scope="module")
def reference(tiny_llm_reference):
    return tiny_llm_reference


def test_forced_onnxruntime_generates_the_greedy_tokens_of_transformers(ort_generator, reference):
    import torch

    tokenizer, model = reference
    assert ort_generator.choice.artifact == "onnxruntime"
    ids = tokenizer(PROMPT).input_ids
    result = ort_generator.generate(PROMPT, max_new_tokens=24, ignore_eos=True)
    assert result.token_ids == hf_greedy(model, ids, 24)
    assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(ort_generator.prefill_logits(ids), expected, atol=1e-4)


def test_streams_stops_and_samples_as_the_compiled_artifact_does(ort_generator, compiled):
    options = {"max_new_tokens": 30, "ignore_eos": True}
    whole = compiled.generate(PROMPT, **options).text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 2]
    streamed = ort_generator.generate(PROMPT, stop=stop, stream=True, **options)
    assert "".join(streamed) == whole[: whole.find(stop)]
    assert streamed.result.finish_reason == "stop"
    sampled = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1}
    ours = ort_generator.generate(PROMPT, seed=11, **sampled, **options)
    theirs = compiled.generate(PROMPT, seed=11, **sampled, **options)
    assert ours.token_ids == theirs.token_ids
    assert ours.token_ids != ort_generator.generate(PROMPT, seed=12, **sampled, **options).token_ids


def test_concurrent_requests_get_their_own_sequences(ort_generator):
    prompts = [f"{PROMPT} {word}" for word in ("one", "two", "three", "four", "five")]
    alone = [ort_generator.generate(p, max_new_tokens=12, ignore_eos=True) for p in prompts]
    together: list = [None] * len(prompts)

    def run(k: int) -> None:
        together[k] = ort_generator.generate(prompts[k], max_new_tokens=12, ignore_eos=True)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def _without_avx2(monkeypatch):
    """The device probe of a CPU without AVX2 (the host artifact needs it)."""
    import tvmdeploy.runtime.model as model_module

    device = DeviceInfo("x86_64", "a CPU without AVX2", frozenset({"sse4_2"}), 2, ())
    monkeypatch.setattr(model_module, "probe", lambda: device)


def test_load_falls_back_to_onnxruntime_when_no_artifact_runs(
    tiny_llm_bundle, compiled, monkeypatch, tmp_path
):
    _without_avx2(monkeypatch)
    fallback = load(tiny_llm_bundle)
    assert fallback.choice.artifact == "onnxruntime"
    assert "ONNX Runtime fallback" in fallback.choice.reason
    assert "avx2" in next(iter(fallback.choice.rejected.values()))
    expected = compiled.generate(PROMPT, max_new_tokens=16, ignore_eos=True).token_ids
    assert fallback.generate(PROMPT, max_new_tokens=16, ignore_eos=True).token_ids == expected

    # Without the export (a bundle compiled with --no-onnx) there is nothing to fall back on.
    bare = shutil.copytree(tiny_llm_bundle, tmp_path / "bare.tvmd")
    manifest = json.loads((bare / "manifest.json").read_text())
    del manifest["files"]["model.onnx"]
    manifest["model"]["onnx_export"] = {"file": None, "detail": "compiled with --no-onnx"}
    (bare / "manifest.json").write_text(json.dumps(manifest))
    (bare / "model.onnx").unlink()
    with pytest.raises(IncompatibleDeviceError, match="avx2"):
        load(bare)
    with pytest.raises(BundleError, match=r"no ONNX export \(compiled with --no-onnx\)"):
        load(bare, artifact="onnxruntime")


def test_verify_compares_the_artifact_with_onnxruntime_on_the_device(tiny_llm_bundle):
    from tvmdeploy.runtime.check import check_bundle

    rows = {row.what: row for row in check_bundle(tiny_llm_bundle)}
    (parity_row,) = [row for what, row in rows.items() if what.startswith("parity ")]
    assert parity_row.status == "ok", parity_row
    assert "vs ONNX Runtime" in parity_row.detail
