"""int8: the GEMM kernels against exact integer arithmetic, the quantizer's error bound, whole
models against ONNX Runtime fp32, ARM int8 under QEMU, and which profiles get which kernel."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvmdeploy import targets
from tvmdeploy.compiler import build, verify
from tvmdeploy.compiler.errors import OptionError
from tvmdeploy.compiler.kernels.cpu_int8 import KERNELS, int8_gemm, kernel_for, quantize_rows
from tvmdeploy.compiler.quantize import quantize_int8
from tvmdeploy.runtime.probe import missing_requirements, probe

#: The x86 kernels and a profile whose features they need (the test runs those this CPU has).
X86 = {
    "avx512-vnni": "x86-avx512-vnni",
    "avx-vnni": "x86-64-v3-vnni",
    "avx512bw": "x86-64-v4",
    "avx2": "x86-64-v3",
}


def _runnable(profile_name: str) -> bool:
    return not missing_requirements(targets.get(profile_name).requires, probe())


def _compile(func, profile_name: str):
    target = build.tvm_target(targets.get(profile_name))
    return tvm.compile(tvm.IRModule({"main": func}), target=target)["main"]


def test_each_profile_gets_the_kernel_of_its_instruction_set():
    expected = {
        "x86-avx512-vnni": "avx512-vnni",
        "x86-64-v3-vnni": "avx-vnni",
        "x86-64-v4": "avx512bw",
        "x86-64-v3": "avx2",
        "arm64-dotprod": "arm-sdot",
        "arm64-sve": "arm-sdot",
        "arm64-neon": "arm-neon",
        "cuda-sm80": None,
    }
    for profile, kernel in expected.items():
        found = kernel_for(targets.get(profile))
        assert (found.name if found else None) == kernel, profile
    # The kernel's instructions are covered by what the profile requires of a device.
    assert "avx512_vnni" in targets.get("x86-avx512-vnni").requires["cpu_features"]
    assert "asimddp" in targets.get("arm64-dotprod").requires["cpu_features"]


@pytest.mark.parametrize("kernel_name", list(X86))
@pytest.mark.parametrize("m,n,k", [(32, 64, 96), (13, 48, 40), (1, 32, 1536)])
def test_gemm_matches_integer_arithmetic(kernel_name, m, n, k):
    profile = X86[kernel_name]
    if not _runnable(profile):
        pytest.skip(f"this CPU cannot run {profile} (simulated selection is tested elsewhere)")
    kernel = KERNELS[kernel_name]
    fn = _compile(int8_gemm(kernel, m, n, k), profile)
    rng = np.random.default_rng(m + n + k)
    a = rng.integers(0, kernel.a_levels + 1, (m, k))
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    lanes = kernel.lanes
    packed = w.reshape(n // lanes, lanes, k // 4, 4).transpose(0, 2, 1, 3).copy()
    colsum = w.astype(np.int32).sum(axis=1).astype(np.int32)
    w_scale = rng.uniform(0.5, 2, n).astype(np.float32)
    a_scale = rng.uniform(0.5, 2, m).astype(np.float32)
    a_zero = rng.integers(0, kernel.a_levels, m).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    fn(
        *[tvm.runtime.tensor(x) for x in (a.astype(np.uint8), packed, colsum, w_scale, a_scale)],
        tvm.runtime.tensor(a_zero),
        out,
    )
    exact = (a @ w.T.astype(np.int64) - a_zero[:, None] * colsum[None, :]) * (
        a_scale[:, None] * w_scale[None, :]
    )
    # The int32 accumulation is exact; only the float32 dequantization rounds.
    np.testing.assert_allclose(out.numpy(), exact, rtol=1e-5, atol=1e-3 * np.abs(exact).max())


@pytest.mark.parametrize("kernel_name", ["avx512-vnni", "avx2", "arm-sdot"])
def test_row_quantization_is_within_half_a_step(kernel_name):
    kernel = KERNELS[kernel_name]
    m, k = 24, 96
    fn = _compile(quantize_rows(kernel, m, k), "x86-64-v3")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 20, (m, 1))).astype(np.float32)
    x[3] = np.abs(x[3])  # an all-positive row (after GELU): its range starts at 0
    x[4] = 0.0  # an all-zero row must not divide by zero
    q = tvm.runtime.tensor(np.zeros((m, k), kernel.a_dtype))
    scale = tvm.runtime.tensor(np.zeros(m, np.float32))
    zero = tvm.runtime.tensor(np.zeros(m, np.float32))
    fn(tvm.runtime.tensor(x), q, scale, zero)
    q, scale, zero = q.numpy().astype(np.float32), scale.numpy(), zero.numpy()
    assert np.isfinite(scale).all() and (scale > 0).all()
    stored = q + kernel.a_offset
    assert stored.min() >= 0 and stored.max() <= kernel.a_levels
    restored = (q - zero[:, None]) * scale[:, None]
    assert (np.abs(restored - x) <= 0.5 * scale[:, None] * (1 + 1e-4) + 1e-30).all()
    # Each row uses its own range: a small row is not quantized with a large row's step.
    ranges = np.maximum(x.max(1), 0) - np.minimum(x.min(1), 0)
    np.testing.assert_allclose(scale[ranges > 0], ranges[ranges > 0] / kernel.a_levels, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_case(tiny_exported, tiny_imported):
    cases = verify.reference_cases(tiny_exported.onnx_path, tiny_imported, tiny_exported.config)
    return tiny_imported, cases


def test_quantized_module_rewrites_the_weight_matmuls(tiny_imported):
    mod, count = quantize_int8(tiny_imported.mod, KERNELS["avx2"])
    # q, k, v, attention output, FFN in and out per layer (2 layers) and the pooler, per bucket;
    # the 2-label classifier head (N = 2) stays fp32.
    assert count == 13 * len(tiny_imported.buckets)
    for bucket in tiny_imported.buckets:
        text = mod[bucket.function].script()
        assert text.count("int8_gemm_") == 13
        assert text.count("R.matmul(") == 2 * 2 + 1  # attention's two products per layer + head


@pytest.mark.parametrize("profile_name", list(X86.values()))
def test_int8_model_matches_onnxruntime_fp32(tiny_case, profile_name, tmp_path):
    if not _runnable(profile_name):
        pytest.skip(f"this CPU cannot run {profile_name}")
    imported, cases = tiny_case
    profile = targets.get(profile_name)
    mod, _ = quantize_int8(imported.mod, kernel_for(profile))
    built = build.build_artifact(mod, profile, tmp_path, precision="int8")
    record, _ = verify.verify(built, imported, cases, timing_runs=0)
    assert record.ok is True, record.detail
    spread = max(float(np.ptp(o)) for _, _, expected in cases for o in expected)
    assert record.tolerance["atol"] == pytest.approx(max(5e-2, 5e-2 * spread))
    # int8 is not fp32: a real (small) difference, far inside the tolerance.
    assert 0 < record.max_abs_diff < 0.2 * record.tolerance["atol"]


def test_unknown_and_unbuildable_precisions_are_refused_before_any_work():
    from tvmdeploy.compiler.drivers.compile import artifact_pairs

    with pytest.raises(OptionError, match="unknown precision 'int2'"):
        artifact_pairs([targets.get("x86-64-v3")], ["int2"])
    with pytest.raises(OptionError, match="int4: causal LMs only"):
        artifact_pairs([targets.get("x86-64-v3")], ["int4"])
    with pytest.raises(OptionError, match="no profile among cuda-sm80 has int8"):
        artifact_pairs([targets.get("cuda-sm80")], ["int8"])
    with pytest.raises(OptionError, match="bf16: the AVX-512 x86 profiles"):
        artifact_pairs([targets.get("x86-64-v3")], ["bf16"])
    with pytest.raises(OptionError, match="fp16: the CUDA profiles"):
        artifact_pairs([targets.get("x86-64-v3")], ["fp16"])
    pairs = artifact_pairs(
        [targets.get("cuda-sm80"), targets.get("x86-64-v3")], ["fp32", "int8", "fp16"]
    )
    assert pairs == {"cuda-sm80": ["float32", "float16"], "x86-64-v3": ["float32", "int8"]}
    pairs = artifact_pairs([targets.get("x86-64-v3"), targets.get("x86-64-v4")], ["fp32", "bf16"])
    assert pairs == {"x86-64-v3": ["float32"], "x86-64-v4": ["float32", "bfloat16"]}
