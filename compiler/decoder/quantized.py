"""Weight-only int8 for the decoder definitions: the layers, and the weights they read.

The scheme: symmetric, one fp32 scale per output row, `w_int8[n, k] = round(W[n, k] / s[n])`
with `s[n] = max_k |W[n, k]| / 127`. Every `nn.Linear` becomes `Int8Linear` and the token
embedding `Int8Embedding` (int8 rows, one scale per row), so the bundle stores each weight once
at a quarter of its fp32 size; norms, biases and GPT-2's position table stay fp32 (0.1% of the
weights).

What each reads per call:
- a step with one token per sequence (decode, and prefill's last-token LM head) runs W8A8 on a
  profile with an int8 kernel (kernels/cpu_gemv_a8.py: the activation row quantized to int8 per
  group of 32, integer dot products), else the int8 GEMV of kernels/cpu_gemv.py (the weights
  widened to fp32 in registers);
- a prompt (prefill) runs W8A8 where the profile has an int8 GEMM kernel (cpu_int8.kernel_for:
  AVX2/AVX-512/VNNI/sdot/NEON micro-kernels, AMX tiles): its rows quantized per row, the int8
  weight re-laid out per call into the kernel's panels (kernels/cpu_prefill_int8.py), measured
  faster than widening each weight into fp32 for the fp32 GEMM (docs/benchmarks.md), which stays
  the path of a profile without a kernel;
- the embedding gathers int8 rows and scales them; with tied embeddings the LM head is the
  same int8 table through the GEMV.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.frontend import nn

from ..kernels import cpu_gemv, cpu_gemv_a8, cpu_prefill_int8, gpu_gemv
from ..kernels.cpu_int8 import Int8Kernel

#: The suffix of a quantized weight's scale parameter (`<layer>.weight` -> `<layer>.scale`).
SCALE_SUFFIX = ".scale"


def quantize_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [N, K], fp32 scale [N]): symmetric per output row; an all-zero row gets scale 1."""
    weight = np.asarray(weight, dtype=np.float32)
    peak = np.abs(weight).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def as_rows(x: nn.Tensor) -> nn.Tensor:
    """x[..., K] as [rows, K]."""
    return nn.op.reshape(x, (-1, x.shape[-1]))


