"""fp32 decoder layers on a CPU: weights packed in panels once, at load, for the decode GEMV and
the prompt's GEMM.

Through `nn.Linear`, TVM's matmul over the [N, K] weight reached the rule-based GEMM
(kernels/cpu_matmul.py), which re-packed a [K, nr] panel of it on every call and, over a
prompt's symbolic row count, kept its accumulators in memory: SmolLM2-135M decoded at 10-20 GB/s
of weights and prefilled at ~60 GFLOPS on a 2-core Zen 3. Here each layer packs its weight into
[N / panel, K, panel] panels (pack_weights.py's layout, panel = two SIMD vectors). The pack is a
weight-only expression, so the build lifts it into the artifact's `transform_params`
(`lower.lift_weight_work`), which the runtime calls once when it loads the weights; the bundle keeps
the weights as exported. One token per sequence then runs `cpu_gemv.packed_gemv` (one contiguous
stream per panel), a prompt the register-blocked GEMM over rows padded to whole tiles
(pack_weights.packed_matmul). Numbers: docs/benchmarks.md.

The tied LM head reads the embedding table as stored (one row per token for the lookup), through
the row-stream GEMV. The parameters keep `nn.Linear`'s and `nn.Embedding`'s names, shapes and
dtype, so the checkpoint loads unchanged.
"""

from __future__ import annotations

from tvm.relax.frontend import nn

from ..kernels import cpu_gemv
from ..kernels.pack_weights import packed_matmul
from .quantized import as_rows, one_token


def row_stream_product(x: nn.Tensor, weight: nn.Tensor, lanes: int) -> nn.Tensor:
    """x[..., K] @ weight[N, K].T with the weight as stored: the row-stream GEMV for one token
    per sequence, else TVM's matmul."""
    if not one_token(x):
        return nn.op.matmul(x, nn.op.permute_dims(weight))
    n, k = (int(d) for d in weight.shape)
    rows = as_rows(x)
    out = nn.op.tensor_ir_op(
        cpu_gemv.fp32_gemv(k, n, lanes),
        "fp32_gemv",
        [rows, weight],
        nn.Tensor.placeholder((rows.shape[0], n), "float32"),
    )
    return nn.op.reshape(out, (*x.shape[:-1], n))


def packed(weight: nn.Tensor, panel: int) -> nn.Tensor:
    """weight[N, K] as [N / panel, K, panel] panels (a weight-only expression: lifted)."""
    n, k = (int(d) for d in weight.shape)
    return nn.op.permute_dims(nn.op.reshape(weight, (n // panel, panel, k)), [0, 2, 1])


def packed_product(x: nn.Tensor, panels: nn.Tensor, lanes: int, row_tile: int) -> nn.Tensor:
    """x[..., K] @ W.T with W packed in `panels` [N / panel, K, panel]."""
    count, k, panel = (int(d) for d in panels.shape)
    n = count * panel
    if one_token(x):
        rows = as_rows(x)
        out = nn.op.tensor_ir_op(
            cpu_gemv.packed_gemv(k, n, panel, lanes),
            "fp32_packed_gemv",
            [rows, panels],
            nn.Tensor.placeholder((rows.shape[0], n), "float32"),
        )
        return nn.op.reshape(out, (*x.shape[:-1], n))
    return nn.op.tensor_expr_op(
        lambda a, b: packed_matmul(a, b, panel, "float32", row_tile),
        "matmul_packed",
        [x, panels],
    )


class DenseLinear(nn.Module):
    """`nn.Linear` (weight [out, in], optional bias) over its weight packed in panels; an output
    width that is not a whole number of panels keeps the stored layout."""

    def __init__(self, in_features: int, out_features: int, bias: bool, lanes: int, row_tile: int):
        self.lanes = lanes
        self.row_tile = row_tile
        self.panel = 2 * lanes
        self.weight = nn.Parameter((out_features, in_features), "float32")
        self.bias = nn.Parameter((out_features,), "float32") if bias else None

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if int(self.weight.shape[0]) % self.panel:
            out = row_stream_product(x, self.weight, self.lanes)
        else:
            panels = packed(self.weight, self.panel)
            out = packed_product(x, panels, self.lanes, self.row_tile)
        return out + self.bias if self.bias is not None else out


class DenseEmbedding(nn.Module):
    """`nn.Embedding` whose `lm_head` (the tied head) is the row-stream GEMV."""

    def __init__(self, num: int, dim: int, lanes: int):
        self.lanes = lanes
        self.weight = nn.Parameter((num, dim), "float32")

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        flat = nn.op.reshape(ids, (-1,))
        rows = nn.op.take(self.weight, flat, axis=0)
        return nn.op.reshape(rows, (*ids.shape, self.weight.shape[1]))

    def lm_head(self, hidden: nn.Tensor) -> nn.Tensor:
        return row_stream_product(hidden, self.weight, self.lanes)


class _Dense(nn.Mutator):
    def __init__(self, lanes: int, row_tile: int, token_embeddings: tuple[str, ...]):
        self.lanes = lanes
        self.row_tile = row_tile
        self.token_embeddings = token_embeddings

    def visit_module(self, name: str, node: nn.Module):
        if isinstance(node, nn.Linear):
            bias = node.bias is not None
            return DenseLinear(node.in_features, node.out_features, bias, self.lanes, self.row_tile)
        if isinstance(node, nn.Embedding) and name in self.token_embeddings:
            return DenseEmbedding(node.num, node.dim, self.lanes)
        return self.visit(name, node)


def dense_module(
    model: nn.Module, lanes: int, row_tile: int, token_embeddings: tuple[str, ...]
) -> nn.Module:
    """`model` with every `nn.Linear` packed in panels of two `lanes`-wide vectors (prompt rows
    padded to `row_tile`, the GEMM's register tile), and the embeddings named
    `token_embeddings` given the row-stream LM head."""
    return _Dense(lanes, row_tile, token_embeddings).visit("", model)
