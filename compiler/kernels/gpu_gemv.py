"""Weight-only int8 and int4 products of a decoder on a GPU profile, as unscheduled TIR.

The CPU kernels (cpu_gemv.py, cpu_gemv_int4.py, cpu_gemv_a8.py) come out scheduled for a CPU's
vector unit and thread pool. On CUDA the same arithmetic is written here as plain tensor
expressions and left to TVM's GPU pipeline, the weights read as stored and widened in the
kernel: 1 byte a weight (int8), 0.625 (int4: nibbles plus fp16 d and m per group of 32).
- int8, one row (`decode1`): DLight's GEMV rule (a block per group of outputs, the activation
  row in shared memory, a warp reduction along K); several rows (`decode`): its Matmul rule.
- int4: DLight's GEMV rule fails on the GGUF in-block nibble order ("the loop no longer exists",
  with one reduction axis or with a dequantize stage to inline), so the product is written over
  (group, half, element) and gets the fallback schedule: a thread per output row, serial over K.
  Correct and weight-only, but uncoalesced; unmeasured (no GPU has run it yet).
- a prompt: the weight widened once per call (`*_dequantize`), then the fp32 matmul.
These have not run on a GPU yet: a GPU host gates them at compile time, as any artifact.

The layouts are the CPU artifacts' (decoder/quantized.py, decoder/quantized_int4.py), so a
bundle's CPU and CUDA artifacts of one precision share their weights.
"""

from __future__ import annotations

from functools import cache  # kernel builders: once per shape in a process, not once per layer

from tvm import te, tirx

from .cpu_gemv_int4 import GROUP, _nibble, check_shape
from .cpu_int8 import OPAQUE_PATTERN


def _i64(value: int) -> tirx.IntImm:
    """Shapes in int64 throughout, as the symbolic batch is (DLight's index arithmetic refuses a
    buffer indexed in both widths)."""
    return tirx.const(value, "int64")


def _func(tensors: list[te.Tensor], name: str) -> tirx.PrimFunc:
    """Unscheduled (DLight schedules it), kept out of fusion (as the CPU kernels are: FuseTIR
    cannot merge these with their neighbours), under a symbol unique per shape."""
    func = te.create_prim_func(tensors).with_attr("global_symbol", name)
    return func.with_attr("op_pattern", OPAQUE_PATTERN)


def _batch(rows: int | None):
    """The row count: static where the entry knows it (`decode1`'s 1, which DLight's GEMV rule
    takes: one block per group of outputs, a warp reduction along K), else symbolic (its Matmul
    rule takes those)."""
    return tirx.Var("batch", "int64") if rows is None else _i64(rows)


@cache
def int8_gemv(k: int, n: int, rows: int | None = None) -> tirx.PrimFunc:
    """`out[b, j] = scale[j] * sum_k x[b, k] * float(w[j, k])` for `rows` rows (None: symbolic)."""
    symbol = f"gpu_int8_gemv_k{k}_n{n}" + ("" if rows is None else f"_b{rows}")
    batch, n, k = _batch(rows), _i64(n), _i64(k)
    x = te.placeholder((batch, k), "float32", name="x")
    w = te.placeholder((n, k), "int8", name="w")
    scale = te.placeholder((n,), "float32", name="scale")
    kk = te.reduce_axis((_i64(0), k), name="k")
    dot = te.compute(
        (batch, n), lambda i, j: te.sum(x[i, kk] * w[j, kk].astype("float32"), axis=kk), name="dot"
    )
    out = te.compute((batch, n), lambda i, j: dot[i, j] * scale[j], name="out")
    return _func([x, w, scale, out], symbol)


@cache
def int8_dequantize(k: int, n: int) -> tirx.PrimFunc:
    """`out[n, k] = float(w[n, k]) * scale[n]`: the fp32 weight a prompt's matmul reads."""
    name = f"gpu_int8_dequantize_k{k}_n{n}"
    n, k = _i64(n), _i64(k)
    w = te.placeholder((n, k), "int8", name="w")
    scale = te.placeholder((n,), "float32", name="scale")
    out = te.compute((n, k), lambda j, c: w[j, c].astype("float32") * scale[j], name="out")
    return _func([w, scale, out], name)


@cache
def int4_gemv(k: int, n: int, rows: int | None = None) -> tirx.PrimFunc:
    """`out[b, j] = sum_k x[b, k] * (d[j, k/32] * q[j, k] + m[j, k/32])` for `rows` rows (None:
    symbolic; q the nibbles in GGUF's in-block order; d and m fp16)."""
    check_shape(k)
    name = f"gpu_int4_gemv_k{k}_n{n}" + ("" if rows is None else f"_b{rows}")
    batch, n, half, groups = _batch(rows), _i64(n), _i64(k // 2), _i64(k // GROUP)
    x = te.placeholder((batch, _i64(k)), "float32", name="x")
    packed = te.placeholder((n, half), "uint8", name="packed")
    d = te.placeholder((n, groups), "float16", name="d")
    m = te.placeholder((n, groups), "float16", name="m")
    g = te.reduce_axis((_i64(0), groups), name="g")
    h = te.reduce_axis((_i64(0), _i64(2)), name="h")  # low nibbles, then high
    e = te.reduce_axis((_i64(0), _i64(GROUP // 2)), name="e")

    def product(i, j):
        byte = packed[j, g * (GROUP // 2) + e]
        q = (tirx.shift_right(byte, (h * 4).astype("uint8")) & tirx.const(15, "uint8")).astype(
            "float32"
        )
        w = q * d[j, g].astype("float32") + m[j, g].astype("float32")
        return x[i, g * GROUP + h * (GROUP // 2) + e] * w

    out = te.compute((batch, n), lambda i, j: te.sum(product(i, j), axis=[g, h, e]), name="out")
    return _func([x, packed, d, m, out], name)


@cache
def int4_dequantize(k: int, n: int | None) -> tirx.PrimFunc:
    """`out[n, k] = d * q + m`: the fp32 weight a prompt's matmul reads (n None: a symbolic row
    count, the rows a 4-bit embedding gathers)."""
    check_shape(k)
    rows = tirx.Var("rows", "int64") if n is None else _i64(n)
    packed = te.placeholder((rows, _i64(k // 2)), "uint8", name="packed")
    d = te.placeholder((rows, _i64(k // GROUP)), "float16", name="d")
    m = te.placeholder((rows, _i64(k // GROUP)), "float16", name="m")
    out = te.compute(
        (rows, _i64(k)),
        lambda j, c: (
            _nibble(packed, j, c) * d[j, c // GROUP].astype("float32")
            + m[j, c // GROUP].astype("float32")
        ),
        name="out",
    )
    suffix = "" if n is None else f"_n{n}"
    return _func([packed, d, m, out], f"gpu_int4_dequantize_k{k}{suffix}")
