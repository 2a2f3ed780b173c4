"""The CPU split-and-rotate (cpu_rope.py) against transformers' own RoPE (LlamaRotaryEmbedding
and apply_rotary_pos_emb) at arbitrary positions (a prompt chunk after earlier tokens), values
split off unchanged, and `apply_rope` 0 (GPT-2) splitting only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from tvmdeploy import targets
from tvmdeploy.compiler import build
from tvmdeploy.compiler.kernels.cpu_rope import split_rotary

HERE = build.tvm_target(targets.get("x86-64-v3"))


@pytest.mark.parametrize(("hq", "hkv", "d", "theta"), [(9, 3, 64, 100000.0), (4, 2, 16, 10000.0)])
def test_split_rotary_is_transformers_rope(hq, hkv, d, theta):
    rng = np.random.default_rng(d)
    positions = np.concatenate([np.arange(300, 337), [0, 1, 4095]]).astype(np.int32)
    qkv = rng.standard_normal((len(positions), hq + 2 * hkv, d)).astype(np.float32)
    fn = tvm.compile(
        tvm.IRModule(
            {"main": split_rotary(theta, d, hq, hkv, 8).with_attr("global_symbol", "main")}
        ),
        HERE,
    )["main"]
    outs = [
        tvm.runtime.tensor(np.zeros((len(positions), h, d), np.float32)) for h in (hq, hkv, hkv)
    ]
    fn(tvm.runtime.tensor(qkv), tvm.runtime.tensor(positions), *outs, 1)

    config = LlamaConfig(
        hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv, rope_theta=theta
    )
    x = torch.from_numpy(qkv).transpose(0, 1)[None]  # [1, heads, seq, d]
    cos, sin = LlamaRotaryEmbedding(config)(x, torch.from_numpy(positions).long()[None])
    want_q, want_k = apply_rotary_pos_emb(x[:, :hq], x[:, hq : hq + hkv], cos, sin)
    for got, want in ((outs[0], want_q), (outs[1], want_k)):
        np.testing.assert_allclose(got.numpy(), want[0].transpose(0, 1).numpy(), atol=2e-6)
    np.testing.assert_array_equal(outs[2].numpy(), qkv[:, hq + hkv :])

    fn(tvm.runtime.tensor(qkv), tvm.runtime.tensor(positions), *outs, 0)  # split only
    np.testing.assert_array_equal(outs[0].numpy(), qkv[:, :hq])
    np.testing.assert_array_equal(outs[1].numpy(), qkv[:, hq : hq + hkv])


def test_a_module_without_tvms_kernel_is_refused_by_name():
    from tvmdeploy.compiler.kernels.cpu_rope import replace_rope_kernel

    with pytest.raises(ValueError, match="rope: the module has no fused_rope"):
        replace_rope_kernel(tvm.IRModule(), 10000.0, 64, 9, 3, 8)
