"""Reduced precisions as Relax rewrites: int8 and bf16 GEMMs for CPUs, fp16 for CUDA.

int8 rewrites every weight matmul of the Relax module into an int8 GEMM. The scheme (what ONNX
Runtime's dynamic quantization does, with finer activation scales):

- weights: symmetric per output channel, ``w_scale[n] = max_k |W[k, n]| / 127``; quantized,
  packed for the kernel's vector width and summed per column by the lifted `transform_params`
  function when the artifact is loaded, so the bundle keeps one copy of the fp32 weights for every
  precision and profile (a quantized copy would add a file per precision and save little: the
  embeddings, the largest tensor of these models, stay fp32 anyway);
- activations: asymmetric per row (per token), computed on every call from the row's min/max, so
  one outlier token does not coarsen the scale of the others (ORT uses one scale per tensor), by
  one kernel per shape (cpu_int8.quantize_rows), once per activation;
- the product is an int8 GEMM with int32 accumulation from
  compiler/kernels/cpu_int8.py, dequantized in
  the same kernel.

Only matmuls whose B is derived from weights, with static shapes, N a multiple of the kernel's
vector width and K of 4, are rewritten; the rest (attention's activation x activation products,
a 2-label classifier head) stay fp32. That keeps the accuracy cost where the speed is.

bf16 rewrites the same matmuls into bf16 GEMMs
(compiler/kernels/cpu_bf16.py): weights rounded and packed
at load like int8's, activations rounded once per call, no scales.

On AMX (x86-amx, compiler/kernels/cpu_amx.py) both run on tiles: the same quantization and
packing, with the activations padded to whole tiles after quantizing or rounding, and the
weights' K padded with zeros before packing.
"""

from __future__ import annotations

import math

from tvm import relax
from tvm.ir import IRModule

from .kernels.cpu_amx import amx_bf16_gemm, amx_int8_gemm, padded_shape
from .kernels.cpu_bf16 import LANES as BF16_LANES
from .kernels.cpu_bf16 import bf16_gemm, to_bf16_bits
from .kernels.cpu_int8 import Int8Kernel, int8_gemm, quantize_rows
from .kernels.pack_weights import WeightMatmulRewriter

#: Smallest scale, so an all-zero row or weight column does not divide by zero.
_EPS = 1e-12


def _f32(value: float) -> relax.Constant:
    return relax.const(value, "float32")


