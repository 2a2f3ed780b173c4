"""The decoder definitions (compiler/decoder/) on TVM's paged KV cache compute what transformers
computes: prefill logits within 1e-4 and 20 greedy decode steps with the same tokens (`decode`
and the static `decode1` in turn), for tiny random 2-layer models of every supported family;
unsupported configs are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from tvmdeploy.compiler.decoder import config as decoder_config
from tvmdeploy.compiler.decoder import lower, weights

COMMON = {"vocab_size": 300, "max_position_embeddings": 128, "initializer_range": 0.3}
LLAMA_SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
PROMPT = [1, 5, 7, 9, 23, 100, 42]
NEW_TOKENS = 20


def tiny_causal_lm(family: str):
    """A seeded random-weight model; a large init range so that greedy tokens vary."""
    import torch
    import transformers

    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(**COMMON, **LLAMA_SHAPE, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(cfg).eval()
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**COMMON, **LLAMA_SHAPE, tie_word_embeddings=False)
        return transformers.Qwen2ForCausalLM(cfg).eval()
    if family == "phi3":
        cfg = transformers.Phi3Config(**COMMON, **LLAMA_SHAPE, sliding_window=None, pad_token_id=0)
        return transformers.Phi3ForCausalLM(cfg).eval()
    cfg = transformers.GPT2Config(
        vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.3
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def run_compiled(model_dir):
    """Prefill the prompt, then greedy-decode NEW_TOKENS steps, through the compiled module."""
    import tvm

    config = decoder_config.read_decoder_config(model_dir)
    target = tvm.target.Target("llvm")
    mod, named = lower.export(config, target)
    params = weights.ordered_params(named, weights.decoder_params(model_dir, config), model_dir)
    executable = tvm.compile(mod, target, relax_pipeline=lower.cpu_pipeline(target))
    dev = tvm.cpu()
    vm = tvm.runtime.vm.VirtualMachine(executable, dev)
    tensors = [tvm.runtime.tensor(p, dev) for p in params]
    shape = tvm.runtime.ShapeTuple
    cache = vm["create_paged_kv_cache"](
        shape([1]), shape([128]), shape([64]), shape([16]), shape([0])
    )
    begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
    end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
    tvm.get_global_func("vm.builtin.kv_state_add_sequence")(cache, 0)

    def step(ids: list[int], function: str) -> np.ndarray:
        array = np.array([ids], np.int32)
        if function != "prefill":
            array = array.reshape(1, 1)
        begin(cache, shape([0]), shape([len(ids)]))
        out = vm[function](tvm.runtime.tensor(array, dev), cache, *tensors)
        end(cache)
        return out[0].numpy()[0, -1]

    logits = step(PROMPT, "prefill")
    tokens = [int(logits.argmax())]
    for k in range(NEW_TOKENS - 1):  # the batched and the static batch-1 entry take turns
        tokens.append(int(step([tokens[-1]], ("decode", "decode1")[k % 2]).argmax()))
    return logits, tokens


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gpt2"])
def test_definition_matches_transformers(family, tmp_path):
    import torch

    model = tiny_causal_lm(family)
    model.save_pretrained(tmp_path)
    logits, tokens = run_compiled(tmp_path)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = model(ids).logits[0, -1].numpy()
        greedy = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
    assert tokens == greedy[0, len(PROMPT) :].tolist()
    assert len(set(tokens)) > 1  # the check can tell a wrong cache from a right one


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"architectures": ["FalconForCausalLM"]}, "FalconForCausalLM"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ],
)
def test_unsupported_configs_are_refused_by_name(change, named):
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **COMMON, **LLAMA_SHAPE}
    raw.update(change)
    with pytest.raises(decoder_config.UnsupportedModelError, match=named):
        decoder_config.parse_decoder_config(raw)


def test_cpu_decoders_decode_through_the_projects_attention_kernel():
    """The parity above runs the project's paged decode attention (kernels/cpu_paged_attention.py)
    in place of TVM's scalar kernel: the exported module holds it, under TVM's name."""
    import tvm
    from tvmdeploy.compiler.kernels import cpu_paged_attention, cpu_prefill_attention, cpu_rope

    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **COMMON, **LLAMA_SHAPE}
    raw.update(rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True)
    config = decoder_config.parse_decoder_config(raw)
    mod, _ = lower.export(config, tvm.target.Target("llvm"))
    kernel = mod[cpu_paged_attention.DECODE_KERNEL]
    assert kernel.attrs["tvmdeploy.kernel"] == "cpu_paged_attention"
    # and the prompt's attention through kernels/cpu_prefill_attention.py, under TVM's name too
    prefill = mod[cpu_prefill_attention.PREFILL_KERNEL]
    assert prefill.attrs["tvmdeploy.kernel"] == "cpu_prefill_attention"
    # and the split of q, k, v with RoPE through kernels/cpu_rope.py
    assert mod[cpu_rope.ROPE_KERNEL].attrs["tvmdeploy.kernel"] == "cpu_rope"


def test_cpu_fp32_decoders_read_weights_packed_once_at_load():
    """fp32 on a CPU (decoder/dense.py): the build lifts every layer's weight packing into
    `transform_params`; decode1's layers then run the GEMV over packed panels and its tied LM
    head the row-stream GEMV over the embedding as stored; the prompt's layers run the GEMM over
    the same panels. No entry packs a weight per call."""
    import tvm

    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **COMMON, **LLAMA_SHAPE}
    raw.update(rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True)
    config = decoder_config.parse_decoder_config(raw)
    exported, named = lower.export(config, tvm.target.Target("llvm"))
    assert all(str(p.dtype) == "float32" for _, p in named)  # the checkpoint loads unchanged
    mod = lower.lift_weight_work("shared")(exported)
    transform = mod["transform_params"]
    assert len(transform.params) == len(named)  # flat: one argument per stored weight
    packed = [f for f in transform.ret_ty.fields if len(f.shape) == 3]
    assert len(packed) == 4 * config.num_layers  # qkv, o, gate_up, down of every layer

    def callees(name):
        found = set()

        def visit(expr):
            if (
                isinstance(expr, tvm.relax.Call)
                and expr.args
                and isinstance(expr.args[0], tvm.ir.GlobalVar)
            ):
                found.add(expr.args[0].name_hint)

        tvm.relax.analysis.post_order_visit(mod[name].body, visit)
        return found

    hidden, vocab = config.hidden_size, config.vocab_size
    step = callees("decode1")
    assert f"fp32_gemv_k{hidden}_n{vocab}" in step  # the tied LM head
    assert len({c for c in step if c.startswith("fp32_packed_gemv")}) >= 3
    assert any(c.startswith("matmul_packed") for c in callees("prefill"))
    for entry in ("prefill", "decode", "decode1"):  # each takes the packed panels themselves
        shapes = [p.ty.shape for p in mod[entry].params if isinstance(p.ty, tvm.relax.TensorType)]
        assert sum(1 for shape in shapes if len(shape) == 3) >= len(packed), entry
