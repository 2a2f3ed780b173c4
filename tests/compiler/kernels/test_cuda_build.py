"""CUDA artifacts: kernels built ahead of time by nvcc, shipped beside the CPU artifact.

Runs without a GPU (the fatbin is inspected, the runtime must refuse it here); the `gpu` test runs
the artifact where a CUDA device exists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tvmdeploy import targets
from tvmdeploy.compiler.kernels import cuda
from tvmdeploy.runtime import IncompatibleDeviceError, load, probe

needs_nvcc = pytest.mark.skipif(cuda.find_nvcc() is None, reason="needs nvcc (the CUDA toolkit)")
GPU_TOLERANCE = (
    1e-3  # fp32 on the GPU (fast-math, other reduction order) vs ONNX Runtime on the CPU
)


def has_gpu(min_capability: int = 0) -> bool:
    """Called inside tests only: probing at collection would import TVM runtime-only."""
    return any(c.compute_capability >= min_capability for c in probe().cuda)


def skip_on_gpu_host() -> None:
    if has_gpu():
        pytest.skip("checks what a host without a CUDA device does")


@pytest.fixture(scope="module")
def cuda_bundle(tmp_path_factory) -> Path:
    """The tiny BERT compiled for this CPU and for sm_80 GPUs into one bundle.

    Its positions end at the largest bucket (32): no symbolic-length fallback function, which
    more than doubled each of the three builds and is not what these tests check."""
    if cuda.find_nvcc() is None:
        pytest.skip("needs nvcc (the CUDA toolkit)")
    from tvmdeploy.compiler import CompileOptions, compile_model

    from tests.conftest import save_tiny_bert

    root = tmp_path_factory.mktemp("cuda")
    model_dir = save_tiny_bert(root / "tiny-bert-32", max_positions=32)
    out = root / "tiny-cuda.tvmd"
    return compile_model(
        CompileOptions(
            model=str(model_dir),
            output=str(out),
            profiles=["host", "cuda-sm80"],
            buckets="1x16,32",
            precisions=["fp32", "fp16"],
        )
    )


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def artifact(bundle: Path, name: str) -> dict:
    return next(a for a in manifest(bundle)["artifacts"] if a["name"] == name)


def test_one_bundle_cpu_and_cuda_share_weights(cuda_bundle):
    entries = manifest(cuda_bundle)["artifacts"]
    assert [a["family"] == "cuda" for a in entries] == [False, True, True]
    cpu, gpu, fp16 = entries
    assert fp16["name"] == "cuda-sm80-fp16" and fp16["precision"] == "float16"
    assert fp16["weights"] == "float32" and fp16["code_form"] == "cuda-fatbin"
    assert fp16["parity"]["where"] == "not-run"
    assert gpu["profile"] == "cuda-sm80" and gpu["target"] == {"kind": "cuda", "arch": "sm_80"}
    assert gpu["requires"]["cuda_arch"] == 80
    assert cpu["precision"] == gpu["precision"] == "float32"
    assert list((cuda_bundle / "weights").iterdir()) == [cuda_bundle / "weights" / "float32.params"]
    assert cpu["code_form"] == "shared-library" and gpu["code_form"] == "cuda-fatbin"
    assert cpu["parity"]["where"] == "native" and cpu["parity"]["ok"] is True
    assert gpu["parity"]["where"] == "not-run" and gpu["parity"]["ok"] is None
    if not has_gpu():
        assert "no CUDA device on the build host" in gpu["parity"]["detail"]


def test_cuda_library_holds_sm80_code_not_source(cuda_bundle):
    """The library embeds a fatbin with sm_80 SASS (and compute_80 PTX), and no CUDA source."""
    lib = cuda_bundle / artifact(cuda_bundle, "cuda-sm80")["file"]
    (code,) = cuda.device_code(lib)
    assert code.fmt == "fatbin" and code.code_form == "cuda-fatbin"
    assert code.code[:4] == bytes.fromhex("50ed55ba")  # fatbin magic
    kinds = {(e.kind, e.arch) for e in code.entries}
    assert kinds == {("sass", "sm_80"), ("ptx", "compute_80")}
    data = lib.read_bytes()
    assert b"__global__" not in data and b"#include <cuda" not in data  # no source left to compile
    assert b"\x7fELF" in code.code  # the sm_80 cubin (ELF) inside the fatbin


def test_runtime_chooses_cpu_here(cuda_bundle):
    skip_on_gpu_host()
    model = load(cuda_bundle)
    assert model.choice.artifact == manifest(cuda_bundle)["artifacts"][0]["profile"]
    assert "cuda-sm80" in model.choice.rejected and "CUDA GPU" in model.choice.rejected["cuda-sm80"]
    assert model(input_ids=np.ones((1, 10), np.int64))["logits"].shape == (1, 2)


def test_forced_cuda_artifact_refused_without_loading(cuda_bundle, tmp_path):
    """A garbage lib.so would fail its checksum if it were read: the refusal comes first."""
    skip_on_gpu_host()
    copy = tmp_path / "copy.tvmd"
    shutil.copytree(cuda_bundle, copy)
    (copy / artifact(copy, "cuda-sm80")["file"]).write_bytes(b"not a library")
    missing = r"cuda-sm80.*CUDA GPU of compute capability >= 8\.0 \(none found\)"
    with pytest.raises(IncompatibleDeviceError, match=missing):
        load(copy, artifact="cuda-sm80")


@needs_nvcc
def test_nvcc_found_off_path(tmp_path, monkeypatch):
    """nvcc outside PATH (in /usr/local/cuda/bin or $CUDA_HOME/bin) is found and used."""
    nvcc = cuda.find_nvcc()
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("CUDA_HOME", str(nvcc.resolve().parent.parent))
    found = cuda.find_nvcc()
    assert found is not None and found.resolve() == nvcc.resolve()
    result = build_small(tmp_path)
    assert result.code_form == "cuda-fatbin"
    assert {e.arch for e in cuda.device_code(result.lib_path)[0].entries} == {"sm_80", "compute_80"}


def test_source_form_without_nvcc(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda, "find_nvcc", lambda: None)
    with pytest.warns(UserWarning, match="nvcc not found"):
        result = build_small(tmp_path)
    assert result.code_form == "cuda-source-in-library"
    assert [c.fmt for c in cuda.device_code(result.lib_path)] == ["cuda"]


def test_gencode_flags_always_name_the_arch():
    assert cuda.gencode_flags("sm_80") == [
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_80,code=compute_80",
    ]
    assert cuda.gencode_flags("sm_90a") == [
        "-gencode",
        "arch=compute_90a,code=sm_90a",
    ]  # no portable PTX
    with pytest.raises(cuda.CudaBuildError, match="sm_XY"):
        cuda.gencode_flags("ampere")


def build_small(out_dir: Path):
    """A matmul + relu through the real CUDA build path (seconds, not the BERT's minutes)."""
    import tvm
    from tvm import relax
    from tvmdeploy.compiler.build import build_artifact

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    w = relax.Var("w", relax.TensorType((8, 16), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.relu(relax.op.matmul(x, w)))
        bb.emit_func_output(y)
    mod: tvm.IRModule = bb.get()
    return build_artifact(mod, targets.get("cuda-sm80"), out_dir)


@pytest.mark.gpu
def test_cuda_artifact_matches_onnxruntime_on_gpu(request):
    if not has_gpu(80):
        pytest.skip("needs a CUDA GPU of compute capability >= 8.0")
    import onnxruntime

    cuda_bundle = request.getfixturevalue("cuda_bundle")
    model = load(cuda_bundle, artifact="cuda-sm80")
    assert str(model.engine.device).startswith("cuda")
    session = onnxruntime.InferenceSession(
        str(cuda_bundle / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    for batch, seq in [(1, 16), (1, 7), (1, 32), (3, 20)]:
        arrays = {
            "input_ids": rng.integers(0, 30522, (batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64),
        }
        arrays["attention_mask"][-1, seq // 2 :] = 0
        got = model(**arrays)["logits"]
        want = session.run(None, arrays)[0]
        np.testing.assert_allclose(got, want, atol=GPU_TOLERANCE, rtol=0)


@pytest.mark.gpu
def test_cuda_fp16_artifact_matches_onnxruntime_on_gpu(request):
    if not has_gpu(80):
        pytest.skip("needs a CUDA GPU of compute capability >= 8.0")
    import onnxruntime
    from tvmdeploy.runtime.precision import tolerance_for

    cuda_bundle = request.getfixturevalue("cuda_bundle")
    model = load(cuda_bundle, precision="fp16")
    assert model.choice.artifact == "cuda-sm80-fp16"
    session = onnxruntime.InferenceSession(
        str(cuda_bundle / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(1)
    arrays = {
        "input_ids": rng.integers(0, 30522, (2, 32), dtype=np.int64),
        "attention_mask": np.ones((2, 32), np.int64),
        "token_type_ids": np.zeros((2, 32), np.int64),
    }
    want = session.run(None, arrays)[0]
    got = model(**arrays)["logits"]
    tol = tolerance_for("fp16", float(np.ptp(want)))
    np.testing.assert_allclose(got, want, atol=tol["atol"], rtol=tol["rtol"])
