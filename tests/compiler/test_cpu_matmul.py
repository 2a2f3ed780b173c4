"""The rule-based GEMM's register tile: sized to the register file of AVX2, AVX-512 and NEON,
and exact where the rows do not divide into it (a guarded tail)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R
from tvmdeploy import targets
from tvmdeploy.compiler import build
from tvmdeploy.compiler.cpu_matmul import CPUMatmul
from tvmdeploy.compiler.cpu_schedule import cpu_pipeline
from tvmdeploy.compiler.cpu_target import vector_lanes
from tvmdeploy.runtime.probe import missing_requirements, probe


@pytest.mark.parametrize(
    ("profile", "rows"),
    [
        # AVX2: 16 ymm registers, 2 vectors per row -> up to 6 rows; a dividing height of at
        # least half that is preferred to a guarded tail (a guard inside the k loop measured up
        # to 1.8x slower). Weight matmuls get their rows padded to 6 instead (pack_weights), so
        # they take 6-row tiles whole; the heights here are what every other GEMM gets.
        ("x86-64-v3", {1: 1, 5: 5, 13: 6, 16: 4, 32: 4, 128: 4, 1024: 4}),
        # AVX-512 and NEON: 32 registers -> 8 rows, which divide the usual lengths.
        ("x86-64-v4", {1: 1, 13: 8, 128: 8, 1024: 8}),
        ("arm64-neon", {3: 3, 128: 8}),
    ],
)
def test_tile_is_sized_to_the_register_file(profile, rows):
    target = build.tvm_target(targets.get(profile))
    lanes = vector_lanes(target)
    for m, expected in rows.items():
        mr, nr = CPUMatmul._micro_tile(target, lanes, m, 768, 2 * lanes)
        assert (mr, nr) == (expected, 2 * lanes), (profile, m)
        assert mr * (nr // lanes) <= 28  # accumulators, with room for A and B


@pytest.mark.parametrize("m", [13, 128])
def test_gemm_with_a_guarded_row_tail_is_exact(m):
    profile = targets.get("x86-64-v3")
    if missing_requirements(profile.requires, probe()):
        pytest.skip("this CPU cannot run x86-64-v3 code")
    k, n = 96, 48

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((m, k), "float32"), w: R.Tensor((k, n), "float32")):
            with R.dataflow():
                y = R.matmul(x, w)
                R.output(y)
            return y

    target = build.tvm_target(profile)
    vm = relax.VirtualMachine(
        tvm.compile(Module, target, relax_pipeline=cpu_pipeline(target, pack=False)), tvm.cpu()
    )
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


def test_only_few_row_gemms_on_avx2_are_k_blocked():
    """AVX2 GEMMs of at most 64 rows walk K in blocks of 128-256 (a divisor of K), so a slice of
    each B panel stays in L1 across the row tiles; nothing else changes (docs/benchmarks.md)."""
    rule = CPUMatmul()
    avx2 = build.tvm_target(targets.get("x86-64-v3"))
    assert rule._k_block(avx2, 32, 768) == 256
    assert rule._k_block(avx2, 32, 384) == 192  # MiniLM's hidden size
    assert rule._k_block(avx2, 64, 3072) == 256
    assert rule._k_block(avx2, 128, 768) is None  # enough rows: neutral to slower
    assert rule._k_block(avx2, 32, 256) is None  # one block
    assert rule._k_block(avx2, 32, 100) is None  # no divisor in 128-256 other than K itself
    for wider in ("x86-64-v4", "arm64-neon"):
        assert rule._k_block(build.tvm_target(targets.get(wider)), 32, 768) is None


@pytest.mark.parametrize(("m", "k"), [(32, 768), (13, 384)])
def test_k_blocked_gemm_with_epilogue_is_exact(m, k):
    """The accumulators live across the k blocks and the epilogue (bias, ReLU) runs once, after
    the last one; 13 rows also take a guarded row tail."""
    profile = targets.get("x86-64-v3")
    if missing_requirements(profile.requires, probe()):
        pytest.skip("this CPU cannot run x86-64-v3 code")
    n = 48

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(
            x: R.Tensor((m, k), "float32"),
            w: R.Tensor((k, n), "float32"),
            b: R.Tensor((n,), "float32"),
        ):
            with R.dataflow():
                y = R.nn.relu(R.add(R.matmul(x, w), b))
                R.output(y)
            return y

    target = build.tvm_target(profile)
    assert CPUMatmul()._k_block(target, m, k) is not None
    vm = relax.VirtualMachine(
        tvm.compile(Module, target, relax_pipeline=cpu_pipeline(target, pack=False)), tvm.cpu()
    )
    rng = np.random.default_rng(m + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    got = vm["main"](*(tvm.runtime.tensor(a) for a in (x, w, b))).numpy()
    want = np.maximum(x.astype(np.float64) @ w + b, 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
