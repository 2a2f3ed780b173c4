"""`CPUInjective`: layout kernels (the head-split transposes of attention) run rows in parallel with
each row's vectors in a serial loop, and stay exact; shapes without whole rows of vectors keep the
flattened loop; a symbolic row count (a prompt) runs its rows in parallel too."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import te, tirx, topi
from tvmdeploy import targets
from tvmdeploy.compiler import build
from tvmdeploy.compiler.kernels.cpu_rules import CPUInjective
from tvmdeploy.runtime.probe import missing_requirements, probe


def head_split(batch, seq, heads, depth):
    """reshape [B, S, H*D] -> [B, S, H, D], transpose to [B, H, S, D], scale: a BERT query."""
    x = te.placeholder((batch, seq, heads * depth), "float32", name="x")
    split = topi.reshape(x, (batch, seq, heads, depth))
    out = topi.multiply(topi.transpose(split, (0, 2, 1, 3)), 0.125)
    return te.create_prim_func([x, out]).with_attr("global_symbol", "main")


def parallel_extents(func: tirx.PrimFunc) -> list[int]:
    """Extents of the parallel loops, read from the TVMScript of the scheduled function."""
    return [int(x) for x in re.findall(r"T\.parallel\((\d+)\)", func.script())]


@pytest.mark.parametrize(
    ("shape", "parallel"),
    [
        ((2, 16, 4, 64), 2 * 4 * 16),  # whole rows of 8-lane vectors: parallel over the 128 rows
        ((4, 64, 4, 12), 4 * 64 * 4 * 12),  # 12 floats a row: the flattened loop, in parallel
    ],
)
def test_layout_kernel_runs_rows_in_parallel_and_is_exact(shape, parallel):
    profile = targets.get("x86-64-v3")
    target = build.tvm_target(profile)
    func = head_split(*shape)
    sch = CPUInjective().apply(func, target, False)
    assert sch is not None
    assert parallel_extents(sch.mod["main"]) == [parallel]
    if missing_requirements(profile.requires, probe()):
        pytest.skip("this CPU cannot run x86-64-v3 code")
    lib = tvm.compile(sch.mod, target=target)
    batch, seq, heads, depth = shape
    x = np.random.default_rng(0).standard_normal((batch, seq, heads * depth)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((batch, heads, seq, depth), np.float32))
    lib["main"](tvm.runtime.tensor(x), out)
    want = x.reshape(batch, seq, heads, depth).transpose(0, 2, 1, 3) * 0.125
    np.testing.assert_array_equal(out.numpy(), want)


def test_a_prompt_length_kernel_runs_rows_in_parallel_vectorized_and_is_exact():
    """A symbolic row count (a prompt's length), as a decoder's prefill SiLU-multiply has it: the
    chain is inlined, rows run in parallel, each row in vectors; exact against NumPy."""
    rows = tirx.Var("seq_len", "int64")
    x = te.placeholder((rows, 64), "float32", name="x")
    gate = te.compute((rows, 32), lambda i, j: x[i, j], name="gate")
    up = te.compute((rows, 32), lambda i, j: x[i, j + 32], name="up")
    out = te.compute((rows, 32), lambda i, j: gate[i, j] * 2.0 + up[i, j], name="out")
    func = te.create_prim_func([x, out]).with_attr("global_symbol", "main")
    profile = targets.get("x86-64-v3")
    target = build.tvm_target(profile)
    sch = CPUInjective().apply(func, target, False)
    assert sch is not None
    script = sch.mod["main"].script()
    assert "T.parallel(seq_len)" in script and "T.vectorized(" in script
    assert "gate" not in script.split("def main")[1].split("T.parallel")[1]  # inlined
    if missing_requirements(profile.requires, probe()):
        pytest.skip("this CPU cannot run x86-64-v3 code")
    lib = tvm.compile(sch.mod, target=target)
    data = np.random.default_rng(0).standard_normal((37, 64)).astype(np.float32)
    result = tvm.runtime.tensor(np.zeros((37, 32), np.float32))
    lib["main"](tvm.runtime.tensor(data), result)
    np.testing.assert_array_equal(result.numpy(), data[:, :32] * 2.0 + data[:, 32:])


def rms_norm(shape):
    """RMSNorm over the last axis of `shape`, as Relax legalizes it (the decoders' norm)."""
    from tvm import relax

    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(shape), "float32"))
    w = relax.Var("w", relax.TensorType([shape[-1]], "float32"))
    with builder.function("main", [x, w]):
        builder.emit_func_output(builder.emit(relax.op.nn.rms_norm(x, w, axes=[-1])))
    mod = relax.transform.LegalizeOps()(builder.get())
    func = next(f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc))
    return func.with_attr("global_symbol", "main")


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 1, 576), (1, 5, 64)])
def test_a_row_reduction_reduces_each_row_once_and_is_exact(shape):
    """The static batch-1 decode step's norm has one row, whose unit loops normalization strips:
    the rule once computed the whole reduction inside the hidden axis' loop (576x the work)."""
    from tvmdeploy.compiler.kernels.cpu_rules import CPURowReduction

    profile = targets.get("x86-64-v3")
    target = build.tvm_target(profile)
    sch = CPURowReduction().apply(rms_norm(shape), target, False)
    assert sch is not None
    update = sch.get_sblock("T_multiply_red_rf_update")
    iterations = int(np.prod([int(sch.get(lp).extent) for lp in sch.get_loops(update)]))
    assert iterations == int(np.prod(shape))  # every element once (the 8-lane loop counted)
    if missing_requirements(profile.requires, probe()):
        pytest.skip("this CPU cannot run x86-64-v3 code")
    lib = tvm.compile(sch.mod["main"].with_attr("tirx.is_scheduled", True), target=target)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros(shape, np.float32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
