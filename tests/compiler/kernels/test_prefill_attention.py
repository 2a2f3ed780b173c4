"""The CPU prefill attention (cpu_prefill_attention.py) against NumPy's softmax attention: causal
and not, grouped-query heads, two sequences in one ragged batch, keys longer than queries (a
prompt chunk after earlier tokens), and the log-sum-exp (log2 units) the cache's merge reads;
the paged kernel (a chunk against the keys already in a sequence's pages) against NumPy and
TVM's own kernel, pages out of order, a sequence without earlier keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvmdeploy import targets
from tvmdeploy.compiler import build
from tvmdeploy.compiler.kernels.cpu_prefill_attention import paged_prefill, ragged_prefill

HERE = build.tvm_target(targets.get("x86-64-v3"))


def _reference(q, k, v, causal, sm_scale, group):
    ql, hq, _ = q.shape
    kl = k.shape[0]
    out = np.zeros((ql, hq, v.shape[-1]), np.float64)
    lse = np.zeros((ql, hq), np.float64)
    for h in range(hq):
        s = q[:, h].astype(np.float64) @ k[:, h // group].T.astype(np.float64) * sm_scale
        if causal:
            visible = np.arange(kl)[None, :] < kl - ql + np.arange(ql)[:, None] + 1
            s = np.where(visible, s, -np.inf)
        top = s.max(1, keepdims=True)
        p = np.exp(s - top)
        total = p.sum(1, keepdims=True)
        out[:, h] = p / total @ v[:, h // group]
        lse[:, h] = ((top + np.log(total)) / math.log(2))[:, 0]
    return out, lse


@pytest.mark.parametrize("causal", [1, 0])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 16)])
def test_ragged_prefill_is_softmax_attention(causal, hq, hkv, d):
    rng = np.random.default_rng(hq + d + causal)
    seqs = [(5, 5), (37, 50)]  # (queries, keys) per sequence: the second after 13 earlier tokens
    qs = [rng.standard_normal((a, hq, d)).astype(np.float32) for a, _ in seqs]
    ks = [rng.standard_normal((b, hkv, d)).astype(np.float32) for _, b in seqs]
    vs = [rng.standard_normal((b, hkv, d)).astype(np.float32) for _, b in seqs]
    q, k, v = (np.concatenate(x) for x in (qs, ks, vs))
    q_ptr = np.cumsum([0] + [a for a, _ in seqs]).astype(np.int32)
    k_ptr = np.cumsum([0] + [b for _, b in seqs]).astype(np.int32)
    sm_scale = 1 / math.sqrt(d)
    fn = tvm.compile(
        tvm.IRModule({"main": ragged_prefill(hkv, hq, d, d, 8).with_attr("global_symbol", "main")}),
        HERE,
    )["main"]
    t = tvm.runtime.tensor
    out = t(np.zeros(q.shape, np.float32))
    lse = t(np.zeros(q.shape[:2], np.float32))
    positions = np.zeros(len(q), np.int32)
    fn(
        t(q), t(q_ptr), t(k), t(v), t(k_ptr), t(positions), t(np.zeros(2, np.int32)),
        out, lse, causal, 0, 1.0, 10000.0, sm_scale,
    )  # fmt: skip
    for s in range(len(seqs)):
        want, want_lse = _reference(qs[s], ks[s], vs[s], causal, sm_scale, hq // hkv)
        rows = slice(q_ptr[s], q_ptr[s + 1])
        np.testing.assert_allclose(out.numpy()[rows], want, atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(lse.numpy()[rows], want_lse, atol=2e-5, rtol=1e-6)


PAGE = 16


def _paged_call(func, q, q_ptr, pages, page_ptr, page_values, last_len, causal, sm_scale):
    fn = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), HERE)["main"]
    t = tvm.runtime.tensor
    out = t(np.full(q.shape, np.nan, np.float32))
    lse = t(np.full(q.shape[:2], np.nan, np.float32))
    batch = len(q_ptr) - 1
    fn(
        t(q), t(q_ptr), t(pages), t(page_ptr), t(page_values), t(last_len),
        t(np.zeros(batch, np.int32)), t(np.zeros(len(q), np.int32)),
        out, lse, causal, 0, 1.0, 10000.0, sm_scale,
    )  # fmt: skip
    return out.numpy(), lse.numpy()


@pytest.mark.parametrize("causal", [0, 1])
def test_paged_prefill_is_softmax_attention_over_the_pages(causal):
    """Three sequences: 70 earlier keys in 5 pages (the last one partly filled), none, and 16 (one
    full page) with more queries than keys; pages shuffled across the cache."""
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu

    hq, hkv, d = 9, 3, 64
    rng = np.random.default_rng(7 + causal)
    keys_per_seq, queries = [70, 0, 16], [12, 3, 20]
    if causal:  # a causal chunk sees keys up to its own position: keys at least its queries
        queries = [12, 0, 16]
    counts = [-(-n // PAGE) for n in keys_per_seq]
    pages = rng.standard_normal((sum(counts) + 4, 2, hkv, PAGE, d)).astype(np.float32)
    page_values = rng.permutation(len(pages))[: sum(counts)].astype(np.int32)
    page_ptr = np.cumsum([0, *counts]).astype(np.int32)
    last_len = np.array([n - (c - 1) * PAGE if c else 0 for n, c in zip(keys_per_seq, counts)])
    q = rng.standard_normal((sum(queries), hq, d)).astype(np.float32)
    q_ptr = np.cumsum([0, *queries]).astype(np.int32)
    sm_scale = 1 / math.sqrt(d)
    args = (q, q_ptr, pages, page_ptr, page_values, last_len.astype(np.int32), causal, sm_scale)
    out, lse = _paged_call(paged_prefill(hkv, hq, d, 8, PAGE), *args)
    theirs, their_lse = _paged_call(
        _attention_prefill_cpu(hkv, hq, d, "float32", False, {}, PAGE), *args
    )
    for s in range(3):
        rows = slice(q_ptr[s], q_ptr[s + 1])
        if not keys_per_seq[s]:  # nothing to attend to: the merge must weigh it as zero
            assert not out[rows].any() and np.all(lse[rows] <= -5e4)
            continue
        mine = page_values[page_ptr[s] : page_ptr[s + 1]]
        k = np.concatenate(pages[mine, 0], axis=1).transpose(1, 0, 2)[: keys_per_seq[s]]
        v = np.concatenate(pages[mine, 1], axis=1).transpose(1, 0, 2)[: keys_per_seq[s]]
        want, want_lse = _reference(q[rows], k, v, causal, sm_scale, hq // hkv)
        np.testing.assert_allclose(out[rows], want, atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(lse[rows], want_lse, atol=2e-5, rtol=1e-6)
        np.testing.assert_allclose(out[rows], theirs[rows], atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(lse[rows], their_lse[rows], atol=2e-5, rtol=1e-6)
