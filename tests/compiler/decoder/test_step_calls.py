"""The decoder's finalization (compiler/decoder/step_calls.py): a decode step makes fewer VM
calls than with TVM's stock CPU finalization (no kills, no tuples nobody reads), computes the
same logits, and prefill keeps its kills. Counted with the VM's own instrument hook on a tiny
random Llama built both ways."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from tvm import relax
from tvm.script import relax as R
from tvmdeploy.compiler.decoder import config as decoder_config
from tvmdeploy.compiler.decoder import lower, step_calls

from .test_definitions import COMMON, LLAMA_SHAPE, PROMPT


def _tiny_llama():
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **COMMON, **LLAMA_SHAPE}
    raw.update(rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True)
    return decoder_config.parse_decoder_config(raw)


def _build(finalize):
    """A VM of the tiny Llama (random weights) built with `finalize` as its last passes."""
    import tvm
    from tvmdeploy.compiler.kernels.cpu_schedule import cpu_pipeline

    target = tvm.target.Target("llvm")
    mod, _ = lower.export(_tiny_llama(), target)
    pipeline = cpu_pipeline(target, pack=False, finalize=finalize)
    return tvm.runtime.vm.VirtualMachine(
        tvm.compile(mod, target, relax_pipeline=pipeline), tvm.cpu()
    )


def _calls_and_logits(vm, params, function: str):
    """(calls per kind, logits) of one prefill of PROMPT and one `function` step after it."""
    import tvm

    shape = tvm.runtime.ShapeTuple
    cache = vm["create_paged_kv_cache"](
        shape([1]), shape([128]), shape([64]), shape([16]), shape([0])
    )
    begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
    end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
    tvm.get_global_func("vm.builtin.kv_state_add_sequence")(cache, 0)
    begin(cache, shape([0]), shape([len(PROMPT)]))
    vm["prefill"](tvm.runtime.tensor(np.array([PROMPT], np.int32)), cache, *params)
    end(cache)
    calls: collections.Counter = collections.Counter()

    def count(_func, symbol, before_run, _ret, *_args):
        if before_run:
            calls[symbol] += 1
        return 0

    vm.set_instrument(count)
    begin(cache, shape([0]), shape([1]))
    logits = vm[function](tvm.runtime.tensor(np.array([[PROMPT[-1]]], np.int32)), cache, *params)
    end(cache)
    vm.set_instrument(lambda *_a: 0)
    return calls, logits[0].numpy()


@pytest.fixture(scope="module")
def builds():
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    _, named = lower.export(_tiny_llama(), tvm.target.Target("llvm"))
    rng = np.random.default_rng(0)
    params = [
        tvm.runtime.tensor((rng.standard_normal(p.shape) * 0.3).astype(p.dtype)) for _, p in named
    ]
    return _build(cpu_generic.finalize_passes), _build(step_calls.finalize_passes), params


@pytest.mark.parametrize("function", ["decode1", "decode"])
def test_a_step_makes_fewer_vm_calls_for_the_same_logits(builds, function):
    stock, lean, params = builds
    stock_calls, stock_logits = _calls_and_logits(stock, params, function)
    lean_calls, lean_logits = _calls_and_logits(lean, params, function)
    np.testing.assert_array_equal(lean_logits, stock_logits)
    assert stock_calls["vm.builtin.null_value"] > 0  # TVM's finalization kills in the step
    assert lean_calls["vm.builtin.null_value"] == 0
    assert sum(lean_calls.values()) < sum(stock_calls.values())
    # the kernels themselves are the same calls (the VM's shape functions are not kernels)
    kernels = {k for k in stock_calls if not k.startswith(("vm.builtin.", "shape_func"))}
    assert {k: lean_calls[k] for k in kernels} == {k: stock_calls[k] for k in kernels}


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


def test_a_quantized_step_builds_no_tuples():
    """int8's activation quantization returns three tensors: TVM's finalization builds them into
    a tuple on every step and takes them out again; the decoder's reads them as they are."""
    import re

    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    def tuples(mod) -> int:
        return len(
            re.findall(r"^\s+\w+: R\.Tuple\(.*\) = \w+, ", mod["decode1"].script(), re.MULTILINE)
        )

    # one per layer and quantized product at least, and the returned (logits, cache) pair
    assert tuples(_lowered("int8", cpu_generic.finalize_passes)) >= 3
    assert tuples(_lowered("int8", step_calls.finalize_passes)) == 1  # the returned pair


def test_prefill_keeps_its_kills():
    import tvm

    target = tvm.target.Target("llvm")
    mod, _ = lower.export(_tiny_llama(), target)
    with target:
        lowered = lower.cpu_pipeline(target)(mod)
    assert "kill" in lowered["prefill"].script()
    assert "kill" not in lowered["decode1"].script()


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
