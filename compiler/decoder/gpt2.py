"""The GPT-2 decoder as `relax.frontend.nn` modules: learned positions, LayerNorm, GELU, tied
LM head; no RoPE (the KV cache runs with `RopeMode.NONE`, positions come from the cache).

transformers stores GPT-2's projections as Conv1D (`[in, out]`); weights.py transposes them once
into Linear's `[out, in]`, so the bundle still stores each weight once.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode

from .config import DecoderConfig
from .entry import DecoderModule
from .quantized import tied_logits


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_id: int):
        self.layer_id = layer_id
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        batch, seq, _ = x.shape
        qkv = nn.op.reshape(self.c_attn(x), (batch, seq, 3 * self.num_heads, self.head_dim))
        out = cache.attention_with_fused_qkv(
            self.layer_id, qkv, self.num_heads, sm_scale=self.head_dim**-0.5
        )
        return self.c_proj(nn.op.reshape(out, (batch, seq, self.num_heads * self.head_dim)))


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig):
        self.approximate = "tanh" if config.activation == "gelu_tanh" else None
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.c_proj(nn.op.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: DecoderConfig, layer_id: int):
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = Attention(config, layer_id)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Decoder(DecoderModule):
    """Parameter names follow transformers' (`transformer.` dropped)."""

    rope_mode = RopeMode.NONE

    def __init__(self, config: DecoderConfig, target):
        super().__init__(config, target)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.context_length, config.hidden_size)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.num_layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def hidden_states(self, input_ids: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        batch, seq = input_ids.shape
        positions = cache.get_query_positions(batch * seq)
        hidden = self.wte(input_ids) + nn.op.reshape(
            self.wpe(positions), (batch, seq, self.config.hidden_size)
        )
        for block in self.h:
            hidden = block(hidden, cache)
        return self.ln_f(hidden)

    def lm_logits(self, hidden: nn.Tensor) -> nn.Tensor:
        if self.config.tie_word_embeddings:
            return tied_logits(self.wte, hidden)
        return self.lm_head(hidden)
