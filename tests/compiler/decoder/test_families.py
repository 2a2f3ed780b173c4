"""Each decoder family (tiny random Llama, Qwen2, Phi-3, GPT-2; 2 layers) compiled for the host,
then compared with transformers and with ONNX Runtime on the bundle's own export: prefill logits,
greedy tokens, and a sampled run with a fixed seed (the compiled artifact and the ORT engine,
same seed and options, the same tokens). One compile per family (Llama's is the session's)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tvmdeploy.compiler import CompileOptions, compile_model
from tvmdeploy.compiler.decoder import parity
from tvmdeploy.runtime import load

from tests.conftest import save_tiny_llm

FAMILIES = ["llama", "qwen2", "phi3", "gpt2"]
PROMPT_IDS = [1, 40, 41, 60, 77, 12, 9]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(model folder, bundle, compiled Generator, ORT Generator, transformers model)."""
    import torch
    from transformers import AutoModelForCausalLM

    if request.param == "llama":  # the session's tiny Llama, compiled once for every test file
        model_dir = request.getfixturevalue("tiny_llm_dir")
        bundle = request.getfixturevalue("tiny_llm_bundle")
    else:
        base = tmp_path_factory.mktemp(request.param)
        model_dir = save_tiny_llm(base / f"tiny-{request.param}", family=request.param)
        bundle = compile_model(CompileOptions(model=str(model_dir), output=str(base / "b.tvmd")))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model_dir, bundle, load(bundle), load(bundle, artifact="onnxruntime"), model


def test_the_gate_ran_against_both_references(family):
    _, bundle, *_ = family
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["onnx_export"]["task"] == "text-generation-with-past"
    assert manifest["export_parity"]["ok"] is True
    (artifact,) = manifest["artifacts"]
    for key, against in (("parity", "transformers"), ("parity_onnxruntime", "onnxruntime")):
        record = artifact[key]
        assert record["ok"] is True and record["where"] == "native"
        assert record["against"].startswith(against)
        assert record["greedy"]["compared"] == parity.GREEDY_TOKENS * len(parity.PROMPTS)


def test_prefill_logits_match_transformers_and_onnxruntime(family):
    import torch

    _, _, compiled, ort, model = family
    with torch.inference_mode():
        expected = model(torch.tensor([PROMPT_IDS])).logits[0, -1].numpy()
    ours = compiled.prefill_logits(PROMPT_IDS)
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    np.testing.assert_allclose(ours, ort.prefill_logits(PROMPT_IDS), atol=1e-4)


def full_recompute_greedy(model, ids: list[int], new: int) -> list[int]:
    """transformers' argmax over the whole sequence each step: no KV cache, and EOS a token like
    any other (`generate`'s min_new_tokens would mask it)."""
    import torch

    ids = list(ids)
    with torch.inference_mode():
        for _ in range(new):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-new:]


def test_greedy_tokens_match_transformers_and_onnxruntime(family):
    _, _, compiled, ort, model = family
    expected = full_recompute_greedy(model, PROMPT_IDS, 24)
    assert len(set(expected)) > 3  # the random weights do not just repeat a token
    assert compiled.generate(PROMPT_IDS, max_new_tokens=24, ignore_eos=True).token_ids == expected
    assert ort.generate(PROMPT_IDS, max_new_tokens=24, ignore_eos=True).token_ids == expected


def test_a_seeded_sampled_run_gives_the_same_tokens_on_both_engines(family):
    _, _, compiled, ort, _ = family
    options = {"max_new_tokens": 24, "ignore_eos": True, "temperature": 0.8, "top_p": 0.9}
    ours = compiled.generate(PROMPT_IDS, seed=5, **options).token_ids
    assert ours == ort.generate(PROMPT_IDS, seed=5, **options).token_ids
    greedy = compiled.generate(PROMPT_IDS, max_new_tokens=24, ignore_eos=True).token_ids
    assert ours != greedy  # the run did sample
