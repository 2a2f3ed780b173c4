"""The paged decode-attention kernel against NumPy: causal decode over a paged cache with GQA
(9 query heads on 3 KV heads, as SmolLM2), several lengths around the page boundaries (1, 15,
16, 17, 33) and on both sides of the length from which the pages are split over threads,
batches with sequences of unequal lengths (a split with no pages among them) and scattered
pages; the log-sum-exp too (the cache merges states with it). TVM's own CPU kernel runs on the
same inputs as a second reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
from tvmdeploy.compiler.kernels import cpu_paged_attention as cpa

HOST = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2"})
H_QO, H_KV, D, PAGE = 9, 3, 64, 16


@pytest.fixture(scope="module")
def kernels():
    ours = tvm.compile(cpa.decode_attention(H_KV, H_QO, D, PAGE), target=HOST)
    theirs = tvm.compile(_attention_decode_cpu(H_KV, H_QO, D, "float32", False, {}), target=HOST)
    return ours, theirs


def _paged(rng, lengths: list[int]):
    """A cache holding sequences of `lengths` on shuffled pages; the keys/values per sequence."""
    counts = [math.ceil(n / PAGE) for n in lengths]
    total = sum(counts) + 3  # spare pages, never read
    order = rng.permutation(total)
    pages = rng.standard_normal((total, 2, H_KV, PAGE, D)).astype(np.float32)
    indptr, values, last, kv = [0], [], [], []
    taken = 0
    for n, c in zip(lengths, counts):
        mine = order[taken : taken + c]
        taken += c
        values.extend(int(p) for p in mine)
        indptr.append(len(values))
        last.append(n - (c - 1) * PAGE if c else 0)
        rows = pages[mine].transpose(1, 2, 0, 3, 4).reshape(2, H_KV, c * PAGE, D)[:, :, :n]
        kv.append(rows)
    return (
        pages,
        np.array(indptr, np.int32),
        np.array(values, np.int32),
        np.array(last, np.int32),
        kv,
    )


def _reference(q, kv, sm_scale):
    """softmax(q·kᵀ·scale)·v per query head, its KV head h // group; lse in base 2."""
    group = H_QO // H_KV
    out = np.zeros(q.shape, np.float64)
    lse = np.zeros(q.shape[:2], np.float64)
    for b, (k, v) in enumerate(kv):
        for h in range(H_QO):
            s = k[h // group].astype(np.float64) @ q[b, h].astype(np.float64) * sm_scale
            p = np.exp(s - s.max())
            out[b, h] = p @ v[h // group] / p.sum()
            lse[b, h] = (s.max() + math.log(p.sum())) / math.log(2)
    return out, lse


def _run(kernel, q, pages, indptr, values, last, rotary_mode=0):
    batch = q.shape[0]
    out = tvm.runtime.tensor(np.zeros_like(q))
    lse = tvm.runtime.tensor(np.zeros((batch, H_QO), np.float32))
    zeros = tvm.runtime.tensor(np.zeros(batch, np.int32))
    kernel(
        tvm.runtime.tensor(q),
        tvm.runtime.tensor(pages),
        tvm.runtime.tensor(indptr),
        tvm.runtime.tensor(values),
        tvm.runtime.tensor(last),
        zeros,
        zeros,
        out,
        lse,
        rotary_mode,
        1.0,
        10000.0,
        1.0 / math.sqrt(D),
    )
    return out.numpy(), lse.numpy()


@pytest.mark.parametrize(
    "lengths",
    [
        [1],
        [15],
        [16],
        [17],
        [33],
        [cpa.MIN_PARALLEL_KEYS - 16],  # the last serial length (whole pages)
        [cpa.MIN_PARALLEL_KEYS],  # the first split one
        [300],
        [1000],
        [5, 16, 40],
        [17, 290],
        [1, 300],  # the one-page sequence's splits are empty but one
    ],
)
def test_decode_attention_matches_numpy(kernels, lengths):
    rng = np.random.default_rng(sum(lengths))
    pages, indptr, values, last, kv = _paged(rng, lengths)
    q = (rng.standard_normal((len(lengths), H_QO, D)) * 2).astype(np.float32)
    want, want_lse = _reference(q, kv, 1.0 / math.sqrt(D))
    ours, theirs = (_run(k, q, pages, indptr, values, last) for k in kernels)
    np.testing.assert_allclose(ours[0], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours[1], want_lse, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-4, atol=1e-5)


def test_exp2_polynomial_is_accurate():
    from tvm import te

    x = te.placeholder((4096,), "float32", name="x")
    y = te.compute(x.shape, lambda i: cpa.exp2_poly(x[i]), name="y")
    lib = tvm.compile(te.create_prim_func([x, y]), target=HOST)
    xs = np.linspace(-130, 0, 4096).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros_like(xs))
    lib(tvm.runtime.tensor(xs), out)
    want = np.exp2(np.maximum(xs.astype(np.float64), -126))
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6, atol=0)


def test_an_inline_rope_mode_is_refused(kernels):
    rng = np.random.default_rng(1)
    pages, indptr, values, last, _ = _paged(rng, [20])
    q = rng.standard_normal((1, H_QO, D)).astype(np.float32)
    with pytest.raises(Exception, match="rotary_mode 0"):
        _run(kernels[0], q, pages, indptr, values, last, rotary_mode=1)


def test_the_kernel_is_vectorized():
    asm = tvm.compile(cpa.decode_attention(H_KV, H_QO, D, PAGE), target=HOST).mod.inspect_source(
        "asm"
    )
    assert "vfmadd" in asm and "ymm" in asm
    assert "exp2f" not in asm  # the polynomial, not a libm call per key
