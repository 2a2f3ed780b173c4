"""Weight-only int4 for the decoder definitions: the layers, and the weights they read.

The scheme holds GGUF's Q4_0 and Q4_1 blocks as they are: groups of `GROUP` = 32 weights along
K (the input dimension), each with a scale d and a min m, `w = d * q + m`, q in 0..15 (Q4_1
stores d and m; Q4_0 stores d with q - 8, which is m = -8 d). Stored as three planes per weight:
- `<layer>.weight`: uint8 [N, K/2], each group's 16 bytes in GGUF's in-block order (byte j holds
  element j in its low nibble and element j + 16 in its high nibble);
- `<layer>.scale` and `<layer>.min`: fp16 [N, K/32], GGUF's own values bit for bit; the kernels
  widen them to fp32 per group.
That is 0.625 bytes per weight, Q4_1's own size. (The planes were fp32 at first, 0.75 bytes a
weight: on SmolLM2-135M 13 MB more read per decoded token, a fifth of the int4 layers' bytes.)

From fp32 weights (an HF checkpoint, or a GGUF tensor of another type) each group is quantized
as llama.cpp's Q4_1 does: m = min, d = (max - min) / 15, q = floor((w - m) / d + 0.5) in 0..15
(a constant group gets d = 0, q = 0), q from the fp32 d and m, both then stored as fp16.
Asymmetric, since a group of 32 rarely straddles zero evenly.

Every `nn.Linear` becomes `Int4Linear`. The token embedding (with tied embeddings also the LM
head) stays 8-bit by default: `quantized.Int8Embedding`, one scale per row. Measured on
SmolLM2-135M from its Q4_1 GGUF (whose int4 layers then hold exactly the reference's values), a
4-bit embedding and LM head (`Int4Embedding`, `embedding_bits=4`) alone failed the gate: greedy
agreement 87.5%, perplexity x1.087 of fp32 (gate >= 90%, <= x1.05), where with the 8-bit one
it passes (97.9%, x0.981; docs/benchmarks.md), for 7 MB more read per token. Norms and biases
stay fp32.

Decode runs W4A8 (kernels/cpu_gemv_a8.py: each activation row quantized to int8 per group of
32, the nibbles multiplied as bytes, llama.cpp's Q4_1 x Q8_1 dot) on a CPU profile with an int8
kernel. A prompt there runs W8A8 on an int8 copy of the weights (`requantized_int8`, each
layer's int4 values quantized per row), which the build lifts into the artifact's
`prefill_transform_params`, run once at load (decoder/lower.py): the int8 GEMM runs at about
twice W4A8's prefill GEMM, for one byte a weight more in memory, none more read per decoded
token (docs/benchmarks.md); a layer whose shape the int8 GEMM's panels do not divide keeps
W4A8's prefill GEMM. Without an int8 kernel decode runs the weight-only `int4_gemv`
(kernels/cpu_gemv_int4.py), which unpacks to fp32 in registers, and prefill dequantizes each
weight once to fp32 for the fp32 GEMM. A 4-bit embedding gathers packed rows
and dequantizes those rows only.
"""

from __future__ import annotations

import numpy as np
from tvm.relax.frontend import nn

from ..errors import ModelLoadError
from ..kernels import cpu_gemv, cpu_gemv_a8, cpu_gemv_int4, cpu_prefill_int8, gpu_gemv
from ..kernels.cpu_gemv_int4 import GROUP
from ..kernels.cpu_int8 import Int8Kernel
from .quantized import (
    Int8Embedding,
    gpu_product,
    one_token,
    quantize_rows,
    quantized_activations,
    w8a8,
)

