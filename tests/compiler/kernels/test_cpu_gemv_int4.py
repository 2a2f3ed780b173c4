"""The weight-only int4 kernels against NumPy: nibbles packed here in GGUF's in-block order
(byte j of a 32-weight group: element j low, element j + 16 high), shapes that leave tails (K a
multiple of the group but not of the chunk, N not a multiple of the rows a task takes), 1-4
activation rows, the AVX2 and AVX-512 vector widths (the latter split by LLVM on this host) and
NEON's; and the generated code unpacks and converts in vector registers."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvmdeploy.compiler.kernels import cpu_gemv_int4

HOST = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2"})


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(11)


def packed_random(rng, n: int, k: int):
    """(q [n, k] in 0..15, packed uint8 [n, k/2], d, m [n, k/32]) with the packing written out
    element by element, independent of the code under test."""
    q = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    packed = np.zeros((n, k // 2), np.uint8)
    for g in range(k // 32):
        for j in range(16):
            packed[:, g * 16 + j] = q[:, g * 32 + j] | (q[:, g * 32 + 16 + j] << 4)
    d = rng.uniform(0.001, 0.1, size=(n, k // 32)).astype(np.float16)  # as the planes hold them
    m = rng.uniform(-0.8, 0.0, size=(n, k // 32)).astype(np.float16)
    return q, packed, d, m


def dequantized(q, d, m):
    d, m = (np.repeat(p.astype(np.float64), 32, axis=1) for p in (d, m))
    return q.astype(np.float64) * d + m


@pytest.mark.parametrize(("k", "n", "lanes"), [(96, 13, 16), (64, 10, 8), (160, 7, 16), (32, 5, 4)])
def test_int4_gemv_matches_numpy(rng, k, n, lanes):
    lib = tvm.compile(cpu_gemv_int4.int4_gemv(k, n, lanes), target=HOST)
    q, packed, d, m = packed_random(rng, n, k)
    want_w = dequantized(q, d, m)
    for batch in (1, 3, 4):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((batch, n), np.float32))
        args = [tvm.runtime.tensor(a) for a in (x, packed, d, m)]
        lib(*args, out)
        np.testing.assert_allclose(
            out.numpy(), x.astype(np.float64) @ want_w.T, rtol=1e-5, atol=1e-4
        )


@pytest.mark.parametrize(("k", "n"), [(64, 9), (96, None)])
def test_int4_dequantize_matches_numpy(rng, k, n):
    lib = tvm.compile(cpu_gemv_int4.int4_dequantize(k, n, 8), target=HOST)
    rows = n or 6
    q, packed, d, m = packed_random(rng, rows, k)
    out = tvm.runtime.tensor(np.zeros((rows, k), np.float32))
    lib(*[tvm.runtime.tensor(a) for a in (packed, d, m)], out)
    np.testing.assert_allclose(out.numpy(), dequantized(q, d, m), rtol=1e-6, atol=1e-7)


def test_the_int4_gemv_unpacks_in_vector_registers():
    asm = tvm.compile(cpu_gemv_int4.int4_gemv(576, 64, 8), target=HOST).mod.inspect_source("asm")
    assert "vpmovzxbd" in asm or "vpmovzxwd" in asm  # widened 8 lanes a time
    assert "vcvtdq2ps" in asm and "vfmadd" in asm and "ymm" in asm
    assert "vpsrlw" in asm or "vpsrld" in asm  # the high nibbles shifted as vectors


@pytest.mark.parametrize(
    ("target", "marks"),
    [
        ({"kind": "llvm", "mcpu": "skylake-avx512"}, ("zmm", "vfmadd")),
        (
            {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"},
            ("ucvtf", "fmla"),
        ),
    ],
)
def test_the_int4_gemv_compiles_for_avx512_and_neon(target, marks):
    lanes = 16 if "avx512" in target["mcpu"] else 4
    lib = tvm.compile(cpu_gemv_int4.int4_gemv(576, 64, lanes), target=tvm.target.Target(target))
    asm = lib.mod.inspect_source("asm")
    assert all(mark in asm for mark in marks), marks


def test_k_not_a_multiple_of_the_group_is_refused():
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        cpu_gemv_int4.int4_gemv(40, 8, 8)
