"""AMX: the x86-amx GEMMs compile to tile instructions, and the same kernels, linked against an
emulation of the tile instructions (amx_emulation.py: no AMX CPU here), match integer arithmetic
exactly and the AVX2 int8 kernel bit for bit (int8), and float arithmetic on the same bf16
inputs (bf16), on shapes that are not whole tiles."""

from __future__ import annotations

import re
import subprocess
from functools import partial

import numpy as np
import pytest
import tvm
from tvmdeploy import targets
from tvmdeploy.compiler import build, quantize, verify
from tvmdeploy.compiler.kernels.cpu_amx import (
    LANES,
    amx_bf16_gemm,
    amx_int8_gemm,
    padded_shape,
)
from tvmdeploy.compiler.kernels.cpu_int8 import KERNELS, int8_gemm, kernel_for
from tvmdeploy.compiler.quantize import quantize_int8, to_bfloat16
from tvmdeploy.runtime.precision import short
from tvmdeploy.runtime.probe import missing_requirements, probe

from .amx_emulation import emulated_helper

AMX = targets.get("x86-amx")
AMX_HERE = not missing_requirements(AMX.requires, probe())  # AMX flags and the tile permission
HERE = build.tvm_target(targets.get("x86-64-v3"))  # runs on any AVX2 CPU
TILE_OPS = r"\b(tdpbusd|tdpbf16ps|ldtilecfg|tileloadd|tilestored|tilerelease)\b"
#: M not a multiple of 16 (nor 32), K not a multiple of 64 (nor 32), N not a multiple of 32.
SHAPES = [(13, 48, 40), (45, 80, 200), (32, 64, 128), (1, 16, 96), (128, 96, 384)]


def _asm(func) -> str:
    lib = tvm.compile(tvm.IRModule({"main": func}), target=build.tvm_target(AMX))
    return lib.mod.inspect_source("asm")


def _run(func, *arrays, out_shape, real=False):
    target = build.tvm_target(AMX) if real else HERE
    fn = tvm.compile(tvm.IRModule({"main": func}), target=target)["main"]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    fn(*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in arrays], out)
    return out.numpy()


def test_the_int8_and_bf16_kernels_are_tile_instructions():
    assert {"tdpbusd", "ldtilecfg", "tileloadd", "tilestored", "tilerelease"} <= set(
        re.findall(TILE_OPS, _asm(amx_int8_gemm(128, 384, 384)))
    )
    bf16 = set(re.findall(TILE_OPS, _asm(amx_bf16_gemm(45, 80, 200))))
    assert {"tdpbf16ps", "ldtilecfg", "tileloadd"} <= bf16 and "vdpbf16ps" not in bf16


def _int8_case(m, n, k, a_levels=255):
    rng = np.random.default_rng(m * n + k)
    a = rng.integers(0, a_levels + 1, (m, k)).astype(np.uint8)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    colsum = w.astype(np.int32).sum(axis=1).astype(np.int32)
    w_scale = rng.uniform(0.5, 2, n).astype(np.float32)
    a_scale = rng.uniform(0.5, 2, m).astype(np.float32)
    a_zero = rng.integers(0, a_levels, m).astype(np.float32)
    return a, w, colsum, w_scale, a_scale, a_zero


def _amx_int8(m, n, k, a, w, colsum, w_scale, a_scale, a_zero, real=False):
    """The AMX GEMM (emulated tiles, or `real` ones) on operands padded as quantize.py pads
    them (zeros)."""
    mp, kp = padded_shape("int8", m, k)
    a_pad = np.zeros((mp, kp), np.uint8)
    a_pad[:m, :k] = a
    w_pad = np.zeros((n, kp), np.int8)
    w_pad[:, :k] = w
    packed = w_pad.reshape(n // LANES, LANES, kp // 4, 4).transpose(0, 2, 1, 3)
    func = amx_int8_gemm(m, n, k, make_helper=None if real else emulated_helper)
    return _run(func, a_pad, packed, colsum, w_scale, a_scale, a_zero, out_shape=(m, n), real=real)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_tiles_match_integer_arithmetic_exactly(m, n, k):
    a, w, colsum, w_scale, a_scale, a_zero = case = _int8_case(m, n, k)
    got = _amx_int8(m, n, k, *case)
    acc = a.astype(np.int64) @ w.T.astype(np.int64)
    # The epilogue in float32, in the kernel's order: the int32 sums must be exact to match.
    f32 = np.float32
    want = (acc.astype(f32) - a_zero[:, None] * colsum[None, :].astype(f32)) * (
        a_scale[:, None] * w_scale[None, :]
    )
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)


