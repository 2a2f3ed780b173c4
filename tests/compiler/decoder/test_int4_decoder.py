"""`--precision int4` on a causal LM: the artifact stores 4-bit groups (packed nibbles, a scale
and a min per 32 weights), computes what transformers computes with the same rounded weights,
and, compiled from a GGUF file with Q4_0/Q4_1 tensors, reads the file's blocks as they are:
the repacked planes dequantize to exactly what `gguf.quants.dequantize` gives (after the q/k row
permutation transformers undoes), and generation follows transformers reading the same file.

The tiny random model's logits are nearly flat, so 4-bit rounding flips many of its greedy
choices against fp32 and its gate fails (SmolLM2's numbers: docs/benchmarks.md); bundles are
built with `strict_parity=False`, which keeps a failed artifact for explicit use only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tvmdeploy import targets
from tvmdeploy.compiler import CompileOptions, compile_model
from tvmdeploy.compiler.decoder import gguf_int4, quantized_int4, sources
from tvmdeploy.compiler.decoder.config import read_decoder_config
from tvmdeploy.compiler.decoder.weights import decoder_params
from tvmdeploy.compiler.kernels.cpu_int8 import kernel_for
from tvmdeploy.runtime import load

from tests.conftest import (
    assert_greedy_agrees,
    quantize_decode_activations,
    quantized_per_row,
    save_tiny_gguf,
)

#: A prompt's logits against transformers running the same rounded weights and activation
#: quantization, as a share of the logit range: a prompt quantizes thousands of activations, and
#: one within float noise of a rounding boundary moves by an int8 step (conftest.NEAR_TIE); a
#: wrong kernel moves them by the whole range. Exactness is the kernels' tests' business.
PROMPT_RANGE_ATOL = 0.05


def q4_1_rounded(weight: np.ndarray) -> np.ndarray:
    """`weight` through llama.cpp's Q4_1 rounding (quantize_row_q4_1_ref: per 32 along K,
    d = (max - min) / 15, q = min(15, int((w - min) / d + 0.5)), d and min then stored as fp16)
    and back, in fp32."""
    n, k = weight.shape
    groups = weight.astype(np.float32).reshape(n, k // 32, 32)
    low = groups.min(axis=2, keepdims=True)
    d = (groups.max(axis=2, keepdims=True) - low) / np.float32(15)
    inverse = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.minimum(15, np.floor((groups - low) * inverse + np.float32(0.5)))
    d16, low16 = (a.astype(np.float16).astype(np.float32) for a in (d, low))
    return (q.astype(np.float32) * d16 + low16).reshape(n, k)


def int8_rows_rounded(weight: np.ndarray) -> np.ndarray:
    """`weight` through symmetric per-row int8 (scale max|w| / 127) and back: the int4
    artifact's token embedding and tied LM head."""
    scale = np.abs(weight).max(axis=1, keepdims=True) / np.float32(127)
    return (np.clip(np.rint(weight / scale), -127, 127) * scale).astype(np.float32)


def _logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


