"""The CPU prefill attention of the paged KV cache: a prompt's queries against its own keys and
values (TVM's "ragged" prefill), scheduled for a CPU.

Why: TVM 0.27's CPU kernel (`relax.frontend.nn.llm._prefill_kernels._attention_prefill_ragged_cpu`)
is one serial scalar loop nest, every score a scalar chain of d multiply-adds, and every key
visited for every query even where the causal mask hides it. At a 512-token prompt it took half of
SmolLM2's prefill (docs/benchmarks.md). This one has the same signature and results (scores in
log2 units, as the cache's merge step expects of `lse`):

- parallel over (head, query row) tasks, head-major, so consecutive tasks of a thread read the
  same key/value head from cache;
- the causal mask as a loop bound: query i reads keys 0 .. kv_len - q_len + i only;
- scores and the probability-weighted sum of values vectorized along the head dimension.

Only what the project's decoders use: rotary embedding applied before the cache (RopeMode NORMAL
or NONE, so `rotary_mode` is 0), no sliding window. `replace_prefill_kernel` puts it into the
exported module in the place of TVM's kernel; the paged prefill (keys already in pages, from a
previous chunk) keeps TVM's kernel, decode has its own (kernels/cpu_paged_attention.py).
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

from .cpu_int8 import KERNEL_ATTR

#: TVM's CPU ragged prefill kernel, by the name its cache module gives it.
PREFILL_KERNEL = "batch_prefill_ragged_kv"

LOG2E = math.log2(math.e)
#: Taylor coefficients of 2**f = exp(f ln 2) on [-0.5, 0.5], degree 6 (relative error < 2e-7).
_EXP2 = [math.log(2) ** i / math.factorial(i) for i in range(7)]


def _exp2(t):
    """2**t for t in [-126, 0] as a vectorizable polynomial (LLVM scalarizes `exp2` into libm
    calls): 2**round(t) from the exponent bits times 2**f, |f| <= 0.5."""
    n = T.round(t)
    f = t - n
    p = T.float32(_EXP2[6])
    for c in reversed(_EXP2[:6]):
        p = p * f + T.float32(c)
    bits = T.shift_left(T.Cast("int32", n) + 127, 23)
    return p * T.reinterpret("float32", bits)


def ragged_prefill(h_kv: int, h_q: int, d: int, d_v: int, lanes: int, dtype: str = "float32"):
    """The PrimFunc of `_attention_prefill_ragged_cpu`'s signature, for `lanes`-wide vectors."""
    group = h_q // h_kv
    lanes = math.gcd(math.gcd(d, d_v), lanes)

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        var_kv_indptr: T.handle,
        var_q_rope_position: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(
            var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset
        )
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d_v), dtype)
        kv_indptr = T.match_buffer(
            var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset
        )
        _q_rope_position = T.match_buffer(
            var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_position_elem_offset
        )
        _k_rope_pos_offset = T.match_buffer(
            var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset
        )
        output = T.match_buffer(var_output, (qo_len, h_q, d_v), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")

        with T.sblock("root"):
            for b in range(batch_size):
                q0 = q_indptr[b]
                q_rows = q_indptr[b + 1] - q0
                k0 = kv_indptr[b]
                k_rows = kv_indptr[b + 1] - k0
                for task in T.parallel(h_q * q_rows):
                    h = task // q_rows
                    i = task % q_rows
                    hk = h // group
                    keys = T.max(
                        T.if_then_else(causal > 0, T.min(k_rows - q_rows + i + 1, k_rows), k_rows),
                        1,
                    )
                    scores = T.alloc_buffer((kv_len + lanes,), "float32")
                    query = T.alloc_buffer((d,), "float32", scope="local")
                    acc = T.alloc_buffer((lanes,), "float32", scope="local")
                    out = T.alloc_buffer((d_v,), "float32", scope="local")
                    state = T.alloc_buffer((2,), "float32", scope="local")
                    for c in range(d // lanes):
                        for x in T.vectorized(lanes):
                            query[c * lanes + x] = (
                                T.Cast("float32", q[q0 + i, h, c * lanes + x])
                                * sm_scale
                                * T.float32(LOG2E)
                            )
                    state[0] = T.float32(-3.0e38)
                    for j in range(keys):
                        for x in T.vectorized(lanes):
                            acc[x] = T.float32(0)
                        for c in range(d // lanes):
                            for x in T.vectorized(lanes):
                                acc[x] = acc[x] + query[c * lanes + x] * T.Cast(
                                    "float32", k[k0 + j, hk, c * lanes + x]
                                )
                        scores[j] = T.float32(0)
                        for x in T.unroll(lanes):
                            scores[j] = scores[j] + acc[x]
                        state[0] = T.max(state[0], scores[j])
                    for x in T.vectorized(lanes):
                        acc[x] = T.float32(0)
                    for c in range((keys + lanes - 1) // lanes):
                        for x in T.vectorized(lanes):
                            scores[c * lanes + x] = T.if_then_else(
                                c * lanes + x < keys,
                                _exp2(T.max(scores[c * lanes + x] - state[0], T.float32(-126))),
                                T.float32(0),
                            )
                            acc[x] = acc[x] + scores[c * lanes + x]
                    state[1] = T.float32(0)
                    for x in T.unroll(lanes):
                        state[1] = state[1] + acc[x]
                    for c in range(d_v // lanes):
                        for x in T.vectorized(lanes):
                            out[c * lanes + x] = T.float32(0)
                    for j in range(keys):
                        for c in range(d_v // lanes):
                            for x in T.vectorized(lanes):
                                out[c * lanes + x] = out[c * lanes + x] + scores[j] * T.Cast(
                                    "float32", v[k0 + j, hk, c * lanes + x]
                                )
                    for c in range(d_v // lanes):
                        for x in T.vectorized(lanes):
                            output[q0 + i, h, c * lanes + x] = T.Cast(
                                dtype, out[c * lanes + x] / state[1]
                            )
                    lse[q0 + i, h] = state[0] + T.log2(state[1])

    return batch_prefill_ragged_kv.with_attr("tirx.is_scheduled", True)


def replace_prefill_kernel(mod, num_kv_heads: int, num_qo_heads: int, head_dim: int, lanes: int):
    """`mod` (a decoder with a `TIRPagedKVCache` built for a CPU, rotary embedding applied before
    the cache) with this prefill kernel in the place of TVM's, under the same name, as
    kernels/cpu_paged_attention.replace_decode_kernel does for decode; a module without TVM's
    kernel is refused by name."""
    names = {gv.name_hint: gv for gv in mod.get_global_vars()}
    if PREFILL_KERNEL not in names:
        raise ValueError(
            f"prefill attention: the module has no {PREFILL_KERNEL} (TVM's CPU ragged prefill "
            "kernel) to replace"
        )
    ours = ragged_prefill(num_kv_heads, num_qo_heads, head_dim, head_dim, lanes)
    mod.update_func(names[PREFILL_KERNEL], ours.with_attr(KERNEL_ATTR, "cpu_prefill_attention"))
    return mod
