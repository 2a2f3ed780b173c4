"""The narrow interface every decoder definition exports, and the paged KV cache it creates.

A compiled decoder holds these functions, which the runtime (runtime/generate.py) calls by
name; docs/design.md, "Generation", writes them down:

- `create_paged_kv_cache(max_batch, max_total_len, prefill_chunk, page_size, sliding_window)`:
  the cache object, allocated on the device the VM runs on;
- `prefill(input_ids[1, n], cache, *params)`: n prompt tokens of one sequence into the cache;
  logits of the last one, `[1, 1, vocab]` (float32);
- `decode(input_ids[b, 1], cache, *params)`: one new token for each of b sequences at once;
  logits `[b, 1, vocab]`;
- `decode1(input_ids[1, 1], cache, *params)`, optional: the same for one sequence, every shape
  static, so the VM runs no shape arithmetic and plans its memory once (the runtime calls it at
  batch 1 where the artifact has it).

Which sequences a call covers is set on the cache beforehand (`vm.builtin.kv_state_begin_forward`);
the model only reads and appends. The weights are the trailing plain parameters, in the order
`export_tvm` lists them (the manifest's `weights.float32.names`).
"""

from __future__ import annotations

from typing import Any

from tvm import relax, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from .config import DecoderConfig

#: The functions every compiled decoder exports.
ENTRY_FUNCTIONS = ("create_paged_kv_cache", "prefill", "decode")
#: The optional static batch-1 decode entry.
STATIC_DECODE = "decode1"


class DecoderModule(nn.Module):
    """A family's definition provides `hidden_states(input_ids, cache)` and `lm_logits(h)`;
    this base class turns them into the entry functions."""

    config: DecoderConfig
    rope_mode = RopeMode.NORMAL

    def __init__(self, config: DecoderConfig, target):
        self.config = config
        self._target = target  # which attention kernels the cache is built with (CPU or GPU)

    def hidden_states(self, input_ids: nn.Tensor, cache: PagedKVCache) -> nn.Tensor:
        raise NotImplementedError

    def lm_logits(self, hidden: nn.Tensor) -> nn.Tensor:
        raise NotImplementedError

    def prefill(self, input_ids: nn.Tensor, paged_kv_cache: PagedKVCache):
        hidden = self.hidden_states(input_ids, paged_kv_cache)
        last = _last_of(hidden)
        return self.lm_logits(last).astype("float32"), paged_kv_cache

    def decode(self, input_ids: nn.Tensor, paged_kv_cache: PagedKVCache):
        hidden = self.hidden_states(input_ids, paged_kv_cache)
        return self.lm_logits(hidden).astype("float32"), paged_kv_cache

    def decode1(self, input_ids: nn.Tensor, paged_kv_cache: PagedKVCache):
        return self.decode(input_ids, paged_kv_cache)

    def create_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        config = self.config
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=relax.ShapeExpr([0, config.num_layers]),
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            qk_head_dim=config.head_dim,
            v_head_dim=config.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=self.rope_mode,
            rope_scale=1,
            rope_theta=config.rope_theta,
            rope_scaling={},
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=config.head_dim,
            enable_disaggregation=False,
            dtype="float32",
            target=self._target,
        )

    def get_default_spec(self, static_decode: bool = True) -> nn.spec.ModuleSpec:
        """The entry functions' signatures; `static_decode` adds `decode1`."""
        plain = {"param_mode": "plain", "effect_mode": "none"}
        spec: dict[str, Any] = {
            "prefill": {
                "input_ids": nn.spec.Tensor([1, "seq_len"], "int32"),
                "paged_kv_cache": nn.spec.Object(object_type=PagedKVCache),
                "$": plain,
            },
            "decode": {
                "input_ids": nn.spec.Tensor(["batch_size", 1], "int32"),
                "paged_kv_cache": nn.spec.Object(object_type=PagedKVCache),
                "$": plain,
            },
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        if static_decode:
            spec[STATIC_DECODE] = {
                "input_ids": nn.spec.Tensor([1, 1], "int32"),
                "paged_kv_cache": nn.spec.Object(object_type=PagedKVCache),
                "$": plain,
            }
        return nn.spec.ModuleSpec.from_raw(spec, self)


def _last_of(hidden: nn.Tensor) -> nn.Tensor:
    """hidden[:, -1:, :]: only the last prompt token's logits are needed (one LM-head row)."""
    seq = hidden.shape[1]
    sliced = relax.op.strided_slice(
        hidden._expr, axes=[1], begin=[seq - 1], end=[seq], assume_inbound=True
    )
    return nn.Tensor(_expr=relax.BlockBuilder.current().emit(sliced))
