"""Decode attention over TVM's paged KV cache for CPUs: parallel over heads, vectorized.

Why: the CPU kernel TVM's `TIRPagedKVCache` ships for decode (`_attention_decode_cpu`) walks
every sequence, head, key and head-dim element in serial scalar loops, with one libm `exp2` per
key. On SmolLM2-135M (9 query heads of 64, 3 KV heads, 30 layers) that made the int8 decode step
grow from 8.5 to 13 ms as the context went from 40 to 190 tokens, though the K/V it reads is a
few MB. This kernel takes the same arguments (so the cache calls it unchanged) and:

- runs one parallel task per (sequence, query head), when the step has enough keys to pay for
  the thread pool's wake-up (`MIN_PARALLEL_KEYS`); else the calling thread runs them all;
- takes the keys a page (16 rows) at a time: the page's scores as 8-lane partial dot products,
  one max and one rescale of the running output per page (online softmax at page granularity),
  the page's probabilities through a vectorized polynomial `exp2`, and the output update
  vectorized over the head dimension.

It handles what our decoders give it: no sliding window, RoPE applied before the append
(`rotary_mode` 0); any other mode stops the call with a clear error. It writes the log-sum-exp
too (base 2, as the cache merges states with it); both match NumPy to fp32 rounding (tests).
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

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
#: Below this many keys per step (pages of all sequences x 16) one thread runs every head. On the
#: 2-core Zen 3 (shared) the parallel form lost to the serial one at every length up to 1,000
#: keys (bench: 19 against 58 us a layer at 190 keys), the pool's wake-up outweighing the work.
MIN_PARALLEL_KEYS = 1024
#: Lanes of the partial dot products (one AVX2 register of fp32).
LANES = 8
#: A score no key gets (an empty slot of the last page): its weight, 2**-126 after the clamp of
#: `exp2_poly`, is nothing beside the max key's 1, and its V row is never read.
NO_SCORE = -3.0e38


def exp2_poly(x):
    """2**x for x <= 0 (the softmax's shifted scores) from float ops only, so it vectorizes
    (LLVM's exp2 of a vector is a libm call per lane): x clamped to -126, split into n + f with n
    the nearest integer (f in [-1/2, 1/2]), 2**f by its degree-6 Taylor polynomial (relative error
    below 3e-7), 2**n by the exponent bits."""
    x = T.max(x, T.float32(-126.0))
    n = T.floor(x + T.float32(0.5))
    f = x - n
    p = T.float32(_EXP2_TAYLOR[0])
    for c in _EXP2_TAYLOR[1:]:
        p = p * f + T.float32(c)
    bits = T.shift_left(T.Cast("int32", n) + 127, 23)
    return p * T.reinterpret("float32", bits)


#: ln(2)**k / k!, k = 6 .. 0: the coefficients of 2**f, highest first.
_EXP2_TAYLOR = tuple(math.log(2) ** k / math.factorial(k) for k in range(6, -1, -1))


def decode_attention(
    num_kv_heads: int,
    num_qo_heads: int,
    head_dim: int,
    page_size: int = 16,
    min_parallel_keys: int = MIN_PARALLEL_KEYS,
):
    """The PrimFunc with `_attention_decode_cpu`'s signature (fp32, no sliding window); steps
    with fewer than `min_parallel_keys` keys run on the calling thread."""
    H_qo, H_kv, D, P = num_qo_heads, num_kv_heads, head_dim, page_size
    group = H_qo // H_kv
    if D % LANES:
        raise ValueError(f"decode attention: head dim {D} is not a multiple of {LANES}")
    log2e = math.log2(math.e)

    @T.macro
    def head(b, h, Q, pages, indptr, values, last_len, output, lse, sm_scale):
        with T.sblock("head"):
            T.reads()  # declared empty: the inferred regions would name the block's own lets
            T.writes()
            q = T.sblock_alloc_buffer((D,), "float32")
            o = T.sblock_alloc_buffer((D,), "float32")
            acc = T.sblock_alloc_buffer((LANES,), "float32")
            s = T.sblock_alloc_buffer((P,), "float32")
            m = T.sblock_alloc_buffer((1,), "float32")
            m_new = T.sblock_alloc_buffer((1,), "float32")
            total = T.sblock_alloc_buffer((1,), "float32")
            alpha = T.sblock_alloc_buffer((1,), "float32")
            kv = h // group
            begin: T.let[T.int32] = indptr[b]
            pages_of_b: T.let[T.int32] = indptr[b + 1] - begin
            for d in T.vectorized(D):
                q[d] = Q[b, h, d] * (sm_scale * log2e)
                o[d] = T.float32(0)
            m[0] = T.float32(NO_SCORE)
            total[0] = T.float32(0)
            for page in T.serial(pages_of_b):
                page_no: T.let[T.int32] = values[begin + page]
                rows: T.let[T.int32] = T.if_then_else(page == pages_of_b - 1, last_len[b], P)
                for j in T.serial(P):
                    s[j] = T.float32(NO_SCORE)
                for j in T.serial(rows):
                    for lane in T.vectorized(LANES):
                        acc[lane] = T.float32(0)
                    for dd in T.serial(D // LANES):
                        for lane in T.vectorized(LANES):
                            acc[lane] = (
                                acc[lane]
                                + q[dd * LANES + lane] * pages[page_no, 0, kv, j, dd * LANES + lane]
                            )
                    s[j] = (acc[0] + acc[1] + acc[2] + acc[3]) + (acc[4] + acc[5] + acc[6] + acc[7])
                m_new[0] = m[0]
                for j in T.serial(P):
                    m_new[0] = T.max(m_new[0], s[j])
                for j in T.vectorized(P):
                    s[j] = exp2_poly(s[j] - m_new[0])
                alpha[0] = exp2_poly(m[0] - m_new[0])
                m[0] = m_new[0]
                total[0] = total[0] * alpha[0]
                for j in T.serial(P):
                    total[0] = total[0] + s[j]
                for d in T.vectorized(D):
                    o[d] = o[d] * alpha[0]
                for j in T.serial(rows):
                    for d in T.vectorized(D):
                        o[d] = o[d] + s[j] * pages[page_no, 1, kv, j, d]
            for d in T.vectorized(D):
                output[b, h, d] = o[d] / T.max(total[0], T.float32(1e-30))
            lse[b, h] = m[0] + T.log2(T.max(total[0], T.float32(1e-30)))

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
        if nnz_pages * P >= min_parallel_keys:
            for bh in T.parallel(B * H_qo):
                head(
                    bh // H_qo, bh % H_qo, Q, pages, indptr, values, last_len, output, lse, sm_scale
                )
        else:
            for bh in T.serial(B * H_qo):
                head(
                    bh // H_qo, bh % H_qo, Q, pages, indptr, values, last_len, output, lse, sm_scale
                )

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
