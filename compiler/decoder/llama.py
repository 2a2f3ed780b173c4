"""The Llama-style decoder as `relax.frontend.nn` modules: Llama/SmolLM2/TinyLlama, Mistral,
Qwen2 (bias on q/k/v) and Phi-3 (its fused weights are split or kept by weights.py).

RMSNorm, grouped-query attention with RoPE applied inside the paged KV cache (rotate-half, as
transformers does), a SiLU-gated MLP, optionally tied embeddings. q/k/v and gate/up are one
matmul each (their weights concatenated once at load, weights.py).
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from .config import DecoderConfig
from .entry import DecoderModule
from .quantized import tied_logits


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_id: int):
        self.layer_id = layer_id
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        width = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        batch, seq, _ = x.shape
        qkv = nn.op.reshape(
            self.qkv_proj(x),
            (batch, seq, self.num_heads + 2 * self.num_kv_heads, self.head_dim),
        )
        out = cache.attention_with_fused_qkv(
            self.layer_id, qkv, self.num_heads, sm_scale=self.head_dim**-0.5
        )
        return self.o_proj(nn.op.reshape(out, (batch, seq, self.num_heads * self.head_dim)))


class GatedMLP(nn.Module):
    def __init__(self, config: DecoderConfig):
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        gate, up = nn.op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.op.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, config: DecoderConfig, layer_id: int):
        self.input_layernorm = nn.RMSNorm(config.hidden_size, -1, config.norm_eps, bias=False)
        self.self_attn = Attention(config, layer_id)
        self.post_attention_layernorm = nn.RMSNorm(
            config.hidden_size, -1, config.norm_eps, bias=False
        )
        self.mlp = GatedMLP(config)

    def forward(self, x: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(DecoderModule):
    """Parameter names follow transformers' (`model.` dropped; q/k/v and gate/up fused)."""

    def __init__(self, config: DecoderConfig, target):
        super().__init__(config, target)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Layer(config, i) for i in range(config.num_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, -1, config.norm_eps, bias=False)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def hidden_states(self, input_ids: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, cache)
        return self.norm(hidden)

    def lm_logits(self, hidden: nn.Tensor) -> nn.Tensor:
        if self.config.tie_word_embeddings:
            return tied_logits(self.embed_tokens, hidden)
        return self.lm_head(hidden)
