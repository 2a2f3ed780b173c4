"""Decode attention over TVM's paged KV cache for CPUs: a KV head's query heads together,
vectorized, split over the pages in parallel on long contexts.

Why: the CPU kernel TVM's `TIRPagedKVCache` ships for decode (`_attention_decode_cpu`) walks
every sequence, head, key and head-dim element in serial scalar loops, with one libm `exp2` per
key. On SmolLM2-135M (9 query heads of 64, 3 KV heads, 30 layers) that made the int8 decode step
grow from 8.5 to 13 ms as the context went from 40 to 190 tokens. This kernel takes the same
arguments (so the cache calls it unchanged) and:

- runs one task per (sequence, KV head) with all the query heads that share it (grouped-query
  attention reads each key and value row once for the group, not once per query head);
- from `MIN_PARALLEL_KEYS` keys in the step, splits each sequence's pages into `SPLITS` parts,
  one parallel task per (sequence, KV head, part), and merges the parts' softmax states by
  their maxima (split-K, as flash-decoding does); below it the calling thread runs every task;
- takes the keys a page (16 rows) at a time: 8 keys' scores as 8 vector accumulators reduced
  by one tree of lane shuffles, the online softmax on vectors (the page's max broadcast by a
  butterfly, a vectorized polynomial `exp2`, the sum kept lane-wise), and the weighted sum of
  values in registers along the head dimension.

It handles what our decoders give it: no sliding window, RoPE applied before the append
(`rotary_mode` 0); any other mode stops the call with a clear error. It writes the log-sum-exp
too (base 2, as the cache merges states with it); both match NumPy to fp32 rounding (tests).
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

from .cpu_gemv_a8 import prefetch
from .cpu_int8 import KERNEL_ATTR

__all__ = [
    "DECODE_KERNEL",
    "MIN_PARALLEL_KEYS",
    "decode_attention",
    "exp2_poly",
    "replace_decode_kernel",
]

#: The module's name for the CPU decode kernel this one replaces (`TIRPagedKVCache` adds TVM's
#: under its global symbol).
DECODE_KERNEL = "batch_decode_paged_kv_cpu"
#: From this many keys per step (pages of all sequences x 16) the pages are split over the
#: thread pool. One layer of SmolLM2 on the 2-core Zen 3, one sequence, serial / split: 64 keys
#: 7.9 / 10.6 us, 128 keys 13.0 / 9.9, 300 keys 25.4 / 16.6 (bench, docs/benchmarks.md).
MIN_PARALLEL_KEYS = 128
#: Lanes of the partial dot products (one AVX2 register of fp32).
LANES = 8
#: Parts the pages of a sequence are split into for a parallel step (each KV head's split a task,
#: the parts merged by their log-sum-exp): 12 tasks for 3 KV heads, even on 2, 3, 4 or 6 threads.
SPLITS = 4
#: fp32 values in a 64-byte cache line.
LINE = 16
#: A score no key gets (an empty slot of the last page): its weight, 2**-126 after the clamp of
#: `exp2_poly`, is nothing beside the max key's 1, and its V row is never read.
NO_SCORE = -3.0e38


def exp2_poly(x, lanes: int = 1):
    """2**x for x <= 0 (the softmax's shifted scores; a scalar, or a vector of `lanes`) from
    float ops only, so it vectorizes (LLVM's exp2 of a vector is a libm call per lane): x clamped
    to -126, split into n + f with n the nearest integer (f in [-1/2, 1/2]), 2**f by its degree-6
    Taylor polynomial (relative error below 3e-7), 2**n by the exponent bits."""

    def const(value, dtype="float32"):
        scalar = T.float32(value) if dtype == "float32" else T.int32(value)
        return scalar if lanes == 1 else T.Broadcast(scalar, lanes)

    x = T.max(x, const(-126.0))
    n = T.floor(x + const(0.5))
    f = x - n
    p = const(_EXP2_TAYLOR[0])
    for c in _EXP2_TAYLOR[1:]:
        p = p * f + const(c)
    itype = "int32" if lanes == 1 else f"int32x{lanes}"
    bits = T.shift_left(T.Cast(itype, n) + const(127, "int32"), const(23, "int32"))
    return p * T.reinterpret("float32" if lanes == 1 else f"float32x{lanes}", bits)


#: ln(2)**k / k!, k = 6 .. 0: the coefficients of 2**f, highest first.
_EXP2_TAYLOR = tuple(math.log(2) ** k / math.factorial(k) for k in range(6, -1, -1))


def decode_attention(
    num_kv_heads: int,
    num_qo_heads: int,
    head_dim: int,
    page_size: int = 16,
    min_parallel_keys: int = MIN_PARALLEL_KEYS,
):
    """The PrimFunc with `_attention_decode_cpu`'s signature (fp32, no sliding window): one
    task per (sequence, KV head) and its query heads, or per (sequence, KV head, split of the
    pages) in parallel when the step has `min_parallel_keys` keys or more."""
    H_qo, H_kv, D, P = num_qo_heads, num_kv_heads, head_dim, page_size
    G = H_qo // H_kv
    L = LANES
    C = D // L  # vectors per head row
    if D % L or P % L or L & (L - 1):
        raise ValueError(
            f"decode attention: head dim {D} and page size {P} must be multiples of {L}"
        )
    vector = f"float32x{L}"
    scale_log2e = math.log2(math.e)

    def bcast(value):
        return T.Broadcast(value, L)

    def lane_max(v):
        """The largest lane of `v`, in every lane (three swaps of halves, quarters, pairs)."""
        for width in (L // 2, L // 4, 1):
            v = T.max(v, T.Shuffle([v], [i ^ width for i in range(L)]))
        return v

    def lane_sums(vectors):
        """[sum of vectors[0]'s lanes, vectors[1]'s, ...] (L vectors): a tree of pairwise sums
        of adjacent lanes, L - 1 shuffle pairs for L horizontal sums."""
        even = [2 * i for i in range(L)]
        odd = [i + 1 for i in even]
        while len(vectors) > 1:
            pairs = zip(vectors[::2], vectors[1::2], strict=True)
            vectors = [T.Shuffle([a, b], even) + T.Shuffle([a, b], odd) for a, b in pairs]
        return vectors[0]

    @T.macro
    def task(
        b, kv, split, splits, Q, pages, indptr, values, last_len, part_o, part_m, part_t, sm_scale
    ):
        with T.sblock("task"):
            T.reads()  # declared empty: the inferred regions would name the block's own lets
            T.writes()
            q = T.sblock_alloc_buffer((G, D), "float32")
            o = T.sblock_alloc_buffer((G, D), "float32")
            p = T.sblock_alloc_buffer((G, P), "float32")
            m = T.sblock_alloc_buffer((G, L), "float32")  # the running max, in every lane
            total = T.sblock_alloc_buffer((G, L), "float32")  # lane-wise partial sums
            acc = T.sblock_alloc_buffer((L, L), "float32")
            part = T.sblock_alloc_buffer((C, L), "float32")
            top = T.sblock_alloc_buffer((2, L), "float32")
            begin: T.let[T.int32] = indptr[b]
            count: T.let[T.int32] = indptr[b + 1] - begin
            first: T.let[T.int32] = count * split // splits
            end: T.let[T.int32] = count * (split + 1) // splits
            for g in T.serial(G):
                for c in T.serial(C):
                    q[g, T.ramp(c * L, 1, L)] = Q.vload([b, kv * G + g, c * L], vector) * bcast(
                        sm_scale * T.float32(scale_log2e)
                    )
                    o[g, T.ramp(c * L, 1, L)] = bcast(T.float32(0))
                m[g, T.ramp(0, 1, L)] = bcast(T.float32(NO_SCORE))
                total[g, T.ramp(0, 1, L)] = bcast(T.float32(0))
            for page in T.serial(end - first):
                page_no: T.let[T.int32] = values[begin + first + page]
                rows: T.let[T.int32] = T.if_then_else(first + page == count - 1, last_len[b], P)
                # The next page's key and value rows, requested now: each is a 4 KB block of its
                # own, where the hardware prefetcher starts cold (out of cache, at 4,000 keys of
                # SmolLM2, the step went 17.0 -> 15.8 ms; spread over the value rows and two pages
                # ahead it gained less).
                ahead: T.let[T.int32] = values[begin + T.min(first + page + 1, end - 1)]
                for line in T.serial(P * D // LINE):
                    T.evaluate(prefetch(pages, ahead, 0, kv, line * LINE // D, line * LINE % D))
                    T.evaluate(prefetch(pages, ahead, 1, kv, line * LINE // D, line * LINE % D))
                for g in T.serial(G):
                    # Scores of L keys at a time: L accumulators, then one reduction tree.
                    for half in T.serial(P // L):
                        for u in T.unroll(L):
                            acc[u, T.ramp(0, 1, L)] = bcast(T.float32(0))
                        for c in T.unroll(C):
                            for u in T.unroll(L):
                                acc[u, T.ramp(0, 1, L)] = acc[u, T.ramp(0, 1, L)] + q[
                                    g, T.ramp(c * L, 1, L)
                                ] * pages.vload([page_no, 0, kv, half * L + u, c * L], vector)
                        p[g, T.ramp(half * L, 1, L)] = T.Select(
                            T.ramp(half * L, 1, L) < bcast(rows),
                            lane_sums([acc[u, T.ramp(0, 1, L)] for u in range(L)]),
                            bcast(T.float32(NO_SCORE)),
                        )
                    # Online softmax, a page at a time, on vectors: the page's max in every
                    # lane (a butterfly), the old state rescaled, the sum kept lane-wise.
                    top[0, T.ramp(0, 1, L)] = T.max(
                        m[g, T.ramp(0, 1, L)],
                        lane_max(T.max(p[g, T.ramp(0, 1, L)], p[g, T.ramp(L, 1, L)])),
                    )
                    top[1, T.ramp(0, 1, L)] = exp2_poly(
                        m[g, T.ramp(0, 1, L)] - top[0, T.ramp(0, 1, L)], L
                    )
                    m[g, T.ramp(0, 1, L)] = top[0, T.ramp(0, 1, L)]
                    for half in T.unroll(P // L):
                        p[g, T.ramp(half * L, 1, L)] = exp2_poly(
                            p[g, T.ramp(half * L, 1, L)] - top[0, T.ramp(0, 1, L)], L
                        )
                    total[g, T.ramp(0, 1, L)] = total[g, T.ramp(0, 1, L)] * top[1, T.ramp(0, 1, L)]
                    for half in T.unroll(P // L):
                        total[g, T.ramp(0, 1, L)] = (
                            total[g, T.ramp(0, 1, L)] + p[g, T.ramp(half * L, 1, L)]
                        )
                    # The weighted sum of values, the head row in C accumulators.
                    for c in T.unroll(C):
                        part[c, T.ramp(0, 1, L)] = (
                            o[g, T.ramp(c * L, 1, L)] * top[1, T.ramp(0, 1, L)]
                        )
                    for j in T.serial(rows):
                        for c in T.unroll(C):
                            part[c, T.ramp(0, 1, L)] = part[c, T.ramp(0, 1, L)] + bcast(
                                p[g, j]
                            ) * pages.vload([page_no, 1, kv, j, c * L], vector)
                    for c in T.unroll(C):
                        o[g, T.ramp(c * L, 1, L)] = part[c, T.ramp(0, 1, L)]
            for g in T.serial(G):
                for c in T.serial(C):
                    part_o[b, kv * G + g, split, T.ramp(c * L, 1, L)] = o[g, T.ramp(c * L, 1, L)]
                part_m[b, kv * G + g, split] = m[g, 0]
                top[0, 0] = T.float32(0)
                for lane in T.unroll(L):
                    top[0, 0] = top[0, 0] + total[g, lane]
                part_t[b, kv * G + g, split] = top[0, 0]

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "batch_decode_paged_kv_cpu"})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        Q = T.match_buffer(Q_handle, (B, H_qo, D), "float32")
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, H_kv, P, D), "float32")
        indptr = T.match_buffer(
            page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset
        )
        values = T.match_buffer(
            page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset
        )
        k_rope_pos_offset = T.match_buffer(  # noqa: F841 (RoPE is applied before the append)
            k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset
        )
        q_rope_position = T.match_buffer(  # noqa: F841
            q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset
        )
        output = T.match_buffer(output_handle, (B, H_qo, D), "float32")
        lse = T.match_buffer(lse_handle, (B, H_qo), "float32")
        last_len = T.match_buffer(
            var_length_info, (B,), "int32", elem_offset=length_info_elem_offset
        )
        T.Assert(
            rotary_mode == 0,
            "decode attention (cpu_paged_attention): only RoPE applied before the append "
            "(rotary_mode 0) is supported",
        )
        with T.sblock("root"):
            part_o = T.alloc_buffer((B, H_qo, SPLITS, D), "float32")
            part_m = T.alloc_buffer((B, H_qo, SPLITS), "float32")
            part_t = T.alloc_buffer((B, H_qo, SPLITS), "float32")
            splits: T.let[T.int32] = T.if_then_else(nnz_pages * P >= min_parallel_keys, SPLITS, 1)
            if splits > 1:
                for t in T.parallel(B * H_kv * SPLITS):
                    task(
                        t // (H_kv * SPLITS),
                        t // SPLITS % H_kv,
                        t % SPLITS,
                        SPLITS,
                        Q,
                        pages,
                        indptr,
                        values,
                        last_len,
                        part_o,
                        part_m,
                        part_t,
                        sm_scale,
                    )
            else:
                for t in T.serial(B * H_kv):
                    task(
                        t // H_kv,
                        t % H_kv,
                        0,
                        1,
                        Q,
                        pages,
                        indptr,
                        values,
                        last_len,
                        part_o,
                        part_m,
                        part_t,
                        sm_scale,
                    )
            # The splits' states merged (a single split: only normalized).
            for bh in T.serial(B * H_qo):
                with T.sblock("merge"):
                    T.reads()
                    T.writes()
                    state = T.sblock_alloc_buffer((3,), "float32")
                    acc = T.sblock_alloc_buffer((D,), "float32")
                    b: T.let[T.int32] = bh // H_qo
                    h: T.let[T.int32] = bh % H_qo
                    state[0] = part_m[b, h, 0]
                    for s in T.serial(1, splits):
                        state[0] = T.max(state[0], part_m[b, h, s])
                    state[1] = T.float32(0)
                    for d in T.vectorized(D):
                        acc[d] = T.float32(0)
                    for s in T.serial(splits):
                        state[2] = exp2_poly(part_m[b, h, s] - state[0])
                        state[1] = state[1] + part_t[b, h, s] * state[2]
                        for d in T.vectorized(D):
                            acc[d] = acc[d] + part_o[b, h, s, d] * state[2]
                    state[1] = T.max(state[1], T.float32(1e-30))
                    for d in T.vectorized(D):
                        output[b, h, d] = acc[d] / state[1]
                    lse[b, h] = state[0] + T.log2(state[1])

    return batch_decode_paged_kv


def replace_decode_kernel(mod, num_kv_heads: int, num_qo_heads: int, head_dim: int):
    """`mod` (a decoder with a `TIRPagedKVCache` built for a CPU) with this decode kernel in the
    place of TVM's, under the same name; a module without TVM's kernel is refused by name (a TVM
    that renamed it would otherwise keep its slow kernel unnoticed). A head dim that is not a
    multiple of 8 keeps TVM's kernel."""
    if head_dim % LANES:
        return mod
    ours = decode_attention(num_kv_heads, num_qo_heads, head_dim).with_attr(
        "global_symbol", DECODE_KERNEL
    )
    return replace_kernel(
        mod, DECODE_KERNEL, ours, "cpu_paged_attention", "decode attention", "paged-KV decode"
    )


def replace_kernel(mod, name: str, ours, kernel: str, what: str, tvm_kernel: str):
    """`mod` with the PrimFunc `name` (a TVM kernel of the paged KV cache) replaced by `ours`,
    marked as the project's `kernel`; a module without `name` is refused, naming `what` is
    replaced (a TVM that renamed its kernel would otherwise keep it unnoticed)."""
    names = {gv.name_hint: gv for gv in mod.get_global_vars()}
    if name not in names:
        raise ValueError(
            f"{what}: the module has no {name} (TVM's CPU {tvm_kernel} kernel) to replace"
        )
    mod.update_func(names[name], ours.with_attr(KERNEL_ATTR, kernel))
    return mod
