"""The decoder's finalization (compiler/decoder/step_calls.py): the step functions of a tiny
Llama lowered both ways hold no kills, no tuples nobody reads and fewer tensor views where TVM's
stock CPU finalization has them, the same kernel calls, and prefill keeps its kills. (That the
lean steps compute the same tokens: test_definitions.py, whose builds use this finalization.)"""

from __future__ import annotations

import collections
import functools

import pytest
from tvm import relax
from tvm.script import relax as R
from tvmdeploy.compiler.decoder import config as decoder_config
from tvmdeploy.compiler.decoder import lower, step_calls

from .test_definitions import COMMON, LLAMA_SHAPE


def _tiny_llama():
    """One layer of the definitions test's tiny Llama (the counts scale with the layers)."""
    shape = {**LLAMA_SHAPE, "num_hidden_layers": 1}
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **COMMON, **shape}
    raw.update(rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True)
    return decoder_config.parse_decoder_config(raw)


@functools.cache
def _lowered(precision: str, finalize):
    """The tiny Llama at `precision` for the x86-64-v3 profile, through the CPU pipeline with
    `finalize` (lowered, not built)."""
    from tvmdeploy import targets
    from tvmdeploy.compiler import build
    from tvmdeploy.compiler.kernels.cpu_int8 import kernel_for
    from tvmdeploy.compiler.kernels.cpu_schedule import cpu_pipeline

    profile = targets.get("x86-64-v3")
    target = build.tvm_target(profile)
    mod, _ = lower.export(_tiny_llama(), target, precision, kernel_for(profile))
    with target:
        return cpu_pipeline(target, pack=False, finalize=finalize)(mod)


def _calls(func) -> collections.Counter:
    """What a lowered Relax function calls, by callee name."""
    import re

    return collections.Counter(re.findall(r"\b((?:R\.)?[\w.]+)\(", func.script()))


@pytest.mark.parametrize("function", ["decode1", "decode"])
def test_a_step_has_no_kills_and_the_same_kernels(function):
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    stock = _calls(_lowered("float32", cpu_generic.finalize_passes)[function])
    lean = _calls(_lowered("float32", step_calls.finalize_passes)[function])
    assert stock["R.vm.kill_object"] > 0  # TVM's finalization kills in the step
    assert lean["R.vm.kill_object"] == 0
    # the same kernels (VMShapeLower's shape functions are the VM's bookkeeping, not kernels)
    kernels = {name for name in stock if not name.startswith(("R.", "shape_func"))}
    assert {k: lean[k] for k in kernels} == {k: stock[k] for k in kernels}
    assert sum(lean.values()) < sum(stock.values())
    # each tensor view made once: the layers' repeated ones are read from the first
    assert lean["R.vm.alloc_tensor"] < stock["R.vm.alloc_tensor"]


def test_a_quantized_step_builds_no_tuples():
    """int8's activation quantization returns three tensors: TVM's finalization builds them into
    a tuple on every step and takes them out again; the decoder's reads them as they are."""
    import re

    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    def tuples(mod) -> int:
        return len(
            re.findall(r"^\s+\w+: R\.Tuple\(.*\) = \w+, ", mod["decode1"].script(), re.MULTILINE)
        )

    # one per quantized product at least, and the returned (logits, cache) pair
    assert tuples(_lowered("int8", cpu_generic.finalize_passes)) >= 3
    assert tuples(_lowered("int8", step_calls.finalize_passes)) == 1  # the returned pair


def test_prefill_keeps_its_kills():
    lowered = _lowered("float32", step_calls.finalize_passes)
    assert _calls(lowered["prefill"])["R.vm.kill_object"] > 0
    assert _calls(lowered["decode1"])["R.vm.kill_object"] == 0


def test_the_decoder_pipeline_finalizes_this_way():
    """lower.cpu_pipeline, what compile builds decoders with, finalizes the steps lean."""
    import tvm

    target = tvm.target.Target("llvm")
    mod, _ = lower.export(_tiny_llama(), target)
    with target:
        lowered = lower.cpu_pipeline(target)(mod)
    assert _calls(lowered["prefill"])["R.vm.kill_object"] > 0
    assert _calls(lowered["decode1"])["R.vm.kill_object"] == 0


def test_a_tuple_read_only_through_its_elements_is_dropped():
    @R.function(pure=False)
    def f(x: R.Tensor((2,), "float32")):
        both = (x, x)
        first = both[0]  # noqa: F841 (unread: what the pass drops)
        y = R.add(x, x)
        kept = (y, x)
        return kept

    lean = step_calls.drop_unread_tuples(f).script()
    assert "both" not in lean and "first" not in lean
    assert "kept" in lean and "R.add" in lean
    assert isinstance(step_calls.drop_unread_tuples(f), relax.Function)
