"""Weight-only int8 for the decoder definitions: the layers, and the weights they read.

The scheme: symmetric, one fp32 scale per output row, `w_int8[n, k] = round(W[n, k] / s[n])`
with `s[n] = max_k |W[n, k]| / 127`. Every `nn.Linear` becomes `Int8Linear` and the token
embedding `Int8Embedding` (int8 rows, one scale per row), so the bundle stores each weight once
at a quarter of its fp32 size; norms, biases and GPT-2's position table stay fp32 (0.1% of the
weights).

What each reads per call:
- a step with one token per sequence (decode, and prefill's last-token LM head) runs the int8
  GEMV of kernels/cpu_gemv.py: the weights are read as int8 and widened in registers;
- a prompt (prefill) widens each weight once into fp32 and runs the fp32 GEMM schedule: there
  every weight serves all prompt rows, so GEMM speed matters more than weight bytes;
- the embedding gathers int8 rows and scales them; with tied embeddings the LM head is the
  same int8 table through the GEMV.
"""

from __future__ import annotations

import numpy as np
from tvm.relax.frontend import nn

from ..kernels import cpu_gemv

#: The suffix of a quantized weight's scale parameter (`<layer>.weight` -> `<layer>.scale`).
SCALE_SUFFIX = ".scale"


def quantize_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [N, K], fp32 scale [N]): symmetric per output row; an all-zero row gets scale 1."""
    weight = np.asarray(weight, dtype=np.float32)
    peak = np.abs(weight).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def _rows(x: nn.Tensor) -> nn.Tensor:
    """x[..., K] as [rows, K]."""
    return nn.op.reshape(x, (-1, x.shape[-1]))


def gemv(x: nn.Tensor, weight: nn.Tensor, scale: nn.Tensor, lanes: int) -> nn.Tensor:
    """x[b, 1, K] @ dequant(weight[N, K]).T -> [b, 1, N] through the int8 GEMV."""
    n, k = (int(d) for d in weight.shape)
    rows = _rows(x)
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


def matmul_int8(x: nn.Tensor, weight: nn.Tensor, scale: nn.Tensor, lanes: int) -> nn.Tensor:
    if one_token(x):
        return gemv(x, weight, scale, lanes)
    return nn.op.matmul(x, nn.op.permute_dims(dequantized(weight, scale, lanes)))


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight [out, in] and one fp32 scale per output."""

    def __init__(self, in_features: int, out_features: int, bias: bool, lanes: int):
        self.lanes = lanes
        self.weight = nn.Parameter((out_features, in_features), "int8")
        self.scale = nn.Parameter((out_features,), "float32")
        self.bias = nn.Parameter((out_features,), "float32") if bias else None

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        out = matmul_int8(x, self.weight, self.scale, self.lanes)
        return out + self.bias if self.bias is not None else out


class Int8Embedding(nn.Module):
    """`nn.Embedding` with int8 rows and one fp32 scale per row; `lm_head` is the tied head."""

    def __init__(self, num: int, dim: int, lanes: int):
        self.lanes = lanes
        self.weight = nn.Parameter((num, dim), "int8")
        self.scale = nn.Parameter((num,), "float32")

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        flat = nn.op.reshape(ids, (-1,))
        rows = nn.op.take(self.weight, flat, axis=0).astype("float32")
        scaled = rows * nn.op.unsqueeze(nn.op.take(self.scale, flat, axis=0), -1)
        return nn.op.reshape(scaled, (*ids.shape, self.weight.shape[1]))

    def lm_head(self, hidden: nn.Tensor) -> nn.Tensor:
        return matmul_int8(hidden, self.weight, self.scale, self.lanes)


class _Quantizer(nn.Mutator):
    def __init__(self, lanes: int, token_embeddings: tuple[str, ...]):
        self.lanes = lanes
        self.token_embeddings = token_embeddings

    def visit_module(self, name: str, node: nn.Module):
        if isinstance(node, nn.Linear):
            bias = node.bias is not None
            return Int8Linear(node.in_features, node.out_features, bias, self.lanes)
        if isinstance(node, nn.Embedding) and name in self.token_embeddings:
            return Int8Embedding(node.num, node.dim, self.lanes)
        return self.visit(name, node)


def quantize_module(model: nn.Module, lanes: int, token_embeddings: tuple[str, ...]) -> nn.Module:
    """`model` with every `nn.Linear`, and the embeddings named `token_embeddings`, made int8."""
    return _Quantizer(lanes, token_embeddings).visit("", model)


def tied_logits(embedding: nn.Module, hidden: nn.Tensor) -> nn.Tensor:
    """The LM head that reuses the token embedding (fp32, or a quantized one's `lm_head`)."""
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
