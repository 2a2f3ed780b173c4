"""The CPU prefill attention of the paged KV cache: a prompt's queries against its own keys and
values (TVM's "ragged" prefill), scheduled for a CPU.

Why: TVM 0.27's CPU kernel (`relax.frontend.nn.llm._prefill_kernels._attention_prefill_ragged_cpu`)
is one serial scalar loop nest, every score a scalar chain of d multiply-adds, and every key
visited for every query even where the causal mask hides it. At a 512-token prompt it took half of
SmolLM2's prefill (docs/benchmarks.md). This one has the same signature and results (scores in
log2 units, as the cache's merge step expects of `lse`):

- parallel over (head, query row) tasks, head-major, so consecutive tasks of a thread read the
  same key/value head from cache;
- the causal mask as a loop bound: query i reads keys 0 .. kv_len - q_len + i only (rounded up
  to a block of keys, the rest selected out lane by lane);
- the sequence's keys transposed per head once per call, so a block of `KEY_VECTORS` vectors of
  keys' scores is `d` broadcast FMAs into as many accumulators (no horizontal sum per key); the
  max, the exp and its sum on vectors, and the probability-weighted sum of values vectorized
  along the head dimension, with the accumulators in registers.

Only what the project's decoders use: rotary embedding applied before the cache (RopeMode NORMAL
or NONE, so `rotary_mode` is 0), no sliding window. `replace_prefill_kernel` puts it into the
exported module in the place of TVM's kernel; the paged prefill (keys already in pages, from a
previous chunk) keeps TVM's kernel, decode has its own (kernels/cpu_paged_attention.py).
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

from .cpu_paged_attention import replace_kernel

#: TVM's CPU ragged prefill kernel, by the name its cache module gives it.
PREFILL_KERNEL = "batch_prefill_ragged_kv"

LOG2E = math.log2(math.e)
#: Vectors of keys whose scores are computed together: independent FMA chains (2 FMA pipes x 4
#: cycles of latency on Zen 3 and recent Intel cores want 8).
KEY_VECTORS = 8
#: Taylor coefficients of 2**f = exp(f ln 2) on [-0.5, 0.5], degree 6 (relative error < 2e-7).
_EXP2 = [math.log(2) ** i / math.factorial(i) for i in range(7)]


def _exp2(t, lanes: int):
    """2**t for t in [-126, 0] (a vector of `lanes`) as a polynomial (LLVM scalarizes `exp2`
    into libm calls): 2**round(t) from the exponent bits times 2**f, |f| <= 0.5."""
    n = T.round(t)
    f = t - n
    p = T.Broadcast(T.float32(_EXP2[6]), lanes)
    for c in reversed(_EXP2[:6]):
        p = p * f + T.Broadcast(T.float32(c), lanes)
    bits = T.shift_left(
        T.Cast(f"int32x{lanes}", n) + T.Broadcast(T.int32(127), lanes),
        T.Broadcast(T.int32(23), lanes),
    )
    return p * T.reinterpret(bits, dtype=f"float32x{lanes}")


def ragged_prefill(h_kv: int, h_q: int, d: int, d_v: int, lanes: int, dtype: str = "float32"):
    """The PrimFunc of `_attention_prefill_ragged_cpu`'s signature, for `lanes`-wide vectors."""
    group = h_q // h_kv
    lanes = math.gcd(math.gcd(d, d_v), lanes)
    vectors = KEY_VECTORS
    block = vectors * lanes
    vector = f"float32x{lanes}"

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
                # The sequence's keys transposed per head, [h_kv, d, keys] padded with zeros to
                # whole key blocks: a block's scores are then `d` vector FMAs along the keys.
                keys_t = T.alloc_buffer((h_kv, d, kv_len + block), "float32")
                for t in T.parallel(h_kv * d):
                    for j in range(k_rows):
                        keys_t[t // d, t % d, j] = T.Cast("float32", k[k0 + j, t // d, t % d])
                    for j in range(block):
                        keys_t[t // d, t % d, k_rows + j] = T.float32(0)
                for task in T.parallel(h_q * q_rows):
                    h = task // q_rows
                    i = task % q_rows
                    hk = h // group
                    keys = T.max(
                        T.if_then_else(causal > 0, T.min(k_rows - q_rows + i + 1, k_rows), k_rows),
                        1,
                    )
                    scores = T.alloc_buffer((kv_len + block,), "float32")
                    query = T.alloc_buffer((d,), "float32")
                    out = T.alloc_buffer((d_v // lanes, lanes), "float32")
                    tile = T.alloc_buffer((vectors, lanes), "float32")
                    for c in range(d // lanes):
                        query[T.ramp(c * lanes, 1, lanes)] = T.Cast(
                            vector, q.vload([q0 + i, h, c * lanes], f"{dtype}x{lanes}")
                        ) * T.Broadcast(sm_scale * T.float32(LOG2E), lanes)
                    # Scores, a block of `block` keys at a time: `d` broadcast-FMAs per vector.
                    for jb in range((keys + block - 1) // block):
                        for u in T.unroll(vectors):
                            tile[u, T.ramp(0, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
                        for c in range(d):
                            weight = T.Broadcast(query[c], lanes)
                            for u in T.unroll(vectors):
                                tile[u, T.ramp(0, 1, lanes)] = tile[
                                    u, T.ramp(0, 1, lanes)
                                ] + weight * keys_t.vload([hk, c, jb * block + u * lanes], vector)
                        for u in T.unroll(vectors):
                            scores[T.ramp(jb * block + u * lanes, 1, lanes)] = tile[
                                u, T.ramp(0, 1, lanes)
                            ]
                    # The row's maximum, then 2**(s - max) and its sum; keys past `keys` (the
                    # causal mask, the block's padding) are selected out, lane by lane.
                    chunks = (keys + lanes - 1) // lanes
                    tile[0, T.ramp(0, 1, lanes)] = T.Broadcast(T.float32(-3.0e38), lanes)
                    for c in range(chunks):
                        tile[0, T.ramp(0, 1, lanes)] = T.max(
                            tile[0, T.ramp(0, 1, lanes)],
                            T.Select(
                                T.ramp(c * lanes, 1, lanes) < T.Broadcast(keys, lanes),
                                scores.vload([c * lanes], vector),
                                T.Broadcast(T.float32(-3.0e38), lanes),
                            ),
                        )
                    top = T.alloc_buffer((2,), "float32")
                    top[0] = tile[0, 0]
                    for x in T.unroll(1, lanes):
                        top[0] = T.max(top[0], tile[0, x])
                    tile[1, T.ramp(0, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
                    for c in range(chunks):
                        weights = T.Select(
                            T.ramp(c * lanes, 1, lanes) < T.Broadcast(keys, lanes),
                            _exp2(
                                T.max(
                                    scores.vload([c * lanes], vector) - T.Broadcast(top[0], lanes),
                                    T.Broadcast(T.float32(-126), lanes),
                                ),
                                lanes,
                            ),
                            T.Broadcast(T.float32(0), lanes),
                        )
                        scores[T.ramp(c * lanes, 1, lanes)] = weights
                        tile[1, T.ramp(0, 1, lanes)] = tile[1, T.ramp(0, 1, lanes)] + weights
                    top[1] = T.float32(0)
                    for x in T.unroll(lanes):
                        top[1] = top[1] + tile[1, x]
                    # The weighted sum of values: d_v / lanes accumulators, one per vector.
                    for c in T.unroll(d_v // lanes):
                        out[c, T.ramp(0, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
                    for j in range(keys):
                        weight = T.Broadcast(scores[j], lanes)
                        for c in T.unroll(d_v // lanes):
                            out[c, T.ramp(0, 1, lanes)] = out[c, T.ramp(0, 1, lanes)] + weight * (
                                T.Cast(vector, v.vload([k0 + j, hk, c * lanes], f"{dtype}x{lanes}"))
                            )
                    for c in range(d_v // lanes):
                        output[q0 + i, h, T.ramp(c * lanes, 1, lanes)] = T.Cast(
                            f"{dtype}x{lanes}",
                            out[c, T.ramp(0, 1, lanes)] / T.Broadcast(top[1], lanes),
                        )
                    lse[q0 + i, h] = top[0] + T.log2(top[1])

    return batch_prefill_ragged_kv.with_attr("tirx.is_scheduled", True)


def replace_prefill_kernel(mod, num_kv_heads: int, num_qo_heads: int, head_dim: int, lanes: int):
    """`mod` (a decoder with a `TIRPagedKVCache` built for a CPU, rotary embedding applied before
    the cache) with this prefill kernel in the place of TVM's, under the same name, as
    kernels/cpu_paged_attention.replace_decode_kernel does for decode; a module without TVM's
    kernel is refused by name."""
    ours = ragged_prefill(num_kv_heads, num_qo_heads, head_dim, head_dim, lanes)
    return replace_kernel(
        mod, PREFILL_KERNEL, ours, "cpu_prefill_attention", "prefill attention", "ragged prefill"
    )
