"""bench/generate.py's own parts on the tiny Llama: the F32 GGUF it writes for llama.cpp holds the
dequantized values (transformers reads both files alike), the greedy loops give transformers'
tokens, the §6 targets read met / not met / not measured yet, and the options parse. llama.cpp
parts run only where llama-cpp-python is installed (the `bench-llm` extra; CI has it not)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import generate
from tests.conftest import hf_greedy, save_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_llm_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ggufs")
    q8 = save_tiny_gguf(tiny_llm_dir, folder / "tiny.Q8_0.gguf")
    generate.write_f32_gguf(q8, folder / "tiny.F32.gguf")
    return q8, folder / "tiny.F32.gguf"


def test_f32_gguf_holds_the_dequantized_weights(tiny_ggufs):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    q8, f32 = tiny_ggufs
    source, copy = gguf.GGUFReader(str(q8)), gguf.GGUFReader(str(f32))
    assert {t.tensor_type for t in copy.tensors} == {gguf.GGMLQuantizationType.F32}
    assert copy.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    for key in ("tokenizer.ggml.tokens", "tokenizer.chat_template", "llama.block_count"):
        assert copy.fields[key].contents() == source.fields[key].contents()

    def logits(path: Path):
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        with torch.inference_mode():
            return model(torch.tensor([[5, 17, 42, 99]])).logits.numpy()

    np.testing.assert_allclose(logits(f32), logits(q8), rtol=0, atol=1e-6)


def test_greedy_loop_gives_transformers_tokens(tiny_llm_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32).eval()
    prompt = [5, 17, 42, 99, 7]
    run = generate.greedy_loop(model, torch, prompt, 12)
    assert run.tokens == hf_greedy(model, prompt, 12)
    assert run.prompt_tokens == 5 and run.decode_tokens_per_s > 0


@needs_llama_cpp
def test_llama_cpp_variants_and_greedy_tokens(tiny_ggufs, tiny_llm_dir, tmp_path):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    q8, f32 = tiny_ggufs
    (tmp_path / f32.name).symlink_to(f32)
    variant = generate.llama_variant(q8, "Q4_0", tmp_path, threads=2)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(variant)).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0

    engine = generate.load_llama_cpp({"path": str(f32), "label": "F32", "n_ctx": 64}, threads=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32).eval()
    prompt = [5, 17, 42, 99, 7]
    for _ in range(2):  # a second run must not reuse the first one's cache
        assert engine.run(prompt, 8).tokens == hf_greedy(model, prompt, 8)


def row(engine: str, decode: float, prefill: float) -> dict:
    return {"engine": engine, "decode_tokens_per_s": decode, "prefill_tokens_per_s": prefill}


def test_targets_say_met_not_met_or_not_measured():
    rows = [
        row("tvmdeploy fp32 (x86-64-v3)", 15.0, 150.0),
        row("tvmdeploy int8 (x86-64-v3-int8)", 100.0, 400.0),
        row("llama.cpp Q8_0", 80.0, 500.0),
        row("llama.cpp F32", 20.0, 100.0),
        row("ONNX Runtime fp32", 10.0, 40.0),
    ]
    status = {t["target"]: t for t in generate.targets(rows)}
    assert status["int8 decode >= 1.2x llama.cpp Q8_0"]["status"] == "met"  # 100 >= 96
    assert status["int8 prefill >= llama.cpp Q8_0 and PyTorch bf16"]["status"] == "not met"
    assert status["fp32 prefill >= llama.cpp F32 and PyTorch bf16"]["status"] == "met"
    assert status["int4 decode >= 1.2x llama.cpp Q4_0/Q4_1"]["status"] == "not measured yet"
    assert status["fp32 decode >= 3x ONNX Runtime fp32"]["status"] == "not met"  # 15 < 30
    assert status["int8 prefill >= 3x ONNX Runtime fp32"]["status"] == "met"


def test_options_parse_and_refuse_clearly():
    assert generate.parse_bundles(["int8=a/b.tvmd", "c.tvmd"]) == [
        ("int8", Path("a/b.tvmd")),
        ("c.tvmd", Path("c.tvmd")),
    ]
    with pytest.raises(SystemExit, match="LABEL=PATH"):
        generate.parse_bundles(["int8="])
    assert generate.parse_list("fp32, int8", ("fp32", "int8", "int4"), "--x") == ["fp32", "int8"]
    with pytest.raises(SystemExit, match="unknown 'fp64'"):
        generate.parse_list("fp64", ("fp32",), "--tvm-precisions")


def test_help_and_no_llama_cpp_at_import():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; import bench.generate; print('llama_cpp' in sys.modules)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"
    helped = subprocess.run(
        [sys.executable, str(ROOT / "bench/generate.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--bundle" in helped.stdout and "--tvm-precisions" in helped.stdout
