"""Generation bundles for CUDA: the tiny Llama's definition and paged KV cache built for sm_80
with TVM's GPU pipeline (DLight schedules; the cache's GPU attention kernels from
`relax.frontend.nn.llm`) and nvcc, in the same bundle as the host's artifact. Where a GPU is
lent (`pytest -m gpu`), the CUDA artifact generates what transformers does."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from tvmdeploy.compiler.kernels import cuda
from tvmdeploy.runtime import load, probe

from tests.conftest import hf_greedy


def has_gpu(min_capability: int = 0) -> bool:
    return any(c.compute_capability >= min_capability for c in probe().cuda)


@pytest.fixture(scope="module")
def cuda_llm_bundle(tiny_llm_dir, tmp_path_factory) -> Path:
    if cuda.find_nvcc() is None:
        pytest.skip("needs nvcc (the CUDA toolkit)")
    from tvmdeploy.compiler import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("cuda-llm") / "tiny-llama-cuda.tvmd"
    return compile_model(
        CompileOptions(
            model=str(tiny_llm_dir),
            output=str(out),
            profiles=["host", "cuda-sm80"],
            onnx=False,  # the GPU checks compare with transformers
        )
    )


def test_the_cuda_artifact_is_built_ahead_of_time_beside_the_host_one(cuda_llm_bundle):
    manifest = json.loads((cuda_llm_bundle / "manifest.json").read_text())
    artifacts = {a["name"]: a for a in manifest["artifacts"]}
    gpu = artifacts["cuda-sm80"]
    assert gpu["code_form"] == "cuda-fatbin"
    assert gpu["requires"]["cuda_arch"] == 80
    host = next(a for a in artifacts.values() if a["family"] != "cuda")
    assert host["parity"]["ok"] is True
    if not has_gpu(80):
        assert gpu["parity"]["where"] == "not-run"
        assert "CUDA GPU" in gpu["parity"]["detail"]
        assert load(cuda_llm_bundle).choice.artifact == host["name"]  # the CPU one runs here
    else:  # on a GPU host the compile's gate ran the CUDA artifact itself
        assert gpu["parity"]["ok"] is True


@pytest.mark.gpu
def test_the_cuda_artifact_generates_what_transformers_does(cuda_llm_bundle, tiny_llm_dir):
    if not has_gpu(80):
        pytest.skip("needs a CUDA GPU of compute capability >= 8.0")
    import torch
    from transformers import AutoModelForCausalLM

    generator = load(cuda_llm_bundle, artifact="cuda-sm80")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32).eval()
    prompts = [[1, 40, 41, 60], [1, 7, 8, 9, 10, 11, 12, 13], [5]]
    expected = [hf_greedy(model, ids, 24) for ids in prompts]
    alone = [generator.generate(p, max_new_tokens=24, ignore_eos=True).token_ids for p in prompts]
    assert alone == expected
    together: list = [None] * len(prompts)

    def run(k: int) -> None:
        together[k] = generator.generate(prompts[k], max_new_tokens=24, ignore_eos=True).token_ids

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == expected
