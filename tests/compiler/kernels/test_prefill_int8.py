"""The W8A8 prefill kernels (cpu_prefill_int8.py) against NumPy: the row quantizer on a symbolic
row count (rows padded to whole tiles), the per-call weight packing and its column sums, the
GEMM on this CPU's AVX2 micro-kernel, and the AMX variant (emulated tiles here; the real build
must call tdpbusd)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvmdeploy import targets
from tvmdeploy.compiler import build
from tvmdeploy.compiler.kernels import cpu_prefill_int8 as prefill
from tvmdeploy.compiler.kernels.cpu_int8 import KERNELS, kernel_for

from .amx_emulation import emulated_helper

HERE = build.tvm_target(targets.get("x86-64-v3"))
AMX = targets.get("x86-amx")


def _run(func, *arrays, outs):
    fn = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), HERE)["main"]
    out = [tvm.runtime.tensor(np.zeros(shape, dtype)) for shape, dtype in outs]
    fn(*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in arrays], *out)
    return [o.numpy() for o in out]


def _quantized(kernel, x):
    m, k = x.shape
    r, kp = prefill.row_tile(kernel), prefill.padded_k(kernel, k)
    mb = -(-m // r)
    return _run(
        prefill.quantize_rows(kernel, k),
        x,
        outs=[((mb, r, kp), kernel.a_dtype), ((mb, r), "float32"), ((mb, r), "float32")],
    )


@pytest.mark.parametrize("name", ["avx2", "amx-int8", "arm-sdot"])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_rows_quantize_within_half_a_step_padded_with_the_last_row(name, m):
    kernel = KERNELS[name]
    k = 40
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32) * 3
    q, scale, zero = _quantized(kernel, x)
    r = prefill.row_tile(kernel)
    q, scale, zero = q.reshape(-1, q.shape[-1]), scale.reshape(-1), zero.reshape(-1)
    assert q.shape[0] % r == 0 and q.shape[0] - m < r
    levels = q[:m, :k].astype(np.float32) + kernel.a_offset
    assert levels.min() >= 0 and levels.max() <= kernel.a_levels
    back = (q[:m, :k].astype(np.float32) - zero[:m, None]) * scale[:m, None]
    assert np.all(np.abs(back - x) <= 0.5 * scale[:m, None] * (1 + 1e-5))
    span = np.maximum(x.max(1), 0) - np.minimum(x.min(1), 0)
    np.testing.assert_allclose(scale[:m], span / kernel.a_levels, rtol=1e-6)
    np.testing.assert_array_equal(q[m:], np.broadcast_to(q[m - 1], q[m:].shape))
    assert not q[:, k:].any()  # AMX's K padding: zeros


@pytest.mark.parametrize("name", ["avx2", "amx-int8"])
def test_weights_pack_into_the_kernels_panels_with_their_row_sums(name):
    kernel = KERNELS[name]
    n, k = 48, 40
    w = np.random.default_rng(1).integers(-127, 128, (n, k)).astype(np.int8)
    lanes, kp = kernel.lanes, prefill.padded_k(kernel, k)
    packed, colsum = _run(
        prefill.pack_weight(kernel, n, k),
        w,
        outs=[((n // lanes, kp // 4, lanes, 4), "int8"), ((n,), "int32")],
    )
    padded = np.zeros((n, kp), np.int8)
    padded[:, :k] = w
    want = padded.reshape(n // lanes, lanes, kp // 4, 4).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(packed, want)
    np.testing.assert_array_equal(colsum, w.astype(np.int32).sum(axis=1))


def _gemm(kernel, x, w, w_scale, gemm=None):
    (m, k), n = x.shape, w.shape[0]
    q, a_scale, a_zero = _quantized(kernel, x)
    lanes, kp = kernel.lanes, prefill.padded_k(kernel, k)
    packed, colsum = _run(
        prefill.pack_weight(kernel, n, k),
        w,
        outs=[((n // lanes, kp // 4, lanes, 4), "int8"), ((n,), "int32")],
    )
    (out,) = _run(
        gemm or prefill.int8_gemm(kernel, n, k),
        q,
        packed,
        colsum,
        w_scale,
        a_scale,
        a_zero,
        outs=[((*q.shape[:2], n), "float32")],
    )
    # the exact integer product of what the quantizer produced, in NumPy
    rows = q.reshape(-1, kp)[:, :k].astype(np.int64) + kernel.a_offset
    zero = a_zero.reshape(-1) + kernel.a_offset
    exact = (rows @ w.T.astype(np.int64) - zero[:, None] * w.astype(np.int64).sum(1)) * (
        a_scale.reshape(-1)[:, None] * w_scale[None, :]
    )
    return out.reshape(-1, n)[:m], exact[:m]


@pytest.mark.parametrize("m,n,k", [(1, 32, 16), (13, 48, 40), (45, 96, 200), (130, 64, 576)])
@pytest.mark.parametrize("name", ["avx2", "amx-int8"])
def test_the_gemm_is_the_integer_product_and_near_the_fp32_one(m, n, k, name):
    kernel = KERNELS[name]
    rng = np.random.default_rng(m + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    w_scale = rng.uniform(0.5, 2, n).astype(np.float32) / 127
    gemm = prefill.amx_gemm(n, k, make_helper=emulated_helper) if name == "amx-int8" else None
    got, exact = _gemm(kernel, x, w, w_scale, gemm)
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    fp32 = x @ (w.astype(np.float32) * w_scale[:, None]).T
    step = 2.0 / kernel.a_levels  # activation steps of the rows' range, relative
    assert np.abs(got - fp32).max() <= step * np.sqrt(k) * np.abs(fp32).max()


def test_the_amx_prefill_gemm_is_tile_instructions():
    assert kernel_for(AMX).name == "amx-int8"
    lib = tvm.compile(
        tvm.IRModule({"main": prefill.int8_gemm(kernel_for(AMX), 96, 200)}),
        target=build.tvm_target(AMX),
    )
    asm = lib.mod.inspect_source("asm")
    assert {"tdpbusd", "ldtilecfg", "tileloadd"} <= set(
        re.findall(r"\b(tdpbusd|ldtilecfg|tileloadd)\b", asm)
    )


@pytest.mark.parametrize(
    "profile,instruction",
    [("arm64-dotprod", "sdot"), ("arm64-neon", "smull"), ("x86-64-v4", "vpmaddubsw")],
)
def test_the_prefill_gemm_builds_for_the_other_cpus(profile, instruction):
    """Each profile's prefill GEMM (its kernel_for micro-kernel on a symbolic row count)
    compiles for that CPU and runs its dot-product instruction."""
    kernel = kernel_for(targets.get(profile))
    target = build.tvm_target(targets.get(profile))
    mod = tvm.IRModule({"main": prefill.int8_gemm(kernel, 64, 128)})
    asm = tvm.compile(mod, target=target).mod.inspect_source("asm")
    assert instruction in asm
