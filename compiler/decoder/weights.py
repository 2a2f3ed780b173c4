"""HF checkpoint tensors → the decoder definitions' parameters, by name, as fp32 NumPy arrays.

Reads `*.safetensors` (sharded or not) or `pytorch_model*.bin` one tensor at a time; q/k/v and
gate/up are concatenated and GPT-2's Conv1D weights transposed here, once. The result is the one
weight set the bundle stores (no per-bucket or per-artifact copies).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import ModelLoadError
from .config import DecoderConfig


def checkpoint_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, fp32 array) for every tensor of the folder's checkpoint."""
    import torch

    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, f.get_tensor(name).to(torch.float32).numpy()
        return
    files = sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(
            f"{model_dir}: no *.safetensors or pytorch_model*.bin weights; save the model with "
            "`save_pretrained`"
        )
    for path in files:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        for name, tensor in state.items():
            yield name, tensor.to(torch.float32).numpy()


def _llama_name(name: str) -> str:
    return re.sub(r"^model\.", "", name)


def _gpt2_name(name: str) -> str:
    return re.sub(r"^transformer\.", "", name)


def decoder_params(model_dir: str | Path, config: DecoderConfig) -> dict[str, np.ndarray]:
    """The parameters of the family's definition, keyed by its parameter names."""
    model_dir = Path(model_dir)
    rename = _gpt2_name if config.family == "gpt2" else _llama_name
    raw = {rename(n): a for n, a in checkpoint_tensors(model_dir)}
    params: dict[str, np.ndarray] = {}
    if config.family == "gpt2":
        for name, array in raw.items():
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # the causal-mask buffers of old checkpoints
            conv1d = re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", name)
            params[name] = np.ascontiguousarray(array.T) if conv1d else array
    else:
        for name, array in raw.items():
            if re.search(r"\.(q|k|v)_proj\.", name) or re.search(r"\.(gate|up)_proj\.", name):
                continue
            if "rotary_emb" in name:
                continue
            params[name] = array
        for layer in range(config.num_layers):
            attn = f"layers.{layer}.self_attn"
            mlp = f"layers.{layer}.mlp"
            if not config.fused_qkv:
                for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
                    parts = [raw.pop(f"{attn}.{p}_proj.{kind}") for p in "qkv"]
                    params[f"{attn}.qkv_proj.{kind}"] = np.concatenate(parts, axis=0)
                gate = raw.pop(f"{mlp}.gate_proj.weight")
                up = raw.pop(f"{mlp}.up_proj.weight")
                params[f"{mlp}.gate_up_proj.weight"] = np.concatenate([gate, up], axis=0)
    if config.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    return params


def ordered_params(
    named: list[tuple[str, object]], params: dict[str, np.ndarray], where: str
) -> list[np.ndarray]:
    """The arrays in the order the exported functions take them, each in its parameter's dtype
    (fp32; int8 and the scales for an int8 definition); a missing or misshapen one is a
    ModelLoadError naming it (a checkpoint that does not match its config)."""
    ordered = []
    for name, param in named:
        if name not in params:
            raise ModelLoadError(f"{where}: the checkpoint has no weight for {name}")
        expected = tuple(int(d) for d in param.shape)
        if params[name].shape != expected:
            raise ModelLoadError(
                f"{where}: weight {name} has shape {params[name].shape}, the config implies "
                f"{expected}"
            )
        ordered.append(np.ascontiguousarray(params[name], dtype=str(param.dtype)))
    return ordered
