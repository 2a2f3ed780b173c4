"""Generation bundles for CUDA: the tiny Llama's definition and paged KV cache built for sm_80
with TVM's GPU pipeline (DLight schedules; the cache's GPU attention kernels from
`relax.frontend.nn.llm`) and nvcc, in the same bundle as the host's artifact; int8 and int4
artifacts on the weight-only GPU products (kernels/gpu_gemv.py). Where a GPU is lent
(`pytest -m gpu`), the CUDA artifacts generate what transformers does, the quantized ones
within the quantized gate."""

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


@pytest.fixture(scope="module")
def cuda_quantized_bundle(tiny_llm_dir, tmp_path_factory) -> Path:
    """int8 and int4 for sm_80 alone (the host's quantized artifacts are tested elsewhere)."""
    if cuda.find_nvcc() is None:
        pytest.skip("needs nvcc (the CUDA toolkit)")
    from tvmdeploy.compiler import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("cuda-llm-q") / "tiny-llama-cuda-q.tvmd"
    options = CompileOptions(
        model=str(tiny_llm_dir),
        output=str(out),
        profiles=["cuda-sm80"],
        precisions=["int8", "int4"],
        strict_parity=False,  # the tiny random model's int4 misses the gate (a GPU host gates it)
        onnx=False,
    )
    return compile_model(options)


def test_int8_and_int4_cuda_artifacts_read_the_quantized_weights(cuda_quantized_bundle):
    import tvm
    from tvmdeploy.compiler.decoder import quantized_int4

    manifest = json.loads((cuda_quantized_bundle / "manifest.json").read_text())
    artifacts = {a["name"]: a for a in manifest["artifacts"]}
    assert set(artifacts) == {"cuda-sm80-int8", "cuda-sm80-int4"}
    for name, artifact in artifacts.items():
        assert artifact["code_form"] == "cuda-fatbin", name
        if not has_gpu(80):
            assert artifact["parity"]["where"] == "not-run" and "CUDA GPU" in str(
                artifact["parity"]["detail"]
            )
    entries = manifest["weights"]
    int8 = tvm.runtime.load_param_dict_from_file(
        str(cuda_quantized_bundle / entries["int8"]["file"])
    )
    assert str(int8["layers.0.self_attn.qkv_proj.weight"].dtype) == "int8"
    int4 = tvm.runtime.load_param_dict_from_file(
        str(cuda_quantized_bundle / entries["int4"]["file"])
    )
    assert str(int4["layers.0.self_attn.qkv_proj.weight"].dtype) == "uint8"
    scale = int4["layers.0.self_attn.qkv_proj" + quantized_int4.SCALE_SUFFIX]
    assert str(scale.dtype) == quantized_int4.PLANE_DTYPE


def test_the_gpu_products_are_weight_only_gemv_kernels(tiny_llm_dir):
    """The decode step's products (static batch 1) read the stored weights in the kernel (int8
    bytes; int4 nibbles and fp16 planes), never an fp32 copy; int8's get DLight's GEMV schedule
    (the activation row shared, a warp reduction along K), int4's its fallback (a thread per
    output: DLight's GEMV rule fails on the GGUF nibble order, kernels/gpu_gemv.py)."""
    if cuda.find_nvcc() is None:
        pytest.skip("needs nvcc (the CUDA toolkit)")
    import tvm
    from tvm.s_tir import dlight as dl
    from tvmdeploy import targets
    from tvmdeploy.compiler import build
    from tvmdeploy.compiler.kernels import gpu_gemv

    target = build.tvm_target(targets.get("cuda-sm80"))
    # The rules of TVM's CUDA pipeline, in its order (relax/backend/cuda/pipeline.py).
    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction()]
    schedule = dl.ApplyDefaultSchedule(*rules, dl.gpu.Fallback())
    for precision, make, weight_type in (
        ("int8", gpu_gemv.int8_gemv, "signed char"),
        ("int4", gpu_gemv.int4_gemv, "uchar"),
    ):
        func = make(576, 1536, 1)  # one row: the decode1 step
        name = func.attrs["global_symbol"]
        with target:
            built = tvm.compile(schedule(tvm.IRModule({name: func})), target=target)
        source = "\n".join(cuda._cuda_sources(built.mod))
        start = source.index(f"{name}_kernel(", source.index(f"{name}_kernel(") + 1)
        body = source[start : source.index("\n}", start)]  # the definition
        assert weight_type in body, precision
        assert "__shfl_down_sync" in body or precision == "int4", precision
        assert "float* __restrict__ w" not in body  # no fp32 copy of the weight is read
        if precision == "int4":
            assert "half* __restrict__ d_ptr" in body  # the fp16 planes, as stored
