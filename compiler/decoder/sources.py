"""What a user hands over for generation → one Hugging Face causal-LM folder the stages read.

Three forms are taken:
- an HF folder (`config.json` naming a `*ForCausalLM` / `GPT2LMHeadModel`), read as it is;
- a PEFT LoRA adapter folder (`adapter_config.json`): merged into its base model (the folder
  `--base` gives, else the one the adapter names, if it is a local folder), saved once;
- a GGUF file (llama.cpp's format): read by transformers (`gguf_file=`, weights dequantized to
  fp32, tokenizer and chat template from the file's metadata), saved once.
The merged or converted folder lives in the compile's work directory and is removed with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from .config import is_causal_lm

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class DecoderSource:
    """The folder the stages read, and what it was made from."""

    model_dir: Path
    kind: str  # "hf", "peft" or "gguf"
    origin: str  # what the user gave (with the base model for an adapter)


def is_decoder_source(model: str | Path) -> bool:
    """Whether `model` is something the decoder path takes (not the ONNX/encoder path)."""
    path = Path(model)
    if path.suffix.lower() == ".gguf":
        return True
    return path.is_dir() and ((path / ADAPTER_CONFIG).is_file() or is_causal_lm(path))


def resolve_source(model: str | Path, base: str | Path | None, work_dir: Path) -> DecoderSource:
    """The HF folder for `model`: as given, merged from an adapter, or converted from GGUF."""
    path = Path(model)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such GGUF file")
        return DecoderSource(convert_gguf(path, work_dir / "from-gguf"), "gguf", str(path))
    if (path / ADAPTER_CONFIG).is_file():
        base_dir = _adapter_base(path, base)
        merged = _merge_adapter(path, base_dir, work_dir / "merged")
        return DecoderSource(merged, "peft", f"{path} on {base_dir}")
    if base is not None:
        raise ModelLoadError(f"{path}: --base is for a LoRA adapter folder ({ADAPTER_CONFIG})")
    return DecoderSource(path, "hf", str(path))


def convert_gguf(path: Path, out_dir: Path) -> Path:
    """`path` (GGUF) as an HF folder at `out_dir`: fp32 weights, tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("  reading %s with transformers (GGUF weights dequantized to fp32)", path.name)
    try:
        with gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            )
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        raise ModelLoadError(f"{path}: transformers cannot read this GGUF file: {err}") from None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@contextlib.contextmanager
def gguf_parsed_once():
    """While converting one file: transformers parses a GGUF file's metadata three times
    (tokenizer, config, weights), each in Python (SmolLM2's 49,152-token vocabulary: ~5 s a
    parse), and builds gguf's tensor-name map once per tensor (~7 s for 272 tensors, the same
    map each time). Here one `GGUFReader` per file and one map per (arch, layers) serve every
    call; both are only read. transformers imports them from `gguf` at each call, so the
    module attributes are what is swapped, and put back after (compile converts one file at a
    time, on one thread). Any transformers read of GGUF files can use it (the end-to-end test's
    reference does)."""
    import gguf

    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}
    name_maps: dict = {}

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = real_name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map


def _adapter_base(adapter: Path, base: str | Path | None) -> Path:
    """The base model folder of a LoRA adapter: `--base`, else the local folder it names."""
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{adapter / ADAPTER_CONFIG}: unreadable ({err})") from None
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ModelLoadError(
            f"{adapter}: peft_type {kind!r} is not supported; LoRA adapters are merged at compile"
        )
    named = config.get("base_model_name_or_path")
    base_dir = Path(base) if base is not None else Path(named) if named else None
    if base_dir is None or not (base_dir / "config.json").is_file():
        raise ModelLoadError(
            f"{adapter}: its base model {named!r} is not a local model folder; give the base "
            "folder with --base (there is no model hub here)"
        )
    return base_dir


def _merge_adapter(adapter: Path, base_dir: Path, out_dir: Path) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("  merging the LoRA adapter %s into %s", adapter, base_dir)
    base_model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    try:
        merged = PeftModel.from_pretrained(base_model, str(adapter)).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(
            f"{adapter}: the adapter does not fit the base model {base_dir}: {err}"
        ) from None
    merged.save_pretrained(out_dir)
    tokenizer_dir = adapter if (adapter / "tokenizer.json").is_file() else base_dir
    if (tokenizer_dir / "tokenizer.json").is_file() or (tokenizer_dir / "vocab.json").is_file():
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out_dir)
    return out_dir