def quantized_activations(rows: nn.Tensor, k: int, dot_isa: str, weight_bits: int) -> tuple:
    """(xq int8 [b, K], scales [b, K/8], group sums [b, K/32]) of rows[b, K]: the activation
    quantization the integer-dot decode GEMVs read, in the layout of `dot_isa`'s GEMV for
    weights of `weight_bits` (kernels/cpu_gemv_a8.py)."""
    b = rows.shape[0]
    return nn.op.tensor_ir_op(
        cpu_gemv_a8.quantize_activations(k, cpu_gemv_a8.layout_for(dot_isa, weight_bits)),
        "a8_quantize",
        [rows],
        [
            nn.Tensor.placeholder((b, k), "int8"),
            nn.Tensor.placeholder((b, k // 8), "float32"),
            nn.Tensor.placeholder((b, k // cpu_gemv_a8.GROUP), "float32"),
        ],
    )


def gemv(
    x: nn.Tensor, weight: nn.Tensor, scale: nn.Tensor, lanes: int, dot_isa: str | None = None
) -> nn.Tensor:
    """x[b, 1, K] @ dequant(weight[N, K]).T -> [b, 1, N]: W8A8 on `dot_isa`'s integer dot
    product (kernels/cpu_gemv_a8.py; K a multiple of 32), else the weight-only int8 GEMV."""
    n, k = (int(d) for d in weight.shape)
    rows = as_rows(x)
    if dot_isa is not None and k % cpu_gemv_a8.GROUP == 0:
        b = rows.shape[0]
        xq, sx4, _ = quantized_activations(rows, k, dot_isa, weight_bits=8)
        out = nn.op.tensor_ir_op(
            cpu_gemv_a8.w8a8_gemv(k, n, dot_isa),
            "w8a8_gemv",
            [xq, sx4, weight, scale],
            nn.Tensor.placeholder((b, n), "float32"),
        )
        return nn.op.reshape(out, (*x.shape[:-1], n))
    out = nn.op.tensor_ir_op(
        cpu_gemv.int8_gemv(k, n, lanes),
        "int8_gemv",
        [rows, weight, scale],
        nn.Tensor.placeholder((rows.shape[0], n), "float32"),
    )
    return nn.op.reshape(out, (*x.shape[:-1], n))


def dequantized(weight: nn.Tensor, scale: nn.Tensor, lanes: int) -> nn.Tensor:
    """The fp32 [N, K] the prefill GEMM reads."""
    n, k = (int(d) for d in weight.shape)
    return nn.op.tensor_ir_op(
        cpu_gemv.dequantize(k, n, lanes),
        "int8_dequantize",
        [weight, scale],
        nn.Tensor.placeholder((n, k), "float32"),
    )


def one_token(x: nn.Tensor) -> bool:
    """Whether x[b, s, K] holds one token per sequence (s is statically 1): the GEMV path."""
    seq = x.shape[-2] if len(x.shape) >= 2 else 1
    return isinstance(seq, int) and seq == 1


def w8a8(x: nn.Tensor, weight: nn.Tensor, scale: nn.Tensor, kernel: Int8Kernel) -> nn.Tensor:
    """x[..., K] @ dequant(weight[N, K]).T through the int8 GEMM (kernels/cpu_prefill_int8.py):
    rows quantized and padded to whole register tiles, the weight packed, padded rows dropped."""
    n, k = (int(d) for d in weight.shape)
    rows = as_rows(x)
    m = rows.shape[0]
    r, kp, lanes = (
        cpu_prefill_int8.row_tile(kernel),
        cpu_prefill_int8.padded_k(kernel, k),
        kernel.lanes,
    )
    blocks = (m + r - 1) // r
    q, a_scale, a_zero = nn.op.tensor_ir_op(
        cpu_prefill_int8.quantize_rows(kernel, k),
        "prefill_quantize",
        [rows],
        [
            nn.Tensor.placeholder((blocks, r, kp), kernel.a_dtype),
            nn.Tensor.placeholder((blocks, r), "float32"),
            nn.Tensor.placeholder((blocks, r), "float32"),
        ],
    )
    packed, colsum = nn.op.tensor_ir_op(
        cpu_prefill_int8.pack_weight(kernel, n, k),
        "prefill_pack",
        [weight],
        [
            nn.Tensor.placeholder((n // lanes, kp // 4, lanes, 4), "int8"),
            nn.Tensor.placeholder((n,), "int32"),
        ],
    )
    out = nn.op.tensor_ir_op(
        cpu_prefill_int8.int8_gemm(kernel, n, k),
        "prefill_int8_gemm",
        [q, packed, colsum, scale, a_scale, a_zero],
        nn.Tensor.placeholder((blocks, r, n), "float32"),
    )
    flat = nn.op.reshape(out, (blocks * r, n))
    sliced = relax.op.strided_slice(flat._expr, axes=[0], begin=[0], end=[m], assume_inbound=True)
    kept = nn.Tensor(_expr=relax.BlockBuilder.current().emit(sliced))
    return nn.op.reshape(kept, (*x.shape[:-1], n))


def gpu_product(x: nn.Tensor, n: int, k: int, make_gemv, dequantize_func, weights: list):
    """x[..., K] @ W[N, K].T on a GPU profile (kernels/gpu_gemv.py, scheduled by DLight): the
    weight-only GEMV for one token (`make_gemv(rows)`, rows static where the entry's are), else
    the weight widened once, then the fp32 matmul."""
    if one_token(x):
        rows = as_rows(x)
        count = rows.shape[0]
        gemv_func = make_gemv(count if isinstance(count, int) else None)
        placeholder = nn.Tensor.placeholder((rows.shape[0], n), "float32")
        out = nn.op.tensor_ir_op(gemv_func, "gpu_gemv", [rows, *weights], placeholder)
        return nn.op.reshape(out, (*x.shape[:-1], n))
    full = nn.op.tensor_ir_op(
        dequantize_func, "gpu_dequantize", weights, nn.Tensor.placeholder((n, k), "float32")
    )
    return nn.op.matmul(x, nn.op.permute_dims(full))


def matmul_int8(
    x: nn.Tensor,
    weight: nn.Tensor,
    scale: nn.Tensor,
    lanes: int,
    kernel: Int8Kernel | None,
    gpu: bool = False,
) -> nn.Tensor:
    """The weight-only int8 product: on a GPU `gpu_product`; on a CPU the GEMV for one token,
    else W8A8 where `kernel` can run the shape, else dequantize-then-fp32-GEMM."""
    if gpu:
        n, k = (int(d) for d in weight.shape)
        make_gemv = lambda rows: gpu_gemv.int8_gemv(k, n, rows)
        return gpu_product(x, n, k, make_gemv, gpu_gemv.int8_dequantize(k, n), [weight, scale])
    if one_token(x):
        return gemv(x, weight, scale, lanes, cpu_gemv_a8.dot_isa(kernel))
    n, k = (int(d) for d in weight.shape)
    if cpu_prefill_int8.supports(kernel, n, k):
        return w8a8(x, weight, scale, kernel)
    return nn.op.matmul(x, nn.op.permute_dims(dequantized(weight, scale, lanes)))


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight [out, in] and one fp32 scale per output."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        lanes: int,
        kernel: Int8Kernel | None,
        gpu: bool = False,
    ):
        self.lanes = lanes
        self.kernel = kernel
        self.gpu = gpu
        self.weight = nn.Parameter((out_features, in_features), "int8")
        self.scale = nn.Parameter((out_features,), "float32")
        self.bias = nn.Parameter((out_features,), "float32") if bias else None

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        out = matmul_int8(x, self.weight, self.scale, self.lanes, self.kernel, self.gpu)
        return out + self.bias if self.bias is not None else out


class Int8Embedding(nn.Module):
    """`nn.Embedding` with int8 rows and one fp32 scale per row; `lm_head` is the tied head."""

    def __init__(self, num: int, dim: int, lanes: int, kernel: Int8Kernel | None, gpu=False):
        self.lanes = lanes
        self.kernel = kernel
        self.gpu = gpu
        self.weight = nn.Parameter((num, dim), "int8")
        self.scale = nn.Parameter((num,), "float32")

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        flat = nn.op.reshape(ids, (-1,))
        rows = nn.op.take(self.weight, flat, axis=0).astype("float32")
        scaled = rows * nn.op.unsqueeze(nn.op.take(self.scale, flat, axis=0), -1)
        return nn.op.reshape(scaled, (*ids.shape, self.weight.shape[1]))

    def lm_head(self, hidden: nn.Tensor) -> nn.Tensor:
        return matmul_int8(hidden, self.weight, self.scale, self.lanes, self.kernel, self.gpu)


class _Quantizer(nn.Mutator):
    def __init__(
        self, lanes: int, token_embeddings: tuple[str, ...], kernel: Int8Kernel | None, gpu: bool
    ):
        self.lanes = lanes
        self.kernel = kernel
        self.gpu = gpu
        self.token_embeddings = token_embeddings

    def visit_module(self, name: str, node: nn.Module):
        if isinstance(node, nn.Linear):
            bias = node.bias is not None
            return Int8Linear(
                node.in_features, node.out_features, bias, self.lanes, self.kernel, self.gpu
            )
        if isinstance(node, nn.Embedding) and name in self.token_embeddings:
            return Int8Embedding(node.num, node.dim, self.lanes, self.kernel, self.gpu)
        return self.visit(name, node)


def quantize_module(
    model: nn.Module,
    lanes: int,
    token_embeddings: tuple[str, ...],
    kernel: Int8Kernel | None = None,
    gpu: bool = False,
) -> nn.Module:
    """`model` with every `nn.Linear`, and the embeddings named `token_embeddings`, made int8;
    `kernel` (cpu_int8.kernel_for the profile): the int8 GEMM prefill runs on (None: the fp32
    GEMM on dequantized weights); `gpu`: a GPU profile's products (kernels/gpu_gemv.py)."""
    return _Quantizer(lanes, token_embeddings, kernel, gpu).visit("", model)


def tied_logits(embedding: nn.Module, hidden: nn.Tensor) -> nn.Tensor:
    """The LM head that reuses the token embedding: an `nn.Embedding` through the matmul, else
    the replacing module's `lm_head` (quantized, or the fp32 GEMV of decoder/dense.py)."""
    if not isinstance(embedding, nn.Embedding):
        return embedding.lm_head(hidden)
    return nn.op.matmul(hidden, nn.op.permute_dims(embedding.weight))


def quantize_params(
    named: list[tuple[str, nn.Parameter]], params: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The fp32 checkpoint `params` as the int8 definition `named` takes them: each int8
    weight quantized per row, its scale beside it; the rest unchanged."""
    int8 = {name for name, p in named if str(p.dtype) == "int8"}
    out: dict[str, np.ndarray] = {}
    for name, array in params.items():
        if name in int8:
            q, scale = quantize_rows(array)
            out[name] = q
            out[name.removesuffix(".weight") + SCALE_SUFFIX] = scale
        else:
            out[name] = array
    return out
