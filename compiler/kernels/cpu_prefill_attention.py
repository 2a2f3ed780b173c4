"""The CPU prefill attention of the paged KV cache: a prompt's queries against its own keys and
values (TVM's "ragged" prefill) and against a sequence's earlier keys in pages (the "paged"
prefill), scheduled for a CPU.

Why: TVM 0.27's CPU kernel (`relax.frontend.nn.llm._prefill_kernels._attention_prefill_ragged_cpu`)
is one serial scalar loop nest, every score a scalar chain of d multiply-adds, and every key
visited for every query even where the causal mask hides it. At a 512-token prompt it took half of
SmolLM2's prefill (docs/benchmarks.md). This one has the same signature and results (scores in
log2 units, as the cache's merge step expects of `lse`):

- parallel over (head, block of `ROWS_PER_TASK` query rows) tasks, head-major, so consecutive
  tasks of a thread read the same key/value head from cache; within a task each block of keys
  and each chunk of values serves every row before the next is read (L1, not L2, feeds the
  FMAs: 6.1 -> 3.7 ms a layer at 512 tokens on the 2-core Zen 3);
- the causal mask as a loop bound: query i reads keys 0 .. kv_len - q_len + i only (rounded up
  to a block of keys, the rest selected out lane by lane);
- the sequence's keys transposed per head once per call, so a block of `KEY_VECTORS` vectors of
  keys' scores is `d` broadcast FMAs into as many accumulators (no horizontal sum per key); the
  max, the exp and its sum on vectors, and the probability-weighted sum of values vectorized
  along the head dimension, with the accumulators in registers;
- no vector bound to a name inside a loop (`x = T.Broadcast(...)`): TVMScript keeps such a
  value in a stack slot, stored on every iteration, and LLVM then reloaded the loop's indices
  from memory too; inlined, the FMAs read registers (3.55 -> 3.1 ms a layer at 512 tokens).

The paged prefill (a chunk after earlier tokens: its queries against the keys already in the
sequence's pages, merged by the cache with the ragged part) runs the same macro once the
sequence's pages are gathered, keys transposed and values contiguous. TVM's CPU kernel for it
walks every slot of the whole cache, all sequences' capacity, for each query and head, scalar
and serial: 200 tokens after 800 took 4.6 s of SmolLM2 int8, here 0.3 s.

Only what the project's decoders use: rotary embedding applied before the cache (RopeMode NORMAL
or NONE, so `rotary_mode` is 0), no sliding window (the sliding-window kernel stays TVM's).
`replace_prefill_kernel` puts both into the exported module in the place of TVM's; decode has
its own (kernels/cpu_paged_attention.py).
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

from .cpu_paged_attention import replace_kernel

#: TVM's CPU ragged prefill kernel, by the name its cache module gives it.
PREFILL_KERNEL = "batch_prefill_ragged_kv"
#: TVM's CPU paged prefill kernel (a chunk against earlier keys), by name.
PAGED_KERNEL = "batch_prefill_paged_kv_cpu"
#: Tokens a page of TVM's CPU cache holds: its CPU kernels are built for 16 (kv_cache.py passes
#: no page size to them), as the runtime's caches are (runtime/decode_tvm.py).
PAGE_SIZE = 16

LOG2E = math.log2(math.e)
#: Query rows of one head a parallel task computes together: each block of transposed keys and
#: each chunk of value rows is read from L2 once for all of them (once per row before: the
#: kernel waited on L2), and the scratch rows are allocated once a task (per row, the workspace
#: allocations took ~6% of a 512-token prefill).
ROWS_PER_TASK = 16
#: Keys of one chunk of value rows (8 KB of values at d 64).
VALUE_CHUNK = 32
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


def visible(causal, k_rows, q_rows, i):
    """How many keys query row `i` of a sequence attends to (at least 1): all of them, or with the
    causal mask those up to its own position (the keys may begin with earlier tokens)."""
    return T.max(
        T.if_then_else(causal > 0, T.min(k_rows - q_rows + i + 1, k_rows), k_rows),
        1,
    )


def _attend(h_kv: int, h_q: int, d: int, d_v: int, lanes: int, dtype: str):
    """The macro every kernel here runs per sequence once its keys are transposed: the queries
    `q[q0 : q0 + q_rows]` of every head against keys `keys_t[h_kv, d, width]` (zero past
    `k_rows`) and values `values[k0 + j, h_kv, d_v]`, into `output` and `lse` (log2 units)."""
    group = h_q // h_kv
    R = ROWS_PER_TASK
    vectors = KEY_VECTORS
    block = vectors * lanes
    vector = f"float32x{lanes}"

    @T.macro
    def attend(q, q0, q_rows, keys_t, values, k0, k_rows, width, causal, sm_scale, output, lse):
        blocks = (q_rows + R - 1) // R
        for task in T.parallel(h_q * blocks):
            h = task // blocks
            hk = h // group
            i0 = task % blocks * R
            rows = T.min(R, q_rows - i0)
            scores = T.alloc_buffer((R, width), "float32")
            query = T.alloc_buffer((R, d), "float32")
            out = T.alloc_buffer((R, d_v), "float32")
            top = T.alloc_buffer((R, 2), "float32")
            tile = T.alloc_buffer((vectors, lanes), "float32")
            acc = T.alloc_buffer((d_v // lanes, lanes), "float32")
            for r in range(rows):
                for c in range(d // lanes):
                    query[r, T.ramp(c * lanes, 1, lanes)] = T.Cast(
                        vector, q.vload([q0 + i0 + r, h, c * lanes], f"{dtype}x{lanes}")
                    ) * T.Broadcast(sm_scale * T.float32(LOG2E), lanes)
            # Scores, `block` keys at a time for every row of the task in turn (the block of
            # transposed keys stays in L1 across the rows): `d` broadcast FMAs per vector of keys.
            for jb in range((visible(causal, k_rows, q_rows, i0 + rows - 1) + block - 1) // block):
                for r in range(rows):
                    if jb * block < visible(causal, k_rows, q_rows, i0 + r):
                        for u in T.unroll(vectors):
                            tile[u, T.ramp(0, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
                        for c in range(d):
                            for u in T.unroll(vectors):
                                tile[u, T.ramp(0, 1, lanes)] = tile[
                                    u, T.ramp(0, 1, lanes)
                                ] + T.Broadcast(query[r, c], lanes) * keys_t.vload(
                                    [hk, c, jb * block + u * lanes], vector
                                )
                        for u in T.unroll(vectors):
                            scores[r, T.ramp(jb * block + u * lanes, 1, lanes)] = tile[
                                u, T.ramp(0, 1, lanes)
                            ]
            # Each row's maximum, then 2**(s - max) and its sum; keys past the row's (the causal
            # mask, the block's padding) are selected out, lane by lane.
            for r in range(rows):
                keys = visible(causal, k_rows, q_rows, i0 + r)
                chunks = (keys + lanes - 1) // lanes
                tile[0, T.ramp(0, 1, lanes)] = T.Broadcast(T.float32(-3.0e38), lanes)
                for c in range(chunks):
                    tile[0, T.ramp(0, 1, lanes)] = T.max(
                        tile[0, T.ramp(0, 1, lanes)],
                        T.Select(
                            T.ramp(c * lanes, 1, lanes) < T.Broadcast(keys, lanes),
                            scores.vload([r, c * lanes], vector),
                            T.Broadcast(T.float32(-3.0e38), lanes),
                        ),
                    )
                top[r, 0] = tile[0, 0]
                for x in T.unroll(1, lanes):
                    top[r, 0] = T.max(top[r, 0], tile[0, x])
                tile[1, T.ramp(0, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
                for c in range(chunks):
                    scores[r, T.ramp(c * lanes, 1, lanes)] = T.Select(
                        T.ramp(c * lanes, 1, lanes) < T.Broadcast(keys, lanes),
                        _exp2(
                            T.max(
                                scores.vload([r, c * lanes], vector)
                                - T.Broadcast(top[r, 0], lanes),
                                T.Broadcast(T.float32(-126), lanes),
                            ),
                            lanes,
                        ),
                        T.Broadcast(T.float32(0), lanes),
                    )
                    tile[1, T.ramp(0, 1, lanes)] = tile[1, T.ramp(0, 1, lanes)] + scores.vload(
                        [r, c * lanes], vector
                    )
                top[r, 1] = T.float32(0)
                for x in T.unroll(lanes):
                    top[r, 1] = top[r, 1] + tile[1, x]
                for c in range(d_v // lanes):
                    out[r, T.ramp(c * lanes, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
            # The weighted sum of values, `VALUE_CHUNK` keys at a time for every row in turn (the
            # chunk's value rows stay in L1): d_v / lanes accumulators.
            for jc in range(
                (visible(causal, k_rows, q_rows, i0 + rows - 1) + VALUE_CHUNK - 1) // VALUE_CHUNK
            ):
                for r in range(rows):
                    keys = visible(causal, k_rows, q_rows, i0 + r)
                    if jc * VALUE_CHUNK < keys:
                        for c in T.unroll(d_v // lanes):
                            acc[c, T.ramp(0, 1, lanes)] = out[r, T.ramp(c * lanes, 1, lanes)]
                        for j in range(jc * VALUE_CHUNK, T.min(keys, (jc + 1) * VALUE_CHUNK)):
                            for c in T.unroll(d_v // lanes):
                                acc[c, T.ramp(0, 1, lanes)] = acc[
                                    c, T.ramp(0, 1, lanes)
                                ] + T.Broadcast(scores[r, j], lanes) * T.Cast(
                                    vector,
                                    values.vload(
                                        [k0 + j, hk, c * lanes], f"{values.dtype}x{lanes}"
                                    ),
                                )
                        for c in T.unroll(d_v // lanes):
                            out[r, T.ramp(c * lanes, 1, lanes)] = acc[c, T.ramp(0, 1, lanes)]
            for r in range(rows):
                for c in range(d_v // lanes):
                    output[q0 + i0 + r, h, T.ramp(c * lanes, 1, lanes)] = T.Cast(
                        f"{dtype}x{lanes}",
                        out[r, T.ramp(c * lanes, 1, lanes)] / T.Broadcast(top[r, 1], lanes),
                    )
                lse[q0 + i0 + r, h] = top[r, 0] + T.log2(top[r, 1])

    return attend


def ragged_prefill(h_kv: int, h_q: int, d: int, d_v: int, lanes: int, dtype: str = "float32"):
    """The PrimFunc of `_attention_prefill_ragged_cpu`'s signature, for `lanes`-wide vectors."""
    lanes = math.gcd(math.gcd(d, d_v), lanes)
    block = KEY_VECTORS * lanes
    attend = _attend(h_kv, h_q, d, d_v, lanes, dtype)

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
                attend(
                    q, q0, q_indptr[b + 1] - q0, keys_t, v, k0, k_rows, kv_len + block,
                    causal, sm_scale, output, lse,
                )  # fmt: skip

    return batch_prefill_ragged_kv.with_attr("tirx.is_scheduled", True)


