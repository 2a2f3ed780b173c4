"""What a causal LM's `config.json` says, in the one shape every decoder definition reads.

Each supported family (Llama, Mistral, Qwen2, Phi-3, GPT-2) maps its own key names onto
`DecoderConfig`. A sliding window caps the context at the window (full attention over at most
that many tokens is what the window computes). Anything the compiled kernels do not implement
(rope scaling, partial rotary, attention/MLP biases beyond Qwen2's) is refused here, naming the
key and what is supported, so that no model compiles into silently wrong output.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

#: architecture class in config.json -> family (one definition per family, compiler/decoder/).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Phi3ForCausalLM": "llama",
    "GPT2LMHeadModel": "gpt2",
}
#: The activations the MLP definitions implement, by config name.
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
}


class UnsupportedModelError(ModelLoadError):
    """The causal LM uses an architecture or a config feature the decoder definitions lack."""


@dataclass(frozen=True)
class DecoderConfig:
    """The shape of a decoder, as the definitions need it (family-neutral names)."""

    architecture: str
    family: str  # "llama" (RMSNorm, RoPE, gated MLP) or "gpt2" (LayerNorm, learned positions)
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    context_length: int  # max_position_embeddings (or n_positions)
    norm_eps: float
    activation: str
    rope_theta: float = 10000.0
    qkv_bias: bool = False  # Qwen2
    tie_word_embeddings: bool = False
    fused_qkv: bool = False  # Phi-3 stores qkv_proj / gate_up_proj fused
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        found = asdict(self)
        found["eos_token_ids"] = list(self.eos_token_ids)
        return found


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def _refuse(where: str, key: str, value: Any, supported: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{where}: {key}={value!r} is not supported by the decoder kernels ({supported}); "
        "no bundle can be compiled for it without wrong output"
    )


def read_decoder_config(model_dir: str | Path) -> DecoderConfig:
    """The `DecoderConfig` of an HF causal-LM folder; UnsupportedModelError names what is not."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: unreadable ({err})") from None
    return parse_decoder_config(raw, str(path))


def is_causal_lm(model_dir: str | Path) -> bool:
    """Whether the folder's config names a causal-LM architecture (supported or not)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return False
    try:
        names = json.loads(path.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return False
    return any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)


def parse_decoder_config(raw: dict[str, Any], where: str = "config.json") -> DecoderConfig:
    names = raw.get("architectures") or []
    known = [n for n in names if n in ARCHITECTURES]
    if not known:
        raise UnsupportedModelError(
            f"{where}: architecture {', '.join(names) or '(none named)'} is not a supported "
            f"decoder; supported: {', '.join(ARCHITECTURES)}"
        )
    architecture = known[0]
    family = ARCHITECTURES[architecture]
    if family == "gpt2":
        return _gpt2(raw, where, architecture)
    return _llama_like(raw, where, architecture)


def _llama_like(raw: dict[str, Any], where: str, architecture: str) -> DecoderConfig:
    if raw.get("rope_scaling"):
        raise _refuse(where, "rope_scaling", raw["rope_scaling"], "plain RoPE only")
    context = int(raw["max_position_embeddings"])
    window = raw.get("sliding_window")
    uses_window = raw.get("use_sliding_window", architecture != "Qwen2ForCausalLM")
    if window and uses_window and int(window) < context:
        # Full attention over at most `window` tokens is what a sliding window computes there:
        # the context is capped to the window instead (Mistral-style configs).
        context = int(window)
    if float(raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _refuse(where, "partial_rotary_factor", raw["partial_rotary_factor"], "1.0 only")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise _refuse(where, "attention_bias/mlp_bias", True, "Qwen2's qkv bias only")
    activation = raw.get("hidden_act", "silu")
    if ACTIVATIONS.get(activation) != "silu":
        raise _refuse(where, "hidden_act", activation, "silu for gated MLPs")
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = int(raw.get("head_dim") or hidden // heads)
    if head_dim * heads != hidden:
        raise _refuse(where, "head_dim", head_dim, "head_dim * num_attention_heads == hidden_size")
    return DecoderConfig(
        architecture=architecture,
        family="llama",
        model_type=str(raw.get("model_type")),
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(raw["intermediate_size"]),
        context_length=context,
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        activation="silu",
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        qkv_bias=architecture == "Qwen2ForCausalLM",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        fused_qkv=architecture == "Phi3ForCausalLM",
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_ids(raw.get("eos_token_id")),
    )


def _gpt2(raw: dict[str, Any], where: str, architecture: str) -> DecoderConfig:
    activation = raw.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise _refuse(where, "activation_function", activation, ", ".join(ACTIVATIONS))
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if raw.get(key):
            raise _refuse(where, key, raw[key], "false")
    if raw.get("scale_attn_weights", True) is False:
        raise _refuse(where, "scale_attn_weights", False, "true")
    hidden = int(raw["n_embd"])
    heads = int(raw["n_head"])
    return DecoderConfig(
        architecture=architecture,
        family="gpt2",
        model_type="gpt2",
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw["n_layer"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(raw.get("n_inner") or 4 * hidden),
        context_length=int(raw["n_positions"]),
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        activation=ACTIVATIONS[activation],
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_ids(raw.get("eos_token_id")),
    )