class _GemmRewriter(WeightMatmulRewriter):
    """What both reduced-precision rewriters share: each activation converted once even when
    several matmuls read it (the Q, K and V projections share theirs), weight panels, and a count
    of rewritten matmuls (one kernel PrimFunc per shape comes from `kernel_func`)."""

    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.converted: dict = {}  # activation var -> what the kernel reads of it
        self.count = 0

    def start_function(self) -> None:
        self.converted = {}

    def pad_to(self, x, rows: int, cols: int, shape: tuple[int, int], name_hint: str):
        """2-D `x` ([rows, cols]) with zero rows and columns up to `shape` (AMX tiles are whole;
        a zero weight adds nothing), or `x` itself where it already is that shape."""
        if (rows, cols) == shape:
            return x
        pad = relax.op.nn.pad(x, [0, shape[0] - rows, 0, shape[1] - cols])
        return self.builder_.emit(pad, name_hint=name_hint)

    def pack_panels(self, w, k: int, n: int, lanes: int, group: int, name_hint: str):
        """W[k, n] laid out as [n / lanes, k / group, lanes, group], the order the GEMM kernels
        read (one vector of `lanes` columns x `group` consecutive k per load)."""
        op = relax.op
        panels = op.reshape(op.permute_dims(w, [1, 0]), [n // lanes, lanes, k // group, group])
        return self.builder_.emit(op.permute_dims(panels, [0, 2, 1, 3]), name_hint=name_hint)


@relax.expr_functor.mutator
class _Quantizer(_GemmRewriter):
    """Rewrites weight matmuls into int8 GEMMs."""

    def __init__(self, mod: IRModule, kernel: Int8Kernel):
        super().__init__(mod)
        self.kernel = kernel
        self.amx = kernel.name == "amx-int8"  # tiles: operands padded to whole tiles

    def rewrite_matmul(self, value, x, w, x_shape, w_shape):
        k, n = w_shape
        if n % self.kernel.lanes or k % 4 or x_shape[-1] != k:
            return None
        m = math.prod(x_shape[:-1])
        q, a_scale, a_zero = self._quantize_activation(self.visit_expr(x), m, k)
        packed, colsum, w_scale = self._quantize_weight(self.visit_expr(w), k, n)
        if self.amx:
            gemm = self.kernel_func(f"amx_int8_gemm_{m}x{n}x{k}", lambda: amx_int8_gemm(m, n, k))
        else:
            gemm = self.kernel_func(
                f"int8_gemm_{m}x{n}x{k}", lambda: int8_gemm(self.kernel, m, n, k)
            )
        out = self.builder_.emit(
            relax.call_tir(
                gemm,
                relax.Tuple([q, packed, colsum, w_scale, a_scale, a_zero]),
                relax.TensorType([m, n], "float32"),
            ),
            name_hint="int8_matmul",
        )
        self.count += 1
        return relax.op.reshape(out, [*x_shape[:-1], n])

    def _quantize_activation(self, x, m: int, k: int):
        """Per-row asymmetric quantization of x (as [m, k]) to the kernel's levels and type."""
        if x in self.converted:
            return self.converted[x]
        kern, emit = self.kernel, self.builder_.emit
        quantize = self.kernel_func(f"int8_quantize_{m}x{k}", lambda: quantize_rows(kern, m, k))
        x2 = emit(relax.op.reshape(x, [m, k]))
        out = emit(
            relax.call_tir(
                quantize,
                relax.Tuple([x2]),
                [
                    relax.TensorType([m, k], kern.a_dtype),
                    relax.TensorType([m], "float32"),
                    relax.TensorType([m], "float32"),
                ],
            ),
            name_hint="x_quantized",
        )
        q, a_scale, a_zero = (emit(relax.TupleGetItem(out, i)) for i in range(3))
        if self.amx:
            q = self.pad_to(q, m, k, padded_shape("int8", m, k), "x_quantized_tiles")
        self.converted[x] = (q, a_scale, a_zero)
        return self.converted[x]

    def _quantize_weight(self, w, k: int, n: int):
        """Per-column symmetric int8, packed [n / lanes, k / 4, lanes, 4], and column sums."""
        lanes, emit, op = self.kernel.lanes, self.builder_.emit, relax.op
        w_scale = emit(op.maximum(op.divide(op.max(op.abs(w), axis=[0]), _f32(127.0)), _f32(_EPS)))
        wq = emit(op.astype(op.clip(op.round(op.divide(w, w_scale)), -127, 127), "int8"))
        colsum = emit(op.sum(op.astype(wq, "int32"), axis=[0]))
        kp = padded_shape("int8", 1, k)[1] if self.amx else k
        wq_k = self.pad_to(wq, k, n, (kp, n), "w_int8_tiles")
        packed = self.pack_panels(wq_k, kp, n, lanes, 4, "w_int8_packed")
        for var in (w_scale, wq, wq_k, colsum, packed):
            self.weight_vars.add(var)
        return packed, colsum, w_scale


def quantize_int8(mod: IRModule, kernel: Int8Kernel) -> tuple[IRModule, int]:
    """`mod` with every eligible weight matmul as an int8 GEMM; returns it and how many."""
    quantizer = _Quantizer(mod, kernel)
    return relax.transform.Normalize()(quantizer.rewrite_module(mod)), quantizer.count


@relax.expr_functor.mutator
class _Bfloat16(_GemmRewriter):
    """Rewrites weight matmuls into bf16 GEMMs (cpu_bf16.py, or on AMX tiles: cpu_amx.py)."""

    def __init__(self, mod: IRModule, amx: bool = False):
        super().__init__(mod)
        self.amx = amx

    def rewrite_matmul(self, value, x, w, x_shape, w_shape):
        k, n = w_shape
        if n % BF16_LANES or k % 2 or x_shape[-1] != k:
            return None
        m = math.prod(x_shape[:-1])
        emit, op = self.builder_.emit, relax.op
        x = self.visit_expr(x)
        mp, kp = padded_shape("bf16", m, k) if self.amx else (m, k)
        if x not in self.converted:  # its bf16 bits as [m, k] (AMX: padded to whole tiles)
            x2 = emit(op.reshape(x, [m, k]))
            bits = emit(
                self.builder_.call_te(to_bf16_bits, x2, primfunc_name_hint="bf16_round"),
                name_hint="x_bf16",
            )
            self.converted[x] = self.pad_to(bits, m, k, (mp, kp), "x_bf16_tiles")
        w_bits = emit(self.builder_.call_te(to_bf16_bits, self.visit_expr(w)))
        w_k = self.pad_to(w_bits, k, n, (kp, n), "w_bf16_tiles")
        packed = self.pack_panels(w_k, kp, n, BF16_LANES, 2, "w_bf16_packed")
        self.weight_vars.update((w_bits, w_k, packed))
        if self.amx:
            gemm = self.kernel_func(f"amx_bf16_gemm_{m}x{n}x{k}", lambda: amx_bf16_gemm(m, n, k))
        else:
            gemm = self.kernel_func(f"bf16_gemm_{m}x{n}x{k}", lambda: bf16_gemm(m, n, k))
        out = emit(
            relax.call_tir(
                gemm,
                relax.Tuple([self.converted[x], packed]),
                relax.TensorType([m, n], "float32"),
            ),
            name_hint="bf16_matmul",
        )
        self.count += 1
        return op.reshape(out, [*x_shape[:-1], n])


def to_bfloat16(mod: IRModule, amx: bool = False) -> tuple[IRModule, int]:
    """`mod` with every eligible weight matmul as a bf16 GEMM (fp32 accumulation and output;
    `amx`: on tiles, `tdpbf16ps`, else `vdpbf16ps`); returns it and how many. Everything else
    stays fp32: the matmuls hold nearly all the time, and layer norm and softmax keep their
    precision."""
    rewriter = _Bfloat16(mod, amx)
    return relax.transform.Normalize()(rewriter.rewrite_module(mod)), rewriter.count


def to_float16(mod: IRModule) -> IRModule:
    """fp16 for CUDA profiles: matmuls and elementwise ops in float16 with float32 accumulation
    (TVM's `ToMixedPrecision`), so tensor cores do the GEMMs; layer norm and softmax keep the
    float32 that the pass keeps for them, and the outputs stay float32."""
    return relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
