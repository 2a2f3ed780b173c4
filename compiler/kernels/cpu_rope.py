"""The CPU split-and-rotate of the paged KV cache: a fused qkv row split into q, k and v, with
plain RoPE applied to q and k (TVM's `fused_rope`, which the cache calls `tir_split_rotary`),
scheduled for a CPU.

Why: TVM 0.27's kernel (`llama_rope_with_position_map`) is one serial loop over every element
of q, k and v that calls libm's `pow`, `cos` and `sin` for each: 5.2 ms a layer for a 512-token
prompt of SmolLM2 on a 2-core Zen 3, 156 ms of its 1.1 s prefill (docs/benchmarks.md). Here the
cos and sin of a position are computed once per frequency (head_dim / 2 per token, not per
head and element), the rows run in parallel, and the rotation is vectorized along the head.

The angles are transformers' (LlamaRotaryEmbedding): `inv_freq = 1 / theta ** (2i / d)` in
fp32, `angle = float(position) * inv_freq` in fp32, then cos and sin, the rotation over the two
halves of the head (`rotate_half`). Only what the project's decoders use: rotary_dim ==
head_dim, no scaling (decoder/config.py refuses the rest). `apply_rope` 0 (GPT-2) splits only.
`replace_rope_kernel` puts it into the exported module under TVM's name.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

from .cpu_paged_attention import replace_kernel

#: TVM's CPU split-and-rotate kernel, by its own name (the cache calls it as `tir_split_rotary`).
ROPE_KERNEL = "fused_rope"


def split_rotary(theta: float, head_dim: int, num_q_heads: int, num_kv_heads: int, lanes: int):
    """The PrimFunc of `llama_rope_with_position_map`'s signature (fp32, plain RoPE)."""
    heads = num_q_heads + 2 * num_kv_heads
    rotated = num_q_heads + num_kv_heads
    half = head_dim // 2
    lanes = math.gcd(half, lanes)
    vector = f"float32x{lanes}"

    @T.prim_func(s_tir=True)
    def split_rotary(
        var_qkv: T.handle,
        var_position_map: T.handle,
        var_q: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        apply_rope: T.int64,
    ):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})
        seq_len = T.int32()
        position_map_elem_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, heads, head_dim), "float32")
        q = T.match_buffer(var_q, (seq_len, num_q_heads, head_dim), "float32")
        k = T.match_buffer(var_k, (seq_len, num_kv_heads, head_dim), "float32")
        v = T.match_buffer(var_v, (seq_len, num_kv_heads, head_dim), "float32")
        position_map = T.match_buffer(
            var_position_map, (seq_len,), "int32", elem_offset=position_map_elem_offset
        )
        with T.sblock("root"):
            frequencies = T.alloc_buffer((half,), "float32")
            for i in range(half):
                frequencies[i] = T.float32(1) / T.pow(
                    T.float32(theta), T.Cast("float32", 2 * i) / T.float32(head_dim)
                )
            for s in T.parallel(seq_len):
                cos = T.alloc_buffer((half,), "float32")
                sin = T.alloc_buffer((half,), "float32")
                for i in range(half):
                    angle = T.Cast("float32", position_map[s]) * frequencies[i]
                    cos[i] = T.if_then_else(apply_rope > 0, T.cos(angle), T.float32(1))
                    sin[i] = T.if_then_else(apply_rope > 0, T.sin(angle), T.float32(0))
                for h in range(rotated):
                    for c in range(half // lanes):
                        first = qkv.vload([s, h, c * lanes], vector)
                        second = qkv.vload([s, h, half + c * lanes], vector)
                        cos_c = cos.vload([c * lanes], vector)
                        sin_c = sin.vload([c * lanes], vector)
                        if h < num_q_heads:
                            q[s, h, T.ramp(c * lanes, 1, lanes)] = first * cos_c - second * sin_c
                            q[s, h, T.ramp(half + c * lanes, 1, lanes)] = (
                                second * cos_c + first * sin_c
                            )
                        else:
                            k[s, h - num_q_heads, T.ramp(c * lanes, 1, lanes)] = (
                                first * cos_c - second * sin_c
                            )
                            k[s, h - num_q_heads, T.ramp(half + c * lanes, 1, lanes)] = (
                                second * cos_c + first * sin_c
                            )
                for h in range(num_kv_heads):
                    for c in range(head_dim // lanes):
                        v[s, h, T.ramp(c * lanes, 1, lanes)] = qkv.vload(
                            [s, rotated + h, c * lanes], vector
                        )

    return split_rotary


def replace_rope_kernel(
    mod, theta: float, head_dim: int, num_q_heads: int, num_kv_heads: int, lanes: int
):
    """`mod` (a decoder with a `TIRPagedKVCache` built for a CPU) with this kernel in the place
    of TVM's, under the same name; a module without TVM's kernel is refused by name."""
    ours = split_rotary(theta, head_dim, num_q_heads, num_kv_heads, lanes)
    return replace_kernel(mod, ROPE_KERNEL, ours, "cpu_rope", "rope", "split-and-rotate")
