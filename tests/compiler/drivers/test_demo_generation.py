"""The demo's generation part on a tiny GGUF file: converted and compiled once, answers streamed
token for token as transformers generates them, timed beside PyTorch; the second run reuses both."""

from __future__ import annotations

import pytest
from tvmdeploy.compiler.drivers.demo_generation import PROMPTS, run_generation

from tests.conftest import hf_greedy, save_tiny_gguf, save_tiny_llm


def summary_eos(work_dir) -> set[int]:
    import json

    manifest = json.loads((work_dir / "tiny-llama.tvmd" / "manifest.json").read_text())
    return set(manifest["model"]["eos_token_ids"])


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-gen")
    return save_tiny_gguf(save_tiny_llm(root / "tiny-llama"), root / "Tiny-Llama.Q8_0.gguf")


def test_generation_part_streams_transformers_tokens_and_caches(tiny_gguf, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work_dir = tmp_path / "demo"
    summary = run_generation(work_dir, "host", gguf=tiny_gguf)
    assert summary is not None
    streamed = capsys.readouterr().err

    folder = str(tiny_gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=tiny_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()
    for question, answer in zip(PROMPTS, summary["answers"], strict=True):
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert answer["prompt_tokens"] == len(ids)
        produced = answer["token_ids"]
        assert produced == hf_greedy(model, ids, len(produced))
        if answer["finish_reason"] == "stop":  # it ended where transformers picks end-of-sequence
            with torch.inference_mode():
                logits = model(torch.tensor([ids + produced])).logits[0, -1]
            assert int(logits.argmax()) in summary_eos(work_dir)
        assert answer["text"] in streamed  # what was shown is the answer

    engines = {row["engine"]: row for row in summary["rows"]}
    assert set(engines) == {"tvmdeploy", "pytorch", "onnxruntime"}
    assert all(row["decode_tokens_per_s"] > 0 and row["ttft_ms"] > 0 for row in engines.values())

    bundle = work_dir / "tiny-llama.tvmd"
    built = (bundle / "manifest.json").stat().st_mtime_ns
    again = run_generation(work_dir, "host", gguf=tiny_gguf)
    assert again["answers"][0]["token_ids"] == summary["answers"][0]["token_ids"]
    assert (bundle / "manifest.json").stat().st_mtime_ns == built  # not compiled twice