@pytest.mark.skipif(not AMX_HERE, reason="no AMX tiles (or no tile permission) on this CPU")
@pytest.mark.parametrize("m,n,k", [(45, 80, 200), (128, 96, 384)])
def test_on_an_amx_cpu_the_real_tiles_match_the_emulated_ones_bit_for_bit(m, n, k):
    case = _int8_case(m, n, k)
    np.testing.assert_array_equal(_amx_int8(m, n, k, *case, real=True), _amx_int8(m, n, k, *case))


@pytest.mark.parametrize("m,n,k", [(13, 48, 40), (45, 80, 200)])
def test_int8_tiles_match_the_avx2_kernel_bit_for_bit(m, n, k):
    """Same quantized inputs (7-bit activations, which the AVX2 kernel takes without saturating):
    the same outputs, bit for bit, as the AVX2 kernel that runs here."""
    kernel = KERNELS["avx2"]
    a, w, colsum, w_scale, a_scale, a_zero = case = _int8_case(m, n, k, kernel.a_levels)
    packed = w.reshape(n // kernel.lanes, kernel.lanes, k // 4, 4).transpose(0, 2, 1, 3)
    avx2 = _run(
        int8_gemm(kernel, m, n, k), a, packed, colsum, w_scale, a_scale, a_zero, out_shape=(m, n)
    )
    np.testing.assert_array_equal(_amx_int8(m, n, k, *case), avx2)


def _bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (what to_bf16_bits does)."""
    bits = x.view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _widen(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_bf16_tiles_match_float_arithmetic_on_the_same_bf16_inputs(m, n, k):
    rng = np.random.default_rng(m + n * k)
    a = _bits(rng.standard_normal((m, k)).astype(np.float32))
    w = _bits(rng.standard_normal((n, k)).astype(np.float32))
    mp, kp = padded_shape("bf16", m, k)
    a_pad = np.zeros((mp, kp), np.uint16)
    a_pad[:m, :k] = a
    w_pad = np.zeros((n, kp), np.uint16)
    w_pad[:, :k] = w
    packed = w_pad.reshape(n // LANES, LANES, kp // 2, 2).transpose(0, 2, 1, 3)
    got = _run(amx_bf16_gemm(m, n, k, make_helper=emulated_helper), a_pad, packed, out_shape=(m, n))
    exact = _widen(a).astype(np.float64) @ _widen(w).astype(np.float64).T
    # bf16 x bf16 products are exact in float32; only the float32 sums round.
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.sqrt(k))


# ---- the whole tiny encoder ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_case(tiny_exported, tiny_imported):
    cases = verify.reference_cases(tiny_exported.onnx_path, tiny_imported, tiny_exported.config)
    return tiny_imported, cases


def _lowered(imported, dtype: str):
    if dtype == "int8":
        return quantize_int8(imported.mod, kernel_for(AMX))
    return to_bfloat16(imported.mod, amx=True)


@pytest.mark.parametrize(("dtype", "instruction"), [("int8", "tdpbusd"), ("bfloat16", "tdpbf16ps")])
def test_x86_amx_artifacts_run_weight_matmuls_on_tiles_and_are_refused_here(
    tiny_case, tmp_path, dtype, instruction
):
    imported, cases = tiny_case
    mod, count = _lowered(imported, dtype)
    assert count == 13 * len(imported.buckets)  # as on the other kernels: every weight matmul
    profile = AMX.for_precision(short(dtype))
    built = build.build_artifact(mod, profile, tmp_path, precision=dtype)
    code = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(built.lib_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert instruction in code and "ldtilecfg" in code and "tilerelease" in code
    record, latency = verify.verify(built, imported, cases, timing_runs=0)
    if AMX_HERE:  # the real tiles: parity as for every artifact
        assert record.ok is True, record.detail
    else:  # no AMX (or no permission): not run, and the reason names what is missing
        assert record.where == "not-run" and latency == []
        assert "amx_tile" in record.detail or "tile permission" in record.detail


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_the_amx_rewrite_with_emulated_tiles_matches_onnxruntime_fp32(tiny_case, tmp_path, dtype):
    """The whole rewrite (padding, packing, epilogue) with the tile helper emulated, built for
    this CPU: parity with ONNX Runtime fp32 as for the other reduced-precision artifacts."""
    imported, cases = tiny_case
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            quantize, "amx_int8_gemm", partial(amx_int8_gemm, make_helper=emulated_helper)
        )
        patch.setattr(
            quantize, "amx_bf16_gemm", partial(amx_bf16_gemm, make_helper=emulated_helper)
        )
        mod, _ = _lowered(imported, dtype)
    assert "emulated" in mod.script()
    built = build.build_artifact(mod, targets.get("x86-64-v3"), tmp_path, precision=dtype)
    record, _ = verify.verify(built, imported, cases, timing_runs=0)
    assert record.ok is True, record.detail
    assert 0 < record.max_abs_diff < 0.2 * record.tolerance["atol"]
