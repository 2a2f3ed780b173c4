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
from tvmdeploy.compiler.kernels.cpu_matmul import CPUMatmul
from tvmdeploy.compiler.kernels.cpu_schedule import (
    cpu_pipeline,
    default_schedule_pass,
    fusion_passes,
)
from tvmdeploy.compiler.kernels.cpu_target import vector_lanes
from tvmdeploy.compiler.kernels.pack_weights import TRANSFORM_PARAMS
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


def dense_relu(m: int, k: int, n: int, num_input: int | None = None) -> tvm.IRModule:
    """`relu(x @ w + b)` for x [m, k]; with `num_input`, the parameters after it are weights."""

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

    if num_input is not None:
        Module["main"] = Module["main"].with_attr("num_input", num_input)
    return Module


@pytest.mark.parametrize(("m", "k"), [(32, 768), (13, 384)])
def test_k_blocked_gemm_with_epilogue_is_exact(m, k):
    """The accumulators live across the k blocks and the epilogue (bias, ReLU) runs once, after
    the last one; 13 rows also take a guarded row tail."""
    profile = targets.get("x86-64-v3")
    if missing_requirements(profile.requires, probe()):
        pytest.skip("this CPU cannot run x86-64-v3 code")
    n = 48
    module = dense_relu(m, k, n)
    target = build.tvm_target(profile)
    assert CPUMatmul()._k_block(target, m, k) is not None
    vm = relax.VirtualMachine(
        tvm.compile(module, target, relax_pipeline=cpu_pipeline(target, pack=False)), tvm.cpu()
    )
    rng = np.random.default_rng(m + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    got = vm["main"](*(tvm.runtime.tensor(a) for a in (x, w, b))).numpy()
    want = np.maximum(x.astype(np.float64) @ w + b, 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_few_row_weight_gemms_on_x86_take_wide_tiles():
    """x86 weight GEMMs of at most 64 rows take tiles across two packed panels of B, with half
    the register file as accumulators: 4 rows on AVX-512, 2 on AVX2; K-blocked 64 deep where B
    is at least 2 MB (docs/benchmarks.md). NEON keeps its tiles."""
    rule = CPUMatmul()
    avx512 = build.tvm_target(targets.get("x86-64-v4"))
    assert rule._wide_tile(avx512, 16, 32, 768, 32) == (4, 2)
    assert rule._wide_tile(avx512, 16, 64, 384, 32) == (4, 2)
    assert rule._wide_tile(avx512, 16, 128, 768, 32) is None  # enough rows: neutral
    assert rule._wide_tile(avx512, 16, 30, 768, 32) is None  # rows not whole 4-row tiles
    assert rule._wide_tile(avx512, 16, 32, 96, 32) is None  # an odd number of panels
    assert rule._wide_tile(avx512, 16, 32, 768, None) is None  # B not packed
    avx2 = build.tvm_target(targets.get("x86-64-v3"))
    assert rule._wide_tile(avx2, 8, 32, 768, 16) == (2, 2)
    assert rule._wide_tile(avx2, 8, 13, 768, 16) is None  # odd rows: the K-blocked 6 x 1 tile
    neon = build.tvm_target(targets.get("arm64-neon"))
    assert rule._wide_tile(neon, 4, 32, 768, 8) is None


@pytest.mark.parametrize(
    ("name", "m", "k", "n", "k_blocked"),
    [
        ("x86-64-v4", 32, 768, 768, True),
        ("x86-64-v4", 16, 256, 512, False),
        ("x86-64-v3", 32, 768, 768, True),
    ],
)
def test_wide_tile_gemm_with_packed_weights_is_exact(name, m, k, n, k_blocked):
    """Through the real pipeline (packing lifted into transform_params, bias + ReLU epilogue):
    a 32 x 768 x 768 GEMM (B 2.25 MB: K-blocked, the accumulators live across the k blocks and
    the epilogue runs once) and a 16 x 256 x 512 one (B 0.5 MB: not K-blocked) match float64
    numpy, and their scheduled kernels have the loops of that tile (AVX-512 4 rows, AVX2 2)."""
    profile = targets.get(name)
    if missing_requirements(profile.requires, probe()):
        pytest.skip(f"this CPU cannot run {name} code")
    module = dense_relu(m, k, n, num_input=1)  # w and b are weights: packed, lifted
    target = build.tvm_target(profile)
    assert (k * n * 4 >= CPUMatmul.stream_b_bytes) == k_blocked
    panel = 2 * vector_lanes(target)
    rows = 4 if panel == 32 else 2
    with target:
        scheduled = tvm.transform.Sequential(
            fusion_passes(target)
            + [relax.transform.FuseOps(), relax.transform.FuseTIR(), default_schedule_pass(target)]
        )(module)
    (kernel,) = [
        f.script() for gv, f in scheduled.functions_items() if "matmul_packed" in gv.name_hint
    ]
    # A task per two panels (K-blocked: with all its rows; else per row tile).
    tasks = n // (2 * panel) if k_blocked else n // (2 * panel) * m // rows
    assert f"T.parallel(T.int64({tasks}))" in kernel
    assert "T.unroll(T.int64(2))" in kernel and f"T.unroll(T.int64({rows}))" in kernel  # the tile
    depth = 64  # the depth measured on Intel and AMD (docs/benchmarks.md)
    # ko, row tiles, ki
    blocked = f"T.grid(T.int64({k // depth}), T.int64({m // rows}), T.int64({depth}))"
    assert (blocked in kernel) == k_blocked
    executable = tvm.compile(module, target, relax_pipeline=cpu_pipeline(target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    rng = np.random.default_rng(m + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    packed = vm[TRANSFORM_PARAMS](tvm.runtime.tensor(w), tvm.runtime.tensor(b))
    got = vm["main"](tvm.runtime.tensor(x), *packed).numpy()
    want = np.maximum(x.astype(np.float64) @ w + b, 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
