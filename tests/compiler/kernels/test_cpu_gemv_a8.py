"""The int8-activation decode GEMVs (W4A8, W8A8) against NumPy: the activation row's quantization
(per group of 32: scale max|x| / 127, the kernel's layout, the group sums), the integer dot
product exactly (an fp32 sum of exact int32 group dots), and the fp32 product within the bound
the quantization allows (half a step per x); odd N (a last task that recomputes a row), K with
an odd number of groups (AVX2 int4's lone last group), 1 and 3 rows; the same for W4A8's prefill
GEMM (blocks of prompt rows, an odd row count repeating the last row). The AVX2 build is
vpmaddubsw in registers; the ARM builds (cross-compiled) are sdot or smull/saddlp."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvmdeploy import targets
from tvmdeploy.compiler.kernels import cpu_gemv_a8
from tvmdeploy.compiler.kernels.cpu_int8 import kernel_for

from .test_cpu_gemv_int4 import packed_random

HOST = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2"})


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(28)


def quantized_reference(x: np.ndarray):
    """(xq [b, g, 32] as float64 integers, sx [b, g], xs [b, g] = sx * sum(xq)): llama.cpp's
    Q8_1 groups."""
    b, k = x.shape
    groups = x.reshape(b, k // 32, 32).astype(np.float64)
    sx = np.abs(groups).max(axis=2) / 127
    xq = np.round(groups / np.where(sx > 0, sx, 1)[..., None])
    return xq, sx, sx * xq.sum(axis=2)


def paired(xq: np.ndarray) -> np.ndarray:
    """xq [b, g, 32] in AVX2 int4's layout, written out element by element: per pair of
    groups, the low halves of both, then the high halves; an odd last group in order."""
    b, g, _ = xq.shape
    out = np.zeros((b, g * 32), np.int64)
    for group in range(g):
        for j in range(32):
            if group == g - 1 and g % 2:
                out[:, group * 32 + j] = xq[:, group, j]
                continue
            half, within = divmod(j, 16)
            out[:, (group // 2) * 64 + half * 32 + (group % 2) * 16 + within] = xq[:, group, j]
    return out


def run_quantize(x: np.ndarray, layout: str):
    b, k = x.shape
    lib = tvm.compile(cpu_gemv_a8.quantize_activations(k, layout), target=HOST)
    outs = [np.zeros((b, k), np.int8), np.zeros((b, k // 8), np.float32)]
    outs.append(np.zeros((b, k // 32), np.float32))
    arrays = [tvm.runtime.tensor(a) for a in outs]
    lib.mod.get_function(f"a8_quantize_{layout}_k{k}")(tvm.runtime.tensor(x), *arrays)
    return [a.numpy() for a in arrays]


@pytest.mark.parametrize(
    ("layout", "k", "b"), [("paired", 96, 1), ("paired", 128, 3), ("plain", 96, 2)]
)
def test_the_activation_row_is_quantized_per_group_in_the_kernels_layout(rng, layout, k, b):
    x = rng.standard_normal((b, k)).astype(np.float32)
    x[0, 32:64] = 0  # an all-zero group: scale 0, q 0
    xq, sx4, xs = run_quantize(x, layout)
    want_q, want_sx, want_xs = quantized_reference(x)
    layout_q = paired(want_q) if layout == "paired" else want_q.reshape(b, k)
    assert np.abs(xq.astype(np.int64) - layout_q).max() <= 1  # a rounding tie at most
    assert (xq.astype(np.int64) == layout_q).mean() > 0.99
    np.testing.assert_allclose(sx4, np.repeat(want_sx, 4, axis=1), rtol=1e-6)
    np.testing.assert_allclose(xs, want_xs, rtol=1e-5, atol=1e-5)


def _gemv(bits: int, k: int, n: int, b: int, rng, kernel: str = "gemv"):
    """(out of the kernel, out of the integer reference, fp32 product, error bound); `kernel`
    "gemm": W4A8's prefill GEMM in place of the GEMV."""
    x = rng.standard_normal((b, k)).astype(np.float32)
    layout = cpu_gemv_a8.layout_for("avx2", bits)
    mod = tvm.IRModule(
        {
            "quantize": cpu_gemv_a8.quantize_activations(k, layout),
            "gemv": (
                cpu_gemv_a8.w8a8_gemv
                if bits == 8
                else cpu_gemv_a8.w4a8_gemm
                if kernel == "gemm"
                else cpu_gemv_a8.w4a8_gemv
            )(k, n, "avx2"),
        }
    )
    lib = tvm.compile(mod, target=HOST)
    xq = tvm.runtime.tensor(np.zeros((b, k), np.int8))
    sx4 = tvm.runtime.tensor(np.zeros((b, k // 8), np.float32))
    xs = tvm.runtime.tensor(np.zeros((b, k // 32), np.float32))
    lib.mod.get_function(f"a8_quantize_{layout}_k{k}")(tvm.runtime.tensor(x), xq, sx4, xs)
    out = tvm.runtime.tensor(np.zeros((b, n), np.float32))
    want_q, sx, sums = quantized_reference(x)
    if bits == 4:
        q, packed, d, m = packed_random(rng, n, k)
        weights = [packed, d, m]
        lib.mod.get_function(f"w4a8_{kernel}_avx2_k{k}_n{n}")(
            xq, sx4, xs, *(tvm.runtime.tensor(a) for a in weights), out
        )
        qg = q.reshape(n, k // 32, 32).astype(np.int64)
        isum = np.einsum("bgk,ngk->bng", want_q.astype(np.int64), qg)  # exact integers
        integer = (isum * d[None] * sx[:, None, :]).sum(2) + (m[None] * sums[:, None, :]).sum(2)
        w = qg * d[..., None] + m[..., None]
    else:
        wq = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
        scale = rng.uniform(0.001, 0.02, size=n).astype(np.float32)
        lib.mod.get_function(f"w8a8_gemv_avx2_k{k}_n{n}")(
            xq, sx4, tvm.runtime.tensor(wq), tvm.runtime.tensor(scale), out
        )
        wg = wq.reshape(n, k // 32, 32).astype(np.int64)
        isum = np.einsum("bgk,ngk->bng", want_q.astype(np.int64), wg)
        integer = (isum * sx[:, None, :]).sum(2) * scale
        w = wg * scale[:, None, None]
    fp32 = x.astype(np.float64) @ w.reshape(n, k).T
    # |x - sx * xq| <= sx / 2 per element: the product moves by at most sum |w| sx / 2.
    bound = (np.abs(w).sum(axis=2)[None] * sx[:, None, :] / 2).sum(2)
    return out.numpy(), integer, fp32, bound


@pytest.mark.parametrize(("k", "n", "b"), [(96, 13, 1), (576, 37, 3), (64, 5, 2)])
@pytest.mark.parametrize("bits", [4, 8])
def test_the_gemv_is_the_integer_dot_and_within_the_quantization_bound(rng, bits, k, n, b):
    got, integer, fp32, bound = _gemv(bits, k, n, b, rng)
    scale = np.abs(integer).max()
    np.testing.assert_allclose(got, integer, atol=2e-6 * scale)  # fp32 sums of exact int32 dots
    assert np.all(np.abs(got - fp32) <= bound + 2e-6 * scale)
    assert np.abs(got - fp32).max() > 0  # the activations were quantized, not read as fp32


@pytest.mark.parametrize(("k", "n", "b"), [(576, 37, 5), (64, 5, 2), (128, 8, 1)])
def test_the_w4a8_prefill_gemm_is_the_integer_dot_and_within_the_bound(rng, k, n, b):
    got, integer, fp32, bound = _gemv(4, k, n, b, rng, kernel="gemm")
    scale = np.abs(integer).max()
    np.testing.assert_allclose(got, integer, atol=2e-6 * scale)
    assert np.all(np.abs(got - fp32) <= bound + 2e-6 * scale)


def test_the_w4a8_prefill_gemm_refuses_an_odd_number_of_groups():
    assert not cpu_gemv_a8.prefill_gemm_supports("avx2", 96)  # 3 groups: the GEMV runs it
    assert not cpu_gemv_a8.prefill_gemm_supports("sdot", 64)
    with pytest.raises(ValueError, match="no 'avx2' kernel for K = 96"):
        cpu_gemv_a8.w4a8_gemm(96, 8, "avx2")


@pytest.mark.parametrize("bits", [4, 8])
def test_the_avx2_gemv_is_byte_dot_products_in_registers(bits):
    makes = [cpu_gemv_a8.w4a8_gemv, cpu_gemv_a8.w4a8_gemm] if bits == 4 else [cpu_gemv_a8.w8a8_gemv]
    for make in makes:
        asm = tvm.compile(make(576, 64, "avx2"), target=HOST).mod.inspect_source("asm")
        assert "vpmaddubsw" in asm and "vpmaddwd" in asm and "ymm" in asm
        if bits == 8:
            assert "vpsignb" in asm  # llama.cpp's sign trick: |w| unsigned times sign(x, w)
        # Accumulators on the stack (registers), not a workspace allocated per task and row.
        assert "TVMBackendAllocWorkspace" not in asm, make.__name__
        if make is not cpu_gemv_a8.w4a8_gemm:  # the decode GEMVs fetch rows ahead
            assert "prefetcht0" in asm, make.__name__


@pytest.mark.parametrize(
    ("profile", "isa", "marks"),
    [
        ("arm64-dotprod", "sdot", ("sdot", "scvtf")),
        ("arm64-sve", "sdot", ("sdot",)),
        ("arm64-neon", "neon", ("smull", "saddlp")),
        ("x86-64-v4", "avx2", ("vpmaddubsw",)),
        ("x86-avx512-vnni", "avx2", ("vpmaddubsw",)),
    ],
)
def test_each_cpu_profile_gets_its_familys_kernel(profile, isa, marks):
    from tvmdeploy.compiler import build

    chosen = targets.get(profile)
    assert cpu_gemv_a8.dot_isa(kernel_for(chosen)) == isa
    target = build.tvm_target(chosen)
    for make in (cpu_gemv_a8.w4a8_gemv, cpu_gemv_a8.w8a8_gemv):
        asm = tvm.compile(make(576, 64, isa), target=target).mod.inspect_source("asm")
        assert all(mark in asm for mark in marks), (make.__name__, marks)


def test_gpu_profiles_keep_the_weight_only_kernels():
    assert cpu_gemv_a8.dot_isa(kernel_for(targets.get("cuda-sm80"))) is None


def test_k_not_a_multiple_of_the_group_is_refused():
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        cpu_gemv_a8.w4a8_gemv(48, 8, "avx2")
