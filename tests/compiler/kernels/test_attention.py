"""Fused attention (compiler/kernels/cpu_attention.py): the rewrite finds exported attention and
nothing else, and the fused kernel matches float64 arithmetic for the shapes buckets produce
(rows and keys that do not divide into its tiles, masks of every broadcast form, no mask)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvmdeploy import targets
from tvmdeploy.compiler import build
from tvmdeploy.compiler.frontend import importer
from tvmdeploy.compiler.kernels.cpu_attention import FuseAttention, count_fused
from tvmdeploy.compiler.kernels.cpu_schedule import cpu_pipeline
from tvmdeploy.compiler.options import parse_buckets
from tvmdeploy.runtime.probe import missing_requirements, probe

MASK_MIN = np.finfo(np.float32).min  # what exported BERTs add at padded keys


def attention_module(
    batch,
    heads,
    rows,
    keys,
    depth,
    width,
    mask_shape,
    *,
    mask_first=False,
    axis=-1,
    also_return_probs=False,
) -> tvm.IRModule:
    """`softmax(q @ kt [+ mask]) @ v` as an exporter writes it, in one Relax function."""
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType([batch, heads, rows, depth], "float32"))
    kt = relax.Var("kt", relax.TensorType([batch, heads, depth, keys], "float32"))
    v = relax.Var("v", relax.TensorType([batch, heads, keys, width], "float32"))
    params = [q, kt, v]
    mask = None
    if mask_shape is not None:
        mask = relax.Var("mask", relax.TensorType(list(mask_shape), "float32"))
        params.append(mask)
    with bb.function("main", params):
        with bb.dataflow():
            logits = bb.emit(relax.op.matmul(q, kt))
            if mask is not None:
                pair = (mask, logits) if mask_first else (logits, mask)
                logits = bb.emit(relax.op.add(*pair))
            probs = bb.emit(relax.op.nn.softmax(logits, axis=axis))
            out = bb.emit(relax.op.matmul(probs, v))
            result = bb.emit_output(relax.Tuple([out, probs]) if also_return_probs else out)
        bb.emit_func_output(result)
    return bb.get()


def runnable_profiles() -> list[str]:
    names = [
        p
        for p in ("x86-64-v3", "x86-64-v4")
        if not missing_requirements(targets.get(p).requires, probe())
    ]
    if not names:
        pytest.skip("this CPU runs neither x86-64-v3 nor x86-64-v4 code")
    return names


def reference(q, kt, v, mask):
    logits = q.astype(np.float64) @ kt
    if mask is not None:
        logits = logits + mask
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    return (probs / probs.sum(axis=-1, keepdims=True)) @ v


@pytest.mark.parametrize(
    ("shape", "mask_shape"),
    [
        ((1, 2, 16, 16, 16, 16), (1, 1, 1, 16)),  # a tiny bucket: one thread, scalar reductions
        ((2, 3, 13, 40, 24, 24), (2, 1, 1, 40)),  # rows and keys that divide into no tile
        ((2, 4, 128, 128, 32, 32), (2, 1, 128, 128)),  # the parallel path, one mask row per query
        ((1, 2, 32, 64, 16, 8), None),  # no mask; V narrower than the head dimension
        ((2, 2, 32, 32, 64, 64), (1, 2, 32, 32)),  # a mask per head, shared by the batch
        ((1, 2, 16, 16, 16, 16), (1, 2, 16, 1)),  # one mask value per query row
    ],
)
def test_fused_kernel_matches_float64(shape, mask_shape):
    batch, heads, rows, keys, depth, width = shape
    rng = np.random.default_rng(sum(shape))
    q = rng.standard_normal((batch, heads, rows, depth)).astype(np.float32)
    kt = rng.standard_normal((batch, heads, depth, keys)).astype(np.float32)
    v = rng.standard_normal((batch, heads, keys, width)).astype(np.float32)
    mask = None
    if mask_shape is not None:
        mask = np.where(rng.random(mask_shape) < 0.2, MASK_MIN, 0.0).astype(np.float32)
        mask[..., 0] = 0.0  # every query attends to at least one key
    expected = reference(q, kt, v, mask)
    mod = attention_module(*shape, mask_shape)
    assert count_fused(FuseAttention(16)(mod)) == 1
    for name in runnable_profiles():
        target = build.tvm_target(targets.get(name))
        vm = relax.VirtualMachine(
            tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target, pack=False)), tvm.cpu()
        )
        inputs = [q, kt, v] + ([mask] if mask is not None else [])
        got = vm["main"](*[tvm.runtime.tensor(x) for x in inputs]).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_only_attention_whose_intermediates_nothing_else_reads_is_fused():
    shape = (1, 2, 16, 16, 16, 16)
    assert count_fused(FuseAttention(16)(attention_module(*shape, (1, 1, 1, 16)))) == 1
    assert (
        count_fused(FuseAttention(16)(attention_module(*shape, (1, 1, 1, 16), mask_first=True)))
        == 1
    )
    # The probabilities are returned too (output_attentions): the graph stays as it is.
    returned = attention_module(*shape, (1, 1, 1, 16), also_return_probs=True)
    assert count_fused(FuseAttention(16)(returned)) == 0
    # A softmax over another axis is not attention's.
    assert count_fused(FuseAttention(16)(attention_module(*shape, None, axis=2))) == 0
    # A mask that is not a 4-D broadcast of the scores' shape.
    assert count_fused(FuseAttention(16)(attention_module(*shape, (2, 1, 1, 16)))) == 0


def test_every_layer_of_an_exported_bert_is_fused(tiny_exported):
    buckets = parse_buckets("1,2x16,32")
    mod = importer.import_onnx(tiny_exported.onnx_path, buckets).mod
    layers = 2
    assert count_fused(FuseAttention(16)(mod)) == layers * len(buckets)