@pytest.fixture(scope="module")
def int4_bundle(tiny_llm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int4") / "tiny-llama.tvmd"
    options = CompileOptions(
        model=str(tiny_llm_dir),
        output=str(out),
        precisions=["fp32", "int4"],
        strict_parity=False,
        onnx=False,  # no test here reads the export (test_families gates every family on it)
    )
    return compile_model(options)


@pytest.fixture(scope="module")
def rounded(tiny_llm_dir):
    """The int4 artifact's arithmetic in transformers (`int4_reference`), for this CPU."""
    return int4_reference(tiny_llm_dir, "x86-64-v3")


def int4_reference(tiny_llm_dir, profile: str):
    """transformers with every 2-D weight Q4_1-rounded and the tied embedding (and LM head) int8
    per row; at decode steps (and for the LM head) the input of every linear layer quantized in
    groups of 32 as the W4A8 GEMV and the W8A8 LM head quantize it; a prompt's layers through
    W8A8 as `profile`'s int4 artifact runs them (`w8a8_prompts`)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32).eval()
    original_embedding = model.get_input_embeddings().weight.detach().numpy().copy()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(q4_1_rounded(p.numpy())))
        embedding = model.get_input_embeddings().weight
        embedding.copy_(torch.from_numpy(int8_rows_rounded(original_embedding)))
    return quantize_decode_activations(w8a8_prompts(model, profile))


def w8a8_prompts(model, profile: str = "x86-64-v3"):
    """`model` whose layers (the LM head apart) run a prompt as an int4 artifact of `profile`
    does: W8A8 on their int4 values re-quantized to int8 per row (once, at load), the input
    quantized per row to the levels of the profile's int8 prefill kernel."""
    import torch

    lm_head = model.get_output_embeddings()
    prompt_input = quantized_per_row(kernel_for(targets.get(profile)).a_levels)
    prompt_weight = {
        module: torch.from_numpy(int8_rows_rounded(module.weight.detach().numpy()))
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module is not lm_head
    }

    def prompt_product(module, args, output):
        (x,) = args
        if x.shape[-2] <= 1:
            return None
        return torch.nn.functional.linear(prompt_input(x), prompt_weight[module], module.bias)

    for module in prompt_weight:
        module.register_forward_hook(prompt_product)
    return model


def test_the_int4_weights_are_stored_as_packed_groups(int4_bundle):
    import tvm

    manifest = json.loads((int4_bundle / "manifest.json").read_text())
    entries = manifest["weights"]
    sizes = {k: (int4_bundle / v["file"]).stat().st_size for k, v in entries.items()}
    assert sizes["int4"] < 0.22 * sizes["float32"]  # 0.75 bytes a weight against 4
    params = tvm.runtime.load_param_dict_from_file(str(int4_bundle / entries["int4"]["file"]))
    qkv = params["layers.0.self_attn.qkv_proj.weight"]
    assert str(qkv.dtype) == "uint8" and tuple(qkv.shape) == (128, 32)  # [N, K/2]
    for plane in ("scale", "min"):  # [N, K/32], fp16 as in GGUF's Q4 blocks
        array = params[f"layers.0.self_attn.qkv_proj.{plane}"]
        assert tuple(array.shape) == (128, 2) and str(array.dtype) == "float16"
    assert str(params["embed_tokens.weight"].dtype) == "int8"  # EMBEDDING_BITS
    record = manifest["model"]["quantization"]["int4"]
    assert record["embed_tokens.weight"] == "int8 per row, quantized from fp32"
    assert record["layers.0.mlp.down_proj.weight"].startswith("quantized from fp32")
    by_name = {a["name"]: a for a in manifest["artifacts"]}
    assert by_name["x86-64-v3-int4"]["precision"] == "int4"
    accuracy = by_name["x86-64-v3-int4"]["accuracy"]
    assert 0 <= accuracy["value"] <= 100 and accuracy["perplexity"]["snippets"] > 0
    # Decode reads the planes as stored; a prompt reads an int8 copy made at load, in the int8
    # GEMM's panels (the artifact's prefill_transform_params).
    engine = load(int4_bundle, precision="int4")._stepper.engine
    assert "uint8" in {str(p.dtype) for p in engine.params}
    assert "uint8" not in {str(p.dtype) for p in engine.prefill_params}
    assert any(str(p.dtype) == "int8" and len(p.shape) == 4 for p in engine.prefill_params)
    chosen = load(int4_bundle).choice.artifact  # auto: int4 only within its gate
    assert chosen == ("x86-64-v3-int4" if accuracy["ok"] else "x86-64-v3")


def test_int4_computes_what_transformers_does_with_the_rounded_weights(int4_bundle, rounded):
    generator = load(int4_bundle, precision="int4")
    rng = np.random.default_rng(5)
    for n in (3, 17):
        ids = rng.integers(3, 300, size=n).tolist()
        got = generator.prefill_logits(ids)  # prefill: W8A8 on the int8 copy
        want = _logits(rounded, ids)
        assert np.abs(got - want).max() <= PROMPT_RANGE_ATOL * float(want.max() - want.min())
        result = generator.generate(ids, max_new_tokens=16, ignore_eos=True)  # the W4A8 GEMV
        assert_greedy_agrees(list(result.token_ids), rounded, ids, 16)


def test_group_scales_beyond_fp16_are_refused_by_weight_name():
    """The planes are fp16 (as GGUF's): a weight whose group scale or min cannot be held is
    refused, naming it, instead of storing inf."""
    from tvm.relax.frontend import nn
    from tvmdeploy.compiler.errors import ModelLoadError

    name = "layers.0.mlp.down_proj.weight"
    weight = np.linspace(-1e6, 1e6, 4 * 64, dtype=np.float32).reshape(4, 64)
    with pytest.raises(ModelLoadError, match=r"down_proj\.weight: .*fp16"):
        quantized_int4.quantize_params([(name, nn.Parameter((4, 32), "uint8"))], {name: weight})
    ordinary = weight / np.float32(1e5)  # the same shape of values, within range: stored
    planes = quantized_int4.quantize_params(
        [(name, nn.Parameter((4, 32), "uint8"))], {name: ordinary}
    )
    assert planes["layers.0.mlp.down_proj.scale"].dtype == np.float16


def _q4_types(name: str):
    """Q4_1 for the embedding and attention, Q4_0 for the MLP: both kept block types."""
    import gguf

    kind = gguf.GGMLQuantizationType
    return kind.Q4_0 if ".ffn_" in name else kind.Q4_1


@pytest.fixture(scope="module")
def q4_gguf(tiny_llm_dir, tmp_path_factory):
    return save_tiny_gguf(tiny_llm_dir, tmp_path_factory.mktemp("gguf") / "tiny-q4.gguf", _q4_types)


def _planes_and_reference(path, tmp_path):
    folder = sources.convert_gguf(path, tmp_path / "hf")
    config = read_decoder_config(folder)
    kept, record, _ = gguf_int4.kept_planes(path, config, decoder_params(folder, config))
    return config, kept, record


def _gguf_dequantized(path) -> dict[str, np.ndarray]:
    """Each GGUF tensor through `gguf.quants.dequantize`, q/k rows un-permuted by transformers'
    own GGUF loader code."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = gguf.GGUFReader(str(path))
    heads = int(reader.fields["llama.attention.head_count"].parts[-1][0])
    kv_heads = int(reader.fields["llama.attention.head_count_kv"].parts[-1][0])
    processor = LlamaTensorProcessor(
        {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    )
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = processor.process(values, t.name).weights
    return out


def test_the_gguf_q4_blocks_are_repacked_bit_for_bit(q4_gguf, tmp_path):
    config, kept, record = _planes_and_reference(q4_gguf, tmp_path)
    want = _gguf_dequantized(q4_gguf)
    assert record["embed_tokens.weight"] == "GGUF Q4_1 blocks as they are"
    assert record["layers.1.mlp.gate_up_proj.weight"] == " + ".join(
        ["GGUF Q4_0 blocks as they are"] * 2
    )
    np.testing.assert_array_equal(
        quantized_int4.dequantize(*kept["embed_tokens.weight"]), want["token_embd.weight"]
    )
    for layer in range(config.num_layers):
        qkv = quantized_int4.dequantize(*kept[f"layers.{layer}.self_attn.qkv_proj.weight"])
        parts = [want[f"blk.{layer}.attn_{p}.weight"] for p in "qkv"]
        np.testing.assert_array_equal(qkv, np.concatenate(parts))
        gate_up = quantized_int4.dequantize(*kept[f"layers.{layer}.mlp.gate_up_proj.weight"])
        parts = [want[f"blk.{layer}.ffn_{p}.weight"] for p in ("gate", "up")]
        np.testing.assert_array_equal(gate_up, np.concatenate(parts))
        down = quantized_int4.dequantize(*kept[f"layers.{layer}.mlp.down_proj.weight"])
        np.testing.assert_array_equal(down, want[f"blk.{layer}.ffn_down.weight"])


def test_a_part_of_another_type_is_requantized_and_said_so(tiny_llm_dir, tmp_path):
    import gguf

    def types(name):
        return gguf.GGMLQuantizationType.Q8_0 if ".attn_v." in name else _q4_types(name)

    path = save_tiny_gguf(tiny_llm_dir, tmp_path / "mixed.gguf", types)
    config, kept, record = _planes_and_reference(path, tmp_path)
    assert record["layers.0.self_attn.qkv_proj.weight"] == (
        "GGUF Q4_1 blocks as they are + GGUF Q4_1 blocks as they are + Q8_0 requantized to int4"
    )
    want = _gguf_dequantized(path)
    qkv = quantized_int4.dequantize(*kept["layers.0.self_attn.qkv_proj.weight"])
    q_rows = config.num_heads * config.head_dim
    np.testing.assert_array_equal(qkv[:q_rows], want["blk.0.attn_q.weight"])
    v = want["blk.0.attn_v.weight"]
    np.testing.assert_allclose(qkv[-v.shape[0] :], q4_1_rounded(v), atol=1e-6)


def test_int4_from_gguf_generates_what_transformers_reads_from_the_file(q4_gguf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    options = CompileOptions(
        model=str(q4_gguf),
        output=str(tmp_path / "q4.tvmd"),
        precisions=["int4"],
        strict_parity=False,
        onnx=False,
    )
    bundle = compile_model(options)
    manifest = json.loads((bundle / "manifest.json").read_text())
    record = manifest["model"]["quantization"]["int4"]
    assert record.pop("embed_tokens.weight") == "int8 per row, quantized from fp32 (GGUF Q4_1)"
    parts = {part for origin in record.values() for part in origin.split(" + ")}
    assert parts == {"GGUF Q4_1 blocks as they are", "GGUF Q4_0 blocks as they are"}
    reference = AutoModelForCausalLM.from_pretrained(
        str(q4_gguf.parent), gguf_file=q4_gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():  # the artifact's 8-bit embedding and tied LM head
        embedding = reference.get_input_embeddings().weight
        embedding.copy_(torch.from_numpy(int8_rows_rounded(embedding.numpy())))
    quantize_decode_activations(w8a8_prompts(reference))  # as the artifact quantizes
    generator = load(bundle, precision="int4")
    rng = np.random.default_rng(9)
    for n in (4, 13):
        ids = rng.integers(3, 300, size=n).tolist()
        want = _logits(reference, ids)
        got = generator.prefill_logits(ids)
        assert np.abs(got - want).max() <= PROMPT_RANGE_ATOL * float(want.max() - want.min())
        result = generator.generate(ids, max_new_tokens=16, ignore_eos=True)
        assert_greedy_agrees(list(result.token_ids), reference, ids, 16)


@pytest.mark.qemu
def test_the_neon_int4_artifact_runs_under_qemu(tiny_llm_dir, tmp_path):
    """The arm64-neon int4 artifact (W4A8 and the W8A8 LM head on NEON smull/saddlp, its prompt
    on the NEON int8 GEMM) run in the aarch64 Python under qemu-user computes what transformers
    does with the rounded weights (the quantized gate itself runs natively only)."""
    rounded = int4_reference(tiny_llm_dir, "arm64-neon")
    import os

    from tvmdeploy.compiler.emulation import qemu, qemu_decoder
    from tvmdeploy.runtime import Bundle

    from tests.compiler.decoder.test_qemu_decoder import USER_SYSROOT

    os.environ["TVMDEPLOY_ARM64_SYSROOT"] = str(USER_SYSROOT)
    arm = qemu.ensure_arm64_python()
    out = compile_model(
        CompileOptions(
            model=str(tiny_llm_dir),
            output=str(tmp_path / "arm.tvmd"),
            profiles=["arm64-neon"],
            precisions=["int4"],
            verify=False,
            onnx=False,
        )
    )
    bundle = Bundle(out)
    (artifact,) = bundle.artifacts
    entry = bundle.weights_entry(artifact.weights)
    prompts = [[5, 17, 42], [9, 100, 3, 250, 7, 61, 12]]
    run = qemu_decoder.run_decoder(
        bundle.file(artifact.file),
        bundle.file(entry["file"]),
        entry["names"],
        prompts,
        12,
        "cortex-a72",
        context_length=int(bundle.model["generation"]["context_length"]),
        prefill_chunk=int(bundle.model["generation"]["prefill_chunk"]),
        arm=arm,
        timeout=900,
    )
    assert run.ok, run.detail
    for ids, got in zip(prompts, run.prompts, strict=True):
        want = _logits(rounded, ids)
        assert np.abs(got.prefill_logits - want).max() <= PROMPT_RANGE_ATOL * float(
            want.max() - want.min()
        )
        assert_greedy_agrees(got.tokens, rounded, ids, 12)
