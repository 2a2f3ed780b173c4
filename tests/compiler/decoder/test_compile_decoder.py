"""`tvmdeploy compile` on causal LMs: HF folders (Llama with a tokenizer, GPT-2 without), a LoRA
adapter merged at compile time, the parity gate against transformers (which must be able to
fail and then writes nothing), and what is refused before any build."""

from __future__ import annotations

import json

import pytest
from tvmdeploy.compiler import CompileOptions, compile_model
from tvmdeploy.compiler.cli import app as cli
from tvmdeploy.compiler.decoder import parity
from tvmdeploy.compiler.errors import OptionError, ParityError
from tvmdeploy.runtime import load

from tests.conftest import hf_greedy, save_tiny_gguf, save_tiny_llm


def test_the_manifest_records_the_gate_and_the_generation_limits(tiny_llm_bundle):
    manifest = json.loads((tiny_llm_bundle / "manifest.json").read_text())
    model = manifest["model"]
    assert model["task"] == "text-generation"
    assert model["architecture"] == "LlamaForCausalLM"
    assert model["generation"]["context_length"] == 256
    assert model["eos_token_ids"] == [2]
    (artifact,) = manifest["artifacts"]
    record = artifact["parity"]
    assert record["ok"] is True and record["where"] == "native"
    assert record["max_abs_diff"] <= record["tolerance"]["logits_atol"]
    greedy = record["greedy"]
    assert greedy["agreed"] + greedy["ties"] == greedy["compared"]
    assert greedy["compared"] == parity.GREEDY_TOKENS * len(parity.PROMPTS)
    assert artifact["parity_onnxruntime"]["ok"] is True  # and against ONNX Runtime on the export
    assert manifest["export_parity"]["ok"] is True  # the export itself against transformers
    files = manifest["files"]
    assert "model.onnx" in files and manifest["model"]["onnx_export"]["file"] == "model.onnx"
    assert {"tokenizer/tokenizer.json", "tokenizer/chat_template.jinja"} <= set(files)


def test_gpt2_without_a_tokenizer_or_export_generates_what_transformers_does(tmp_path):
    import torch
    from transformers import GPT2LMHeadModel

    model_dir = save_tiny_llm(tmp_path / "tiny-gpt2", family="gpt2", seed=1, tokenizer=False)
    options = CompileOptions(model=str(model_dir), output=str(tmp_path / "g.tvmd"), onnx=False)
    bundle = compile_model(options)  # --no-onnx: no export, so no ONNX Runtime engine either
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "model.onnx" not in manifest["files"]
    assert manifest["model"]["onnx_export"] == {"file": None, "detail": "compiled with --no-onnx"}
    assert manifest["artifacts"][0]["parity"]["ok"] is True  # still gated against transformers
    assert manifest["artifacts"][0]["parity_onnxruntime"]["where"] == "not-run"
    with pytest.raises(Exception, match="holds no ONNX export"):
        load(bundle, artifact="onnxruntime")
    generator = load(bundle)
    ids = [5, 17, 42, 99, 7]
    reference = GPT2LMHeadModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    result = generator.generate(ids, max_new_tokens=20, ignore_eos=True)
    assert result.token_ids == hf_greedy(reference, ids, 20)
    with pytest.raises(Exception, match="no tokenizer"):
        generator.generate("text needs a tokenizer")


def test_a_lora_adapter_is_merged_and_generates_what_peft_does(tiny_llm_dir, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32)
    torch.manual_seed(3)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    adapter_dir = tmp_path / "adapter"
    get_peft_model(base, config).save_pretrained(adapter_dir)
    bundle = compile_model(
        CompileOptions(
            model=str(adapter_dir),
            output=str(tmp_path / "lora.tvmd"),
            base=str(tiny_llm_dir),
            onnx=False,  # the merged folder exports as any folder does (tiny_llm_bundle)
        )
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["source_kind"] == "peft"
    ids = [1, 40, 41, 60, 77, 12]
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32).eval()
    without = hf_greedy(fresh, ids, 16)
    adapted = PeftModel.from_pretrained(fresh, str(adapter_dir)).eval()  # wraps `fresh` in place
    expected = hf_greedy(adapted, ids, 16)
    assert expected != without  # the adapter changes the output
    assert load(bundle).generate(ids, max_new_tokens=16, ignore_eos=True).token_ids == expected


