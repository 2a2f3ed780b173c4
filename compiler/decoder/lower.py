"""The decoder definition → a Relax module → a compiled library for one target profile.

CPU: the project's CPU pipeline with `FuseTransposeMatmul` first (else every weight's transpose
runs as its own kernel on every call, the 113 MB embedding of SmolLM2 included). CUDA: TVM's
default CUDA pipeline with DLight GPU schedules (build.relax_pipeline).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode
from tvmdeploy.runtime._tvm import PREFILL_TRANSFORM, TRANSFORM_PARAMS

from .config import DecoderConfig
from .entry import ENTRY_FUNCTIONS, DecoderModule

__all__ = [
    "ENTRY_FUNCTIONS",
    "cpu_pipeline",
    "definition",
    "export",
    "lift_weight_work",
    "pipeline_for",
]


def definition(config: DecoderConfig, target) -> DecoderModule:
    """The family's `nn.Module` for `config`, with its cache built for `target`'s kernels."""
    if config.family == "gpt2":
        from .gpt2 import GPT2Decoder

        return GPT2Decoder(config, target)
    from .llama import LlamaDecoder

    return LlamaDecoder(config, target)


#: The weight-only quantized precisions (their artifacts decode through `decode`, no `decode1`).
QUANTIZED = ("int8", "int4")
#: The token-embedding attribute of each family's definition (quantized with the weights).
TOKEN_EMBEDDINGS = ("embed_tokens", "wte")


def export(
    config: DecoderConfig, target, precision: str = "float32", int8_kernel=None
) -> tuple[relax.Expr, list[tuple[str, object]]]:
    """(IRModule with the entry functions, [(parameter name, nn.Parameter)] in call order);
    `precision` "int8" / "int4": weight-only int8 / int4 layers (decoder/quantized.py,
    decoder/quantized_int4.py); int8 prefill runs on `int8_kernel` (cpu_int8.kernel_for the
    profile; None: dequantize-then-fp32-GEMM), and int4 decode on its family's W4A8 GEMV
    (kernels/cpu_gemv_a8.py; None: the weight-only int4 GEMV); on a CUDA target both run the
    weight-only products of kernels/gpu_gemv.py. fp32 on a CPU reads its weights packed in
    panels (decoder/dense.py; built with `pipeline_for(..., precision)`)."""
    model = definition(config, target)
    model.to("float32")
    if precision in QUANTIZED:
        from ..kernels.cpu_target import vector_lanes

        gpu = target.kind.name == "cuda"  # kernels/gpu_gemv.py, scheduled by DLight
        lanes = vector_lanes(target)
        if precision == "int8":
            from .quantized import quantize_module

            model = quantize_module(model, lanes, TOKEN_EMBEDDINGS, int8_kernel, gpu=gpu)
        else:
            from .quantized_int4 import quantize_module

            model = quantize_module(
                model, lanes, TOKEN_EMBEDDINGS, int8_kernel=int8_kernel, gpu=gpu
            )
    elif target.kind.name == "llvm":  # fp32: weights packed in panels at load (dense.py)
        from ..kernels.cpu_target import register_rows, vector_lanes
        from .dense import dense_module

        rows = register_rows(target, 2)  # the GEMM's register tile at two vectors a row
        model = dense_module(model, vector_lanes(target), rows, TOKEN_EMBEDDINGS)
    # The static batch-1 entry saves the VM's shape work per step (SmolLM2 fp32 on a Zen 3: 38.7
    # against 46.7 ms a step). Its int8 step was once slower (13.9 against 8.5 ms): the row
    # reduction rule computed each RMSNorm 576 times over for a single row (kernels/cpu_rules.py).
    spec = model.get_default_spec(static_decode=True)
    mod, named, _extern = model.export_tvm(spec=spec, allow_extern=True)
    if target.kind.name == "llvm":  # the project's CPU attention kernels in place of TVM's
        from ..kernels.cpu_paged_attention import replace_decode_kernel
        from ..kernels.cpu_prefill_attention import replace_prefill_kernel
        from ..kernels.cpu_rope import replace_rope_kernel
        from ..kernels.cpu_target import vector_lanes

        heads = (config.num_kv_heads, config.num_heads, config.head_dim)
        mod = replace_decode_kernel(mod, *heads)
        mod = replace_rope_kernel(
            mod,
            config.rope_theta,
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
            vector_lanes(target),
        )
        if model.rope_mode != RopeMode.INLINE:  # it takes rotary embedding applied beforehand
            mod = replace_prefill_kernel(mod, *heads, vector_lanes(target))
    return mod, named


def pipeline_for(profile, target, precision: str = "float32"):
    """The Relax pipeline a decoder of `precision` is built with for `profile` (CPU or CUDA).
    Weight-only work is lifted into `transform_params` for fp32 (its panels, dense.py) and for
    int4 on a profile with an int8 kernel (its prompt's int8 weights, quantized_int4.py); int8
    keeps its one stored copy, re-laid out per prompt (cpu_prefill_int8.py)."""
    if profile.family == "cuda":
        return relax.get_default_pipeline(target)
    from ..kernels.cpu_int8 import kernel_for

    if precision not in QUANTIZED:
        return cpu_pipeline(target, lift="shared")
    if precision == "int4" and kernel_for(profile) is not None:
        return cpu_pipeline(target, lift="prefill")
    return cpu_pipeline(target)


def lift_weight_work(lift: str) -> tvm.transform.Pass:
    """Weight-only work lifted out of the entries, flat (pack_weights.py): "shared", one
    `transform_params` whose outputs every entry takes (fp32's panels, read by prefill and
    decode alike); "prefill", `PREFILL_TRANSFORM` for `prefill` alone, the decode steps keeping
    the stored weights (int4: the prompt's int8 copy beside the int4 planes decode reads)."""
    from ..kernels.pack_weights import FlattenTransformParams, LiftBucketTransforms

    if lift == "shared":
        return tvm.transform.Sequential([LiftBucketTransforms(), FlattenTransformParams()])
    if lift != "prefill":
        raise ValueError(f"lift {lift!r}: 'shared' or 'prefill'")

    @tvm.transform.module_pass(opt_level=0, name="NamePrefillTransform")
    def named(mod, _ctx):
        gvar = mod.get_global_var(TRANSFORM_PARAMS)
        func = mod[gvar].with_attr("global_symbol", PREFILL_TRANSFORM)
        out = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv != gvar})
        out[PREFILL_TRANSFORM] = func
        return out

    return tvm.transform.Sequential(
        [
            relax.transform.LiftTransformParams(shared_transform=["prefill"]),
            FlattenTransformParams(),
            named,
        ]
    )


def cpu_pipeline(target, lift: str | None = None):
    """The project's CPU pipeline (kernels/cpu_schedule.py: fusion, then the rule-based
    register-blocked matmul, reduction and injective schedules), transposes fused into the
    matmuls first and SiLU put on a vectorizable exp (kernels/cpu_fast_math.py). The encoders'
    weight packing pass stays off: an fp32 decoder's layers pack their own weights
    (decoder/dense.py). With TVM's stock schedules instead, SmolLM2's prefill ran at 3 tokens/s,
    with these at 80 (2-core Zen 3). The step functions are finalized with fewer VM calls
    (decoder/step_calls.py). With `lift`, weight-only work (fp32's panels, int4's prompt
    weights) is lifted out of the entries first (`lift_weight_work`)."""
    from ..kernels.cpu_fast_math import fast_silu
    from ..kernels.cpu_schedule import cpu_pipeline as project_pipeline
    from .step_calls import finalize_passes

    ours = project_pipeline(target, pack=False, finalize=finalize_passes)

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, ctx):
        if lift:
            mod = lift_weight_work(lift)(mod)
        return ours(fast_silu(relax.transform.FuseTransposeMatmul()(mod)))

    return pipeline
