"""The weight-only int8 kernels and the fp32 GEMVs against NumPy, on shapes that leave tails: K
not a multiple of the vector width, N not a multiple of the rows a task takes, 1-4 activation
rows; both the AVX2 and the AVX-512 vector width (the latter built for this host, where LLVM
splits its vectors)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvmdeploy.compiler.kernels import cpu_gemv

HOST = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2"})


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize(("k", "n", "lanes"), [(37, 13, 8), (64, 10, 8), (45, 7, 16)])
def test_int8_gemv_matches_numpy(rng, k, n, lanes):
    lib = tvm.compile(cpu_gemv.int8_gemv(k, n, lanes), target=HOST)
    w = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    scale = rng.uniform(0.001, 0.1, size=n).astype(np.float32)
    for batch in (1, 3, 4):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((batch, n), np.float32))
        lib(tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(scale), out)
        want = (x.astype(np.float64) @ w.astype(np.float64).T) * scale
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("k", "n", "lanes", "panel"),
    [
        (37, 13, 8, None),
        (64, 10, 8, None),
        (45, 7, 16, None),
        (20, 6, 4, None),
        (37, 32, 8, 16),
        (64, 48, 8, 16),
        (45, 64, 16, 32),
        (20, 16, 4, 8),
    ],
)
def test_fp32_gemvs_match_numpy(rng, k, n, lanes, panel):
    """The row-stream GEMV over [N, K] (panel None) and the GEMV over weights packed in panels
    [N / panel, K, panel] (K not a multiple of the splits included), 1 and 3 activation rows."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    if panel is None:
        func, stored = cpu_gemv.fp32_gemv(k, n, lanes), w
    else:
        func = cpu_gemv.packed_gemv(k, n, panel, lanes)
        stored = np.ascontiguousarray(w.reshape(n // panel, panel, k).transpose(0, 2, 1))
    lib = tvm.compile(func, target=HOST)
    for batch in (1, 3):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((batch, n), np.float32))
        lib(tvm.runtime.tensor(x), tvm.runtime.tensor(stored), out)
        want = x.astype(np.float64) @ w.astype(np.float64).T
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_the_gemv_widens_int8_in_vector_registers():
    asm = tvm.compile(cpu_gemv.int8_gemv(576, 64, 8), target=HOST).mod.inspect_source("asm")
    assert "vpmovsxbd" in asm and "vcvtdq2ps" in asm  # int8 -> int32 -> fp32, 8 lanes a time
    assert "vfmadd" in asm


@pytest.mark.parametrize(("k", "n"), [(37, 5), (64, 9)])
def test_dequantize_matches_numpy(rng, k, n):
    lib = tvm.compile(cpu_gemv.dequantize(k, n, 8), target=HOST)
    w = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    scale = rng.uniform(0.001, 0.1, size=n).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((n, k), np.float32))
    lib(tvm.runtime.tensor(w), tvm.runtime.tensor(scale), out)
    np.testing.assert_allclose(out.numpy(), w.astype(np.float32) * scale[:, None], rtol=1e-6)