def paged_prefill(h_kv: int, h_q: int, d: int, lanes: int, page_size: int, dtype: str = "float32"):
    """The PrimFunc of `_attention_prefill_cpu`'s signature (no sliding window): a prompt chunk's
    queries against the keys already in the sequence's pages. TVM's kernel walks every slot of
    the whole cache (all sequences' capacity) per query and head, scalar and serial; here the
    sequence's pages are gathered once per call, keys transposed and values contiguous, and the
    queries attend to them as in the ragged kernel."""
    lanes = math.gcd(d, lanes)
    block = KEY_VECTORS * lanes
    attend = _attend(h_kv, h_q, d, d, lanes, dtype)

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_pages: T.handle,
        var_page_indptr: T.handle,
        var_page_values: T.handle,
        var_length_info: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(
            var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset
        )
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(
            var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset
        )
        page_values = T.match_buffer(
            var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset
        )
        last_page_len = T.match_buffer(
            var_length_info, (batch_size,), "int32", elem_offset=length_info_elem_offset
        )
        _k_rope_pos_offset = T.match_buffer(
            var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset
        )
        _q_rope_position = T.match_buffer(
            var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_position_elem_offset
        )
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")

        with T.sblock("root"):
            for b in range(batch_size):
                q0 = q_indptr[b]
                q_rows = q_indptr[b + 1] - q0
                p0 = page_indptr[b]
                used = page_indptr[b + 1] - p0
                k_rows = T.if_then_else(used > 0, (used - 1) * page_size + last_page_len[b], 0)
                if k_rows <= 0:  # nothing earlier: a state the cache's merge weighs as zero
                    for t in range(q_rows * h_q):
                        lse[q0 + t // h_q, t % h_q] = T.float32(-5e4)
                        for c in range(d):
                            output[q0 + t // h_q, t % h_q, c] = T.Cast(dtype, T.float32(0))
                else:
                    keys_t = T.alloc_buffer((h_kv, d, nnz_pages * page_size + block), "float32")
                    values = T.alloc_buffer((nnz_pages * page_size, h_kv, d), "float32")
                    for t in T.parallel(h_kv * d):
                        for j in range(k_rows):
                            keys_t[t // d, t % d, j] = T.Cast(
                                "float32",
                                pages[
                                    page_values[p0 + j // page_size],
                                    0,
                                    t // d,
                                    j % page_size,
                                    t % d,
                                ],
                            )
                        for j in range(block):
                            keys_t[t // d, t % d, k_rows + j] = T.float32(0)
                    for j in T.parallel(k_rows):
                        for hk in range(h_kv):
                            for c in range(d // lanes):
                                values[j, hk, T.ramp(c * lanes, 1, lanes)] = T.Cast(
                                    f"float32x{lanes}",
                                    pages.vload(
                                        [
                                            page_values[p0 + j // page_size],
                                            1,
                                            hk,
                                            j % page_size,
                                            c * lanes,
                                        ],
                                        f"{dtype}x{lanes}",
                                    ),
                                )
                    attend(
                        q, q0, q_rows, keys_t, values, 0, k_rows, nnz_pages * page_size + block,
                        causal, sm_scale, output, lse,
                    )  # fmt: skip

    return batch_prefill_paged_kv_cpu.with_attr("tirx.is_scheduled", True)


def replace_prefill_kernel(mod, num_kv_heads: int, num_qo_heads: int, head_dim: int, lanes: int):
    """`mod` (a decoder with a `TIRPagedKVCache` built for a CPU, rotary embedding applied before
    the cache) with these prefill kernels in the place of TVM's ragged and paged ones, under the
    same names, as kernels/cpu_paged_attention.replace_decode_kernel does for decode; a module
    without TVM's kernels is refused by name."""
    heads = (num_kv_heads, num_qo_heads, head_dim)
    ragged = ragged_prefill(*heads, head_dim, lanes)
    paged = paged_prefill(*heads, lanes, PAGE_SIZE)
    mod = replace_kernel(
        mod, PREFILL_KERNEL, ragged, "cpu_prefill_attention", "prefill attention", "ragged prefill"
    )
    return replace_kernel(
        mod, PAGED_KERNEL, paged, "cpu_prefill_attention", "prefill attention", "paged prefill"
    )