def test_a_failed_gate_writes_no_bundle(tiny_llm_dir, tmp_path, monkeypatch):
    """Against another model's reference (other weights), the gate refuses the artifact."""
    other_dir = save_tiny_llm(tmp_path / "other", seed=5)
    real = parity.reference_cases
    monkeypatch.setattr(parity, "reference_cases", lambda _dir, prompts: real(other_dir, prompts))
    out = tmp_path / "refused.tvmd"
    with pytest.raises(ParityError, match="generation parity against transformers failed"):
        compile_model(CompileOptions(model=str(tiny_llm_dir), output=str(out), onnx=False))
    assert not out.exists()
    assert not list(tmp_path.glob(".refused.tvmd*"))


def _cli(*args: str, stdin: str | None = None):
    """The command in this process (typer's runner): exit code, stdout and stderr apart."""
    from typer.testing import CliRunner

    return CliRunner().invoke(cli, list(args), input=stdin)


def test_unsupported_models_and_options_are_refused_before_any_build(tiny_llm_dir, tmp_path):
    falcon = tmp_path / "falcon"
    falcon.mkdir()
    config = json.loads((tiny_llm_dir / "config.json").read_text())
    (falcon / "config.json").write_text(
        json.dumps({**config, "architectures": ["FalconForCausalLM"]})
    )
    done = _cli("compile", str(falcon), "-o", str(tmp_path / "f.tvmd"))
    assert done.exit_code == 2
    assert "FalconForCausalLM is not a supported decoder" in done.stderr
    assert "LlamaForCausalLM" in done.stderr  # the supported list
    assert not (tmp_path / "f.tvmd").exists()

    scaled = tmp_path / "scaled"
    scaled.mkdir()
    (scaled / "config.json").write_text(
        json.dumps({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    )
    done = _cli("compile", str(scaled), "-o", str(tmp_path / "s.tvmd"))
    assert done.exit_code == 2 and "rope_scaling" in done.stderr

    with pytest.raises(OptionError, match=r"built in fp32, int8, int4 \(not bf16\)"):
        compile_model(
            CompileOptions(model=str(tiny_llm_dir), output=str(tmp_path / "q"), precisions=["bf16"])
        )
    with pytest.raises(OptionError, match="exceeds the model's own limit of 256"):
        compile_model(
            CompileOptions(model=str(tiny_llm_dir), output=str(tmp_path / "c"), context=999)
        )
    adapter = tmp_path / "orphan"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "some-org/some-model"})
    )
    done = _cli("compile", str(adapter), "-o", str(tmp_path / "o.tvmd"))
    assert done.exit_code == 2 and "give the base folder with --base" in done.stderr


def test_generate_command_streams_and_prints_json(tiny_llm_bundle):
    done = _cli("generate", str(tiny_llm_bundle), "The bundle", "--max-new-tokens", "8", "--json")
    assert done.exit_code == 0, done.stderr
    result = json.loads(done.stdout)
    expected = load(tiny_llm_bundle).generate("The bundle", max_new_tokens=8)
    assert result["token_ids"] == expected.token_ids
    assert result["text"] == expected.text
    streamed = _cli("generate", str(tiny_llm_bundle), "The bundle", "--max-new-tokens", "8")
    assert streamed.exit_code == 0
    assert streamed.stdout.rstrip("\n") == expected.text
    turns = "hello\nand more\n" + "long " * 300 + "\nagain\n"
    chat = _cli("chat", str(tiny_llm_bundle), stdin=turns)
    assert chat.exit_code == 0, chat.stderr
    # Three answers: the oldest turns make room as the history grows past the context; the
    # turn too long on its own is refused by name and the chat goes on.
    assert len(chat.stdout.splitlines()) >= 3
    assert "does not fit the context of 256 tokens" in chat.stderr


def test_a_gguf_file_compiles_and_generates_what_transformers_reads_from_it(tiny_llm_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = save_tiny_gguf(tiny_llm_dir, tmp_path / "tiny-q8_0.gguf")
    # No ONNX export: the GGUF's converted folder exports as any folder does (the real SmolLM2
    # GGUF is exported and gated against ONNX Runtime in tests/e2e/test_smollm2.py).
    bundle = compile_model(
        CompileOptions(model=str(gguf_path), output=str(tmp_path / "q.tvmd"), onnx=False)
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["source_kind"] == "gguf"
    assert manifest["model"]["name"] == "tiny-q8_0"
    assert manifest["artifacts"][0]["parity"]["ok"] is True
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf_path.name)
    generator = load(bundle)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert generator.apply_chat_template(messages) == text  # the template came from the file
    ids = tokenizer(text, add_special_tokens=False).input_ids
    result = generator.chat(messages, max_new_tokens=16, ignore_eos=True)
    assert result.token_ids == hf_greedy(reference, ids, 16)