#: Suffixes of a quantized weight's planes (`<layer>.weight` -> `<layer>.scale`, `.min`).
SCALE_SUFFIX = ".scale"
MIN_SUFFIX = ".min"
#: The d and m planes' type: GGUF's Q4_0/Q4_1 fp16.
PLANE_DTYPE = "float16"


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q uint8 [N, K] (0..15) -> uint8 [N, K/2] in GGUF's in-block order."""
    n, k = q.shape
    blocks = q.reshape(n, k // GROUP, 2, GROUP // 2).astype(np.uint8)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """The inverse of `pack_nibbles`: uint8 [N, K] in 0..15."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // (GROUP // 2), 1, GROUP // 2)
    return np.concatenate([blocks & 15, blocks >> 4], axis=2).reshape(n, 2 * half)


def dequantize(packed: np.ndarray, scale: np.ndarray, low: np.ndarray) -> np.ndarray:
    """The fp32 [N, K] the planes hold (in fp32 arithmetic: d * q + m, as the kernels compute)."""
    q = unpack_nibbles(packed).astype(np.float32)
    d, m = (np.repeat(p.astype(np.float32), GROUP, axis=1) for p in (scale, low))
    return q * d + m


def quantize_groups(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint8 [N, K/2], d fp16 [N, K/32], m fp16 [N, K/32]), Q4_1-style per group."""
    weight = np.asarray(weight, dtype=np.float32)
    n, k = weight.shape
    cpu_gemv_int4.check_shape(k)
    groups = weight.reshape(n, k // GROUP, GROUP)
    low, high = groups.min(axis=2), groups.max(axis=2)
    scale = ((high - low) / 15.0).astype(np.float32)
    inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    # round half up, as llama.cpp's quantize_row_q4_1_ref (ties are common in Q8_0 sources)
    q = np.floor((groups - low[..., None]) * inverse[..., None] + np.float32(0.5))
    q = np.clip(q, 0, 15).astype(np.uint8)
    with np.errstate(over="ignore"):  # beyond fp16: inf, refused by quantize_params
        return pack_nibbles(q.reshape(n, k)), scale.astype(np.float16), low.astype(np.float16)


def gemv(
    x: nn.Tensor,
    packed: nn.Tensor,
    scale: nn.Tensor,
    low: nn.Tensor,
    lanes: int,
    dot_isa: str | None = None,
):
    """x[b, 1, K] @ dequant(W[N, K]).T -> [b, 1, N]: W4A8 on `dot_isa`'s integer dot product
    (kernels/cpu_gemv_a8.py), else (None) the weight-only int4 GEMV."""
    n, k = int(packed.shape[0]), 2 * int(packed.shape[1])
    rows = nn.op.reshape(x, (-1, k))
    if dot_isa is not None:
        return nn.op.reshape(w4a8(rows, packed, scale, low, dot_isa), (*x.shape[:-1], n))
    out = nn.op.tensor_ir_op(
        cpu_gemv_int4.int4_gemv(k, n, lanes),
        "int4_gemv",
        [rows, packed, scale, low],
        nn.Tensor.placeholder((rows.shape[0], n), "float32"),
    )
    return nn.op.reshape(out, (*x.shape[:-1], n))


def w4a8(rows: nn.Tensor, packed, scale, low, dot_isa: str, prompt: bool = False) -> nn.Tensor:
    """rows[b, K] @ dequant(W[N, K]).T -> [b, N]: the rows quantized to int8 per group of 32,
    then the integer-dot GEMV, or for a `prompt` the prefill GEMM where `dot_isa` has one
    (kernels/cpu_gemv_a8.py)."""
    n, k = int(packed.shape[0]), 2 * int(packed.shape[1])
    b = rows.shape[0]
    xq, sx4, xs = quantized_activations(rows, k, dot_isa, weight_bits=4)
    if prompt and cpu_gemv_a8.prefill_gemm_supports(dot_isa, k):
        kernel, name = cpu_gemv_a8.w4a8_gemm(k, n, dot_isa), "w4a8_gemm"
    else:
        kernel, name = cpu_gemv_a8.w4a8_gemv(k, n, dot_isa), "w4a8_gemv"
    return nn.op.tensor_ir_op(
        kernel, name, [xq, sx4, xs, packed, scale, low], nn.Tensor.placeholder((b, n), "float32")
    )


def dequantized(packed: nn.Tensor, scale: nn.Tensor, low: nn.Tensor, lanes: int, n=None):
    """The fp32 [N, K] of the planes (`n` None: a symbolic row count, gathered rows)."""
    rows, k = packed.shape[0], 2 * int(packed.shape[1])
    return nn.op.tensor_ir_op(
        cpu_gemv_int4.int4_dequantize(k, n, lanes),
        "int4_dequantize",
        [packed, scale, low],
        nn.Tensor.placeholder((rows, k), "float32"),
    )


def requantized_int8(packed: nn.Tensor, scale: nn.Tensor, low: nn.Tensor, lanes: int):
    """(int8 [N, K], fp32 scale [N]): the int4 weight's values quantized per row as an int8
    artifact's weights are (cpu_gemv.int8_rows). Weight-only: the build lifts it into
    `transform_params`, so it runs once, when the bundle is loaded."""
    n = int(packed.shape[0])
    full = dequantized(packed, scale, low, lanes, n)
    return nn.op.tensor_expr_op(cpu_gemv.int8_rows, "int4_as_int8_rows", [full])


def matmul_int4(
    x,
    packed,
    scale,
    low,
    lanes: int,
    dot_isa: str | None = None,
    gpu: bool = False,
    int8_kernel: Int8Kernel | None = None,
) -> nn.Tensor:
    """x[..., K] @ dequant(W[N, K]).T: on a GPU `quantized.gpu_product`; on a CPU one token
    runs W4A8 on `dot_isa` (else the weight-only GEMV); a prompt runs the int8 GEMM of
    `int8_kernel` (W8A8, as an int8 artifact's prompt) on the weight re-quantized to int8 once
    at load (`requantized_int8`), else W4A8's prefill GEMM, else dequantize-then-fp32-GEMM."""
    if gpu:
        n, k = int(packed.shape[0]), 2 * int(packed.shape[1])
        make_gemv = lambda rows: gpu_gemv.int4_gemv(k, n, rows)
        planes = [packed, scale, low]
        return gpu_product(x, n, k, make_gemv, gpu_gemv.int4_dequantize(k, n), planes)
    if one_token(x):
        return gemv(x, packed, scale, low, lanes, dot_isa)
    n, k = int(packed.shape[0]), 2 * int(packed.shape[1])
    if cpu_prefill_int8.supports(int8_kernel, n, k):
        weight, row_scale = requantized_int8(packed, scale, low, lanes)
        return w8a8(x, weight, row_scale, int8_kernel)
    if dot_isa is not None:
        out = w4a8(nn.op.reshape(x, (-1, k)), packed, scale, low, dot_isa, prompt=True)
        return nn.op.reshape(out, (*x.shape[:-1], n))
    return nn.op.matmul(x, nn.op.permute_dims(dequantized(packed, scale, low, lanes, n)))


class Int4Linear(nn.Module):
    """`nn.Linear` with int4 weights [out, in] in groups of 32 (packed, scale, min planes)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        lanes: int,
        dot_isa: str | None = None,
        gpu: bool = False,
        int8_kernel: Int8Kernel | None = None,
    ):
        cpu_gemv_int4.check_shape(in_features, f"a linear layer ({out_features} x {in_features})")
        self.lanes = lanes
        self.dot_isa = dot_isa
        self.gpu = gpu
        self.int8_kernel = int8_kernel
        groups = in_features // GROUP
        self.weight = nn.Parameter((out_features, in_features // 2), "uint8")
        self.scale = nn.Parameter((out_features, groups), PLANE_DTYPE)
        self.min = nn.Parameter((out_features, groups), PLANE_DTYPE)
        self.bias = nn.Parameter((out_features,), "float32") if bias else None

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        planes = (self.weight, self.scale, self.min)
        out = matmul_int4(x, *planes, self.lanes, self.dot_isa, self.gpu, self.int8_kernel)
        return out + self.bias if self.bias is not None else out


class Int4Embedding(nn.Module):
    """`nn.Embedding` with int4 rows in groups of 32; `lm_head` is the tied head."""

    def __init__(self, num: int, dim: int, lanes: int, dot_isa: str | None = None, gpu=False):
        cpu_gemv_int4.check_shape(dim, f"the token embedding ({num} x {dim})")
        self.lanes = lanes
        self.dot_isa = dot_isa
        self.gpu = gpu
        self.weight = nn.Parameter((num, dim // 2), "uint8")
        self.scale = nn.Parameter((num, dim // GROUP), PLANE_DTYPE)
        self.min = nn.Parameter((num, dim // GROUP), PLANE_DTYPE)

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        flat = nn.op.reshape(ids, (-1,))
        rows = [nn.op.take(p, flat, axis=0) for p in (self.weight, self.scale, self.min)]
        dim = 2 * int(self.weight.shape[1])
        if self.gpu:
            full = nn.op.tensor_ir_op(
                gpu_gemv.int4_dequantize(dim, None),
                "gpu_dequantize",
                rows,
                nn.Tensor.placeholder((rows[0].shape[0], dim), "float32"),
            )
        else:
            full = dequantized(*rows, self.lanes)
        return nn.op.reshape(full, (*ids.shape, dim))

    def lm_head(self, hidden: nn.Tensor) -> nn.Tensor:
        planes = (self.weight, self.scale, self.min)
        return matmul_int4(hidden, *planes, self.lanes, self.dot_isa, self.gpu)


#: Bits of the token embedding (and a tied LM head) in an int4 artifact: 8 (the default, see
#: the module docstring) or 4.
EMBEDDING_BITS = 8


class _Quantizer(nn.Mutator):
    def __init__(
        self,
        lanes: int,
        token_embeddings: tuple[str, ...],
        embedding_bits: int,
        dot_isa: str | None,
        int8_kernel,
        gpu: bool,
    ):
        self.lanes = lanes
        self.dot_isa = dot_isa
        self.int8_kernel = int8_kernel
        self.gpu = gpu
        self.token_embeddings = token_embeddings
        self.embedding_bits = embedding_bits

    def visit_module(self, name: str, node: nn.Module):
        if isinstance(node, nn.Linear):
            bias = node.bias is not None
            return Int4Linear(
                node.in_features,
                node.out_features,
                bias,
                self.lanes,
                self.dot_isa,
                self.gpu,
                self.int8_kernel,
            )
        if isinstance(node, nn.Embedding) and name in self.token_embeddings:
            if self.embedding_bits == 8:
                return Int8Embedding(node.num, node.dim, self.lanes, self.int8_kernel, self.gpu)
            return Int4Embedding(node.num, node.dim, self.lanes, self.dot_isa, self.gpu)
        return self.visit(name, node)


def quantize_module(
    model: nn.Module,
    lanes: int,
    token_embeddings: tuple[str, ...],
    embedding_bits: int = EMBEDDING_BITS,
    int8_kernel=None,
    gpu: bool = False,
) -> nn.Module:
    """`model` with every `nn.Linear` made int4, and the embeddings named `token_embeddings`
    made `embedding_bits` (8 or 4) bits; `int8_kernel` (cpu_int8.kernel_for the profile) picks
    the W4A8 decode GEMV's instruction set (cpu_gemv_a8.dot_isa; None: the weight-only int4
    GEMV); `gpu`: a GPU profile's products (kernels/gpu_gemv.py)."""
    dot_isa = cpu_gemv_a8.dot_isa(int8_kernel)
    quantizer = _Quantizer(lanes, token_embeddings, embedding_bits, dot_isa, int8_kernel, gpu)
    return quantizer.visit("", model)


def quantize_params(
    named: list[tuple[str, nn.Parameter]],
    params: dict[str, np.ndarray],
    kept: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """The checkpoint as the int4 definition `named` takes it: each int4 weight as its three
    planes, from `kept` (planes taken from a GGUF file's Q4 blocks, decoder/gguf_int4.py) where
    it holds the weight, else quantized from the fp32 `params`; an int8 embedding per row
    (quantized.quantize_rows); the rest unchanged."""
    kept = kept or {}
    int4 = {name for name, p in named if str(p.dtype) == "uint8"}
    int8 = {name for name, p in named if str(p.dtype) == "int8"}
    out: dict[str, np.ndarray] = {}
    for name, array in params.items():
        if name in int8:
            out[name], out[name.removesuffix(".weight") + SCALE_SUFFIX] = quantize_rows(array)
        elif name in int4:
            packed, scale, low = kept[name] if name in kept else quantize_groups(array)
            if not (np.isfinite(scale).all() and np.isfinite(low).all()):
                raise ModelLoadError(
                    f"{name}: its int4 group scales or mins exceed fp16's range (+-65504), in "
                    "which int4 stores them (as GGUF's Q4 blocks do); compile it in int8 or fp32"
                )
            base = name.removesuffix(".weight")
            out[name], out[base + SCALE_SUFFIX], out[base + MIN_SUFFIX] = packed, scale, low
        else:
            out[name] = array
    return out
