"""A GGUF file's Q4_0 / Q4_1 blocks → the int4 definition's weight planes, never through fp32.

A Q4_1 block (llama.cpp's `block_q4_1`) is fp16 d, fp16 m, then 16 bytes of nibbles; a Q4_0
block is fp16 d then the 16 bytes, with `w = d * (q - 8)`, which is m = -8 d. The nibbles are
already in the order the int4 kernels read (decoder/quantized_int4.py), so repacking is a split
into planes: the bytes copied, d and m kept fp16, bit for bit (Q4_0's m = -8 d is exact in
fp16). The planes dequantize to exactly what `gguf.quants.dequantize` gives (d * q + m is exact
in fp32 for fp16 d and m).

Two layout steps follow transformers' GGUF loader, so the planes line up with the fp32 weights
the rest of the compile reads from the same file (decoder/sources.py):
- llama.cpp's converter permutes the rows of q_proj and k_proj for its RoPE layout (GGUF
  architecture "llama"); transformers undoes it (`LlamaTensorProcessor._reverse_permute_weights`)
  and so do we, on the packed rows and their d and m alike (a row permutation);
- q/k/v and gate/up are concatenated along the rows, as weights.py does for the fp32 weights.
A part of another type (Q8_0, Q6_K, F16, ...) is quantized to int4 from its fp32 values (the
rows of the fused fp32 weight it fills), and the per-tensor record says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import DecoderConfig
from .quantized_int4 import GROUP, quantize_groups

#: GGUF block types kept as they are, and the bytes of one block of 32 weights.
KEPT_TYPES = {"Q4_0": 18, "Q4_1": 20}
#: GGUF architectures whose q/k rows llama.cpp's converter permutes (transformers' list).
PERMUTED_ARCHITECTURES = ("llama",)
#: GGUF architectures whose tensor names map to the Llama-style definition below.
LLAMA_STYLE = ("llama", "qwen2", "mistral")

_PARTS = {  # GGUF tensor in a block → (the definition's weight, which part of its rows)
    "attn_q": ("self_attn.qkv_proj", 0),
    "attn_k": ("self_attn.qkv_proj", 1),
    "attn_v": ("self_attn.qkv_proj", 2),
    "attn_output": ("self_attn.o_proj", 0),
    "ffn_gate": ("mlp.gate_up_proj", 0),
    "ffn_up": ("mlp.gate_up_proj", 1),
    "ffn_down": ("mlp.down_proj", 0),
}


def _architecture(reader) -> str:
    field = reader.fields.get("general.architecture")
    return bytes(field.parts[field.data[0]]).decode() if field else ""


def reverse_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation on an array whose first axis is the weight's rows."""
    dim = rows.shape[0] // heads // 2
    return rows.reshape(heads, dim, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


def block_planes(data: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint8 [N, K/2], d fp16 [N, K/32], m fp16 [N, K/32]) of a Q4_0/Q4_1 tensor's raw
    blocks (`GGUFReader` tensor data: uint8 [N, K/32 * block bytes])."""
    size = KEPT_TYPES[kind]
    n = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(n, -1, size)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0]
    if kind == "Q4_1":
        m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0]
    else:
        m = (np.float16(-8) * d).astype(np.float16)  # exact (a power of two), or inf: refused
    packed = np.ascontiguousarray(blocks[:, :, size - GROUP // 2 :]).reshape(n, -1)
    return packed, d, m


def _slot(name: str, config: DecoderConfig) -> tuple[str, int] | None:
    """The definition's weight and part a GGUF tensor fills (None: not an int4 weight here)."""
    if name == "token_embd.weight":
        return "embed_tokens.weight", 0
    if name == "output.weight":
        return None if config.tie_word_embeddings else ("lm_head.weight", 0)
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _PARTS:
        weight, part = _PARTS[parts[2]]
        return f"layers.{parts[1]}.{weight}.weight", part
    return None


def kept_planes(
    path: Path, config: DecoderConfig, checkpoint: dict[str, np.ndarray]
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], dict[str, str], dict[str, str]]:
    """({weight: its int4 planes} for every weight with a Q4_0/Q4_1 part in the file,
    {weight: where its int4 values came from}, {weight: its GGUF type(s), "+"-joined}) for the
    definition's weights the file holds.
    `checkpoint` is the fp32 parameters read from the same file (parts of other types are
    quantized from their rows)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _architecture(reader)
    if arch not in LLAMA_STYLE or config.family == "gpt2":
        why = f"quantized from fp32 (GGUF architecture {arch!r}: blocks not mapped)"
        return {}, {"*": why}, {}
    heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
    found: dict[str, dict[int, tuple[str, object]]] = {}
    for tensor in reader.tensors:
        slot = _slot(tensor.name, config)
        if slot is None:
            continue
        kind = tensor.tensor_type.name
        value = None
        if kind in KEPT_TYPES:
            value = block_planes(np.asarray(tensor.data), kind)
            role = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
            if arch in PERMUTED_ARCHITECTURES and role in heads:
                value = tuple(reverse_permute(a, heads[role]) for a in value)
        found.setdefault(slot[0], {})[slot[1]] = (kind, value)
    planes, record, types = {}, {}, {}
    for weight, parts in found.items():
        kinds = [parts[i][0] for i in sorted(parts)]
        types[weight] = "+".join(kinds)
        if not any(parts[i][1] is not None for i in parts):
            record[weight] = f"requantized to int4 from {'+'.join(kinds)} (through fp32)"
            continue
        full = checkpoint[weight]
        sizes = _part_rows(weight, config, full.shape[0], len(parts))
        pieces, start = [], 0
        for i, rows in enumerate(sizes):
            kind, value = parts[i]
            pieces.append(
                value if value is not None else quantize_groups(full[start : start + rows])
            )
            start += rows
        planes[weight] = tuple(np.concatenate(p, axis=0) for p in zip(*pieces, strict=True))
        record[weight] = " + ".join(
            f"GGUF {k} blocks as they are" if k in KEPT_TYPES else f"{k} requantized to int4"
            for k in kinds
        )
    return planes, record, types


def _part_rows(weight: str, config: DecoderConfig, total: int, count: int) -> list[int]:
    """The row counts of a fused weight's parts (q, k, v or gate, up), in order."""
    if ".qkv_proj." in weight:
        return [config.num_heads * config.head_dim] + [config.num_kv_heads * config.head_dim] * 2
    return [total // count] * count


def int4_params(
    named, checkpoint: dict[str, np.ndarray], config: DecoderConfig, gguf_path: Path | None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The int4 definition's parameters (quantized_int4.quantize_params), with a GGUF source's
    Q4 blocks kept, and the record of where each int4 weight's values came from (the manifest's
    `model.quantization.int4`)."""
    from .quantized_int4 import quantize_params

    kept, found, types = {}, {}, {}
    if gguf_path is not None:
        kept, found, types = kept_planes(gguf_path, config, checkpoint)
    record = {}
    for name, param in named:
        if str(param.dtype) == "int8":  # the 8-bit embedding (quantized_int4.EMBEDDING_BITS)
            source = f" (GGUF {types[name]})" if name in types else ""
            record[name] = f"int8 per row, quantized from fp32{source}"
            kept.pop(name, None)
        elif str(param.dtype) == "uint8":
            fallback = "quantized from fp32 (Q4_1-style min/max, groups of 32)"
            record[name] = found.get(name, found.get("*", fallback))
    return quantize_params(named, checkpoint, kept), record
