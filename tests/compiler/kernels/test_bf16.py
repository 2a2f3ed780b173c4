"""bf16: the rounding against PyTorch's, the GEMM against float arithmetic on the same bf16
inputs, a whole model against ONNX Runtime fp32, and what a bf16 artifact asks of a device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import te
from tvmdeploy import targets
from tvmdeploy.compiler import build, verify
from tvmdeploy.compiler.kernels.cpu_bf16 import LANES, bf16_gemm, to_bf16_bits
from tvmdeploy.compiler.quantize import to_bfloat16
from tvmdeploy.runtime.probe import DeviceInfo, missing_requirements, probe

BF16_PROFILE = targets.get("x86-avx512-vnni").for_precision("bf16")


def _runs_bf16() -> bool:
    return not missing_requirements(BF16_PROFILE.requires, probe())


needs_bf16 = pytest.mark.skipif(
    not _runs_bf16(), reason="this CPU has no AVX512-BF16 (compiling for it is tested below)"
)


def _widen(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _torch_bits(x: np.ndarray) -> np.ndarray:
    """PyTorch's float32 -> bfloat16 (round to nearest even), as raw bits."""
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_rounding_matches_pytorch_including_ties():
    x = te.placeholder((4096,), "float32", name="x")
    fn = tvm.compile(
        te.create_prim_func([x, to_bf16_bits(x)]),
        target=build.tvm_target(targets.get("x86-64-v3")),
    )
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(4096) * np.exp(rng.uniform(-20, 20, 4096))).astype(np.float32)
    # Exact ties: the low 16 bits are 0x8000, so round-to-nearest-even decides by the kept bit.
    ties = values[:512].view(np.uint32) & np.uint32(0xFFFF0000) | np.uint32(0x8000)
    values[:512] = ties.view(np.float32)
    values[512:520] = [0.0, -0.0, 1.0, -1.0, 3.0e38, -3.0e38, 1e-40, 65504.0]
    out = tvm.runtime.tensor(np.zeros(4096, np.uint16))
    fn(tvm.runtime.tensor(values), out)
    np.testing.assert_array_equal(out.numpy(), _torch_bits(values))


@needs_bf16
@pytest.mark.parametrize("m,n,k", [(32, 48, 96), (13, 32, 40), (1, 16, 1536), (128, 96, 384)])
def test_gemm_matches_float_arithmetic_on_the_same_bf16_inputs(m, n, k):
    fn = tvm.compile(
        tvm.IRModule({"main": bf16_gemm(m, n, k)}), target=build.tvm_target(BF16_PROFILE)
    )["main"]
    rng = np.random.default_rng(m + n + k)
    a = _torch_bits(rng.standard_normal((m, k)).astype(np.float32))
    w = _torch_bits(rng.standard_normal((n, k)).astype(np.float32))
    packed = w.reshape(n // LANES, LANES, k // 2, 2).transpose(0, 2, 1, 3).copy()
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    fn(tvm.runtime.tensor(a), tvm.runtime.tensor(packed), out)
    exact = _widen(a).astype(np.float64) @ _widen(w).astype(np.float64).T
    # bf16 x bf16 products are exact in float32; only the float32 sums round.
    np.testing.assert_allclose(out.numpy(), exact, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@pytest.fixture(scope="module")
def bf16_build(tiny_exported, tiny_imported, tmp_path_factory):
    cases = verify.reference_cases(tiny_exported.onnx_path, tiny_imported, tiny_exported.config)
    mod, count = to_bfloat16(tiny_imported.mod)
    built = build.build_artifact(
        mod, BF16_PROFILE, tmp_path_factory.mktemp("bf16"), precision="bfloat16"
    )
    return built, count, cases


def test_bf16_module_rewrites_the_weight_matmuls(bf16_build, tiny_imported):
    _, count, _ = bf16_build
    # As for int8: 13 weight matmuls per bucket; the 2-label head (N = 2) stays fp32.
    assert count == 13 * len(tiny_imported.buckets)


@needs_bf16
def test_bf16_model_matches_onnxruntime_fp32(bf16_build, tiny_imported):
    built, _, cases = bf16_build
    record, _ = verify.verify(built, tiny_imported, cases, timing_runs=0)
    assert record.ok is True, record.detail
    # bf16 is not fp32: a real difference, far inside the tolerance.
    assert 0 < record.max_abs_diff < 0.2 * record.tolerance["atol"]


def test_a_bf16_artifact_requires_avx512_bf16_and_is_not_run_without_it(bf16_build, tiny_imported):
    built, _, cases = bf16_build
    assert "avx512_bf16" in built.profile.requires["cpu_features"]
    assert "+avx512bf16" in built.target["mattr"]
    assert targets.get("x86-64-v3").for_precision("bf16") == targets.get("x86-64-v3")
    without = DeviceInfo(
        "x86_64",
        "AVX-512 CPU without BF16",
        frozenset(targets.get("x86-avx512-vnni").requires["cpu_features"]),
        2,
        (),
    )
    record, latency = verify.verify(built, tiny_imported, cases, timing_runs=0, device=without)
    assert record.where == "not-run" and "avx512_bf16" in record.detail
    assert latency == []
