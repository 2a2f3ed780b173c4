"""bench/bandwidth.py: the bytes a decode token reads, counted from real model files (a GGUF file
in Q8_0 blocks, an ONNX file with an embedding Gather, a transformers model tied and untied), and
the ceiling arithmetic built on them."""

from __future__ import annotations

import numpy as np
import pytest

from bench import bandwidth
from tests.conftest import save_tiny_gguf, save_tiny_llm, save_tiny_tokenizer, tiny_llm_config

Q8_0_BLOCK = (32, 34)  # 32 weights in 34 bytes: an fp16 scale and 32 int8 values


def stored_bytes(model_dir) -> int:
    """What the tiny model's tensors take in save_tiny_gguf's format: 2-D in Q8_0, 1-D in F32."""
    from safetensors.numpy import load_file

    total = 0
    for array in load_file(str(model_dir / "model.safetensors")).values():
        values, block = Q8_0_BLOCK
        total += array.size // values * block if array.ndim == 2 else array.size * 4
    return total


def test_gguf_bytes_are_the_blocks_of_every_tensor(tmp_path, tiny_llm_dir):
    gguf_file = save_tiny_gguf(tiny_llm_dir, tmp_path / "tiny.gguf")
    # Tied embeddings: the table is the LM head's matrix, read whole by every token.
    assert bandwidth.gguf_weight_bytes(gguf_file) == stored_bytes(tiny_llm_dir)


def test_gguf_bytes_leave_out_an_embedding_a_separate_head_does_not_share(tmp_path):
    import torch
    import transformers

    torch.manual_seed(0)
    config = tiny_llm_config("llama")
    config.tie_word_embeddings = False  # an lm_head of its own: output.weight in the file
    model_dir = tmp_path / "untied"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    save_tiny_tokenizer(model_dir)
    gguf_file = save_tiny_gguf(model_dir, tmp_path / "untied.gguf")
    table = config.vocab_size * config.hidden_size // 32 * 34
    assert bandwidth.gguf_weight_bytes(gguf_file) == stored_bytes(model_dir) - table


def test_onnx_bytes_leave_out_the_gathered_table(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    vocab, hidden = 1000, 64
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((vocab, hidden), np.float32), "table")
    head = numpy_helper.from_array(rng.standard_normal((hidden, vocab), np.float32), "head")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["x"]),
            helper.make_node("MatMul", ["x", "head"], ["logits"]),
        ],
        "lm",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, vocab])],
        [table, head],
    )
    path = tmp_path / "lm.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert bandwidth.onnx_weight_bytes(path) == hidden * vocab * 4

    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(path), str(tmp_path / "lm-int8.onnx"), weight_type=QuantType.QInt8)
    int8 = bandwidth.onnx_weight_bytes(tmp_path / "lm-int8.onnx")
    assert hidden * vocab <= int8 < hidden * vocab + 64  # int8 weights, a scale and a zero point


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_torch_bytes_count_a_tied_head_once(tmp_path, family):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_llm(tmp_path / family, family=family, tokenizer=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = model.config
    expected = sum(p.numel() * 4 for p in model.parameters())  # parameters() dedups tied ones
    if not config.tie_word_embeddings:
        expected -= config.vocab_size * config.hidden_size * 4
    assert bandwidth.torch_weight_bytes(model) == expected


def test_kv_bytes_and_the_ceiling():
    smollm2 = {  # SmolLM2-135M's config.json
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
    }
    # 30 layers x (K and V) x 3 heads x 64 dims x 4 bytes = 46,080 bytes per token of history
    assert bandwidth.kv_bytes_per_token(smollm2, 4, 96) == 46080 * 96
    assert bandwidth.kv_bytes_per_token(smollm2, 2, 1) == 23040
    assert bandwidth.ceiling_tokens_per_s(143e6, 14.3) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="positive"):
        bandwidth.ceiling_tokens_per_s(0, 10.0)


def test_copy_bandwidth_is_a_rate():
    one = bandwidth.copy_bandwidth_gbs(megabytes=16, threads=1, repeats=2)
    two = bandwidth.copy_bandwidth_gbs(megabytes=16, threads=2, repeats=2)
    assert 0.05 < one < 2000 and 0.05 < two < 2000  # GB/s, whatever the machine's load
