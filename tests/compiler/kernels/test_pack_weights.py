"""Weight pre-packing: matmuls read packed panels, packed once at load, outputs keep parity."""

import json
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax
from tvmdeploy.compiler import build as build_stage
from tvmdeploy.compiler import verify
from tvmdeploy.compiler.frontend import importer
from tvmdeploy.compiler.kernels.cpu_schedule import vector_lanes
from tvmdeploy.compiler.kernels.pack_weights import TRANSFORM_PARAMS, packing_passes, padded_rows
from tvmdeploy.compiler.options import parse_buckets
from tvmdeploy.runtime._tvm import prepare_params
from tvmdeploy.targets.resolve import host_profile

#: Linear layers of the tiny BERT whose output width is a multiple of 4 (packable):
#: q, k, v, attention output, FFN in, FFN out per layer (2 layers), and the pooler.
PACKABLE_LINEARS = 6 * 2 + 1


@pytest.fixture(scope="module")
def tiny_onnx(tiny_exported) -> Path:
    return tiny_exported.onnx_path


@pytest.fixture(scope="module")
def imported(tiny_onnx):
    return importer.import_onnx(tiny_onnx, parse_buckets("1,2x16"))


@pytest.fixture(scope="module")
def profile():
    return host_profile()


def test_every_weight_matmul_reads_a_packed_panel(imported, profile):
    target = build_stage.tvm_target(profile)
    with target:
        fused = tvm.transform.Sequential(packing_passes(2 * vector_lanes(target)))(imported.mod)
    names = [gv.name_hint for gv in fused.get_global_vars()]
    assert TRANSFORM_PARAMS in names
    assert len(fused[TRANSFORM_PARAMS].params) == len(
        imported.params
    )  # flat: one argument per weight
    for bucket in imported.buckets:
        text = fused[bucket.function].script()
        assert text.count("R.call_tir(matmul_packed") == PACKABLE_LINEARS, bucket.function
        # No weight is transposed or packed per call any more: that moved to transform_params.
        assert not [
            n
            for n in imported.param_names
            if f"R.permute_dims({n}" in text or f"R.reshape({n}" in text
        ]


def test_transform_params_packs_each_weight_once_and_outputs_keep_parity(
    imported, tiny_onnx, profile, tmp_path
):
    built = build_stage.build_artifact(imported.mod, profile, tmp_path / "lib", None)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(built.lib_path)), tvm.cpu())
    packed = prepare_params(vm, imported.params)

    # Independent check of the layout: W[K, N] -> [N / nr, K, nr], nr = two SIMD vectors (or less
    # where N is narrower).
    nr_max = 2 * vector_lanes(build_stage.tvm_target(profile))
    originals = [p.numpy() for p in imported.params if p.numpy().ndim == 2]
    sizes = {w.size for w in originals}
    # 3-D outputs the size of a 2-D weight are its panels (others are lifted constants, e.g. the
    # position embeddings of a bucket's fixed positions).
    panels = [p.numpy() for p in packed if p.numpy().ndim == 3 and p.numpy().size in sizes]
    assert len(panels) >= PACKABLE_LINEARS
    for panel in panels:
        n_tiles, k, nr = panel.shape
        assert nr <= nr_max
        # ONNX Gemm keeps a weight as [N, K] and transposes it: its panel comes from W.T.
        candidates = [v for w in originals for v in (w, w.T) if v.shape == (k, n_tiles * nr)]
        assert any(
            np.array_equal(panel, v.reshape(k, n_tiles, nr).transpose(1, 0, 2)) for v in candidates
        )

    config = json.loads((tiny_onnx.parent / "config.json").read_text())
    cases = verify.reference_cases(tiny_onnx, imported, config)
    parity, _ = verify.verify(built, imported, cases, timing_runs=0)
    assert parity.ok, parity.detail
    assert parity.max_abs_diff <= 1e-4  # against ONNX Runtime


def test_unpacked_and_packed_builds_agree(imported, profile):
    """Packing changes where the weights sit, not what the model computes."""
    target = build_stage.tvm_target(profile)
    from tvmdeploy.compiler.kernels.cpu_schedule import cpu_pipeline

    rng = np.random.default_rng(1)
    ids = rng.integers(0, 30522, (2, 16), dtype=np.int64)
    arrays = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
    }
    args = [tvm.runtime.tensor(arrays[i["name"]]) for i in imported.inputs]
    outputs = []
    for pack in (False, True):
        executable = tvm.compile(
            imported.mod, target, relax_pipeline=cpu_pipeline(target, pack=pack)
        )
        vm = relax.VirtualMachine(executable, tvm.cpu())
        result = vm["b2_s16"](*args, *prepare_params(vm, imported.params))
        outputs.append((result if hasattr(result, "numpy") else result[0]).numpy().copy())
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_the_bundle_stores_the_weights_as_exported(tiny_bundle):
    """One weight set serves every artifact; each packs it for itself when loaded."""
    from tvmdeploy.runtime.bundle import Bundle

    bundle = Bundle(tiny_bundle)
    entry = bundle.weights_entry("float32")
    stored = tvm.runtime.load_param_dict_from_file(str(bundle.file(entry["file"])))
    assert all(stored[name].numpy().ndim <= 2 for name in entry["names"])


def test_rows_pad_to_the_register_tile_only_where_it_pays():
    assert padded_rows(1024, 6) == 1026  # AVX2: 6-row tiles, the last one whole
    assert padded_rows(128, 6) == 132
    assert padded_rows(32, 6) == 32  # under 8 tiles, a smaller dividing tile costs less
    assert padded_rows(1024, 8) == 1024  # AVX-512 / NEON: 8 divides the usual row counts
    assert padded_rows(100, None) == 100


@pytest.mark.parametrize("lead", [(1, 64), (2, 50), (2, 5, 7)])
def test_weight_matmul_over_padded_rows_is_exact(lead):
    """On AVX2 the rows of a weight matmul are padded to whole 6-row tiles (re-reading the last
    row) and sliced back: the result must be the plain product, every row of it."""
    from tvmdeploy import targets
    from tvmdeploy.compiler.kernels.cpu_schedule import cpu_pipeline
    from tvmdeploy.runtime.probe import missing_requirements, probe

    profile = targets.get("x86-64-v3")
    if missing_requirements(profile.requires, probe()):
        pytest.skip("this CPU cannot run x86-64-v3 code")
    k, n = 96, 48
    x_shape = (*lead, k)

    bb = relax.BlockBuilder()
    x_var = relax.Var("x", relax.TensorType(list(x_shape), "float32"))
    w_var = relax.Var("w", relax.TensorType([k, n], "float32"))
    with bb.function("main", [x_var, w_var], attrs={"num_input": 1}):
        with bb.dataflow():
            product = bb.emit(relax.op.matmul(x_var, w_var))
            y = bb.emit_output(relax.op.add(product, relax.const(0.5, "float32")))
        bb.emit_func_output(y)
    module = bb.get()

    target = build_stage.tvm_target(profile)
    with target:
        packed = tvm.transform.Sequential(packing_passes(2 * vector_lanes(target), 6))(module)
    kernels = [f.script() for f in packed.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any("matmul_rows" in text for text in kernels)  # the padded form was taken
    vm = relax.VirtualMachine(
        tvm.compile(module, target, relax_pipeline=cpu_pipeline(target)), tvm.cpu()
    )
    rng = np.random.default_rng(len(lead))
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x), *prepare_params(vm, [tvm.runtime.tensor(w)])).numpy()
    np.testing.assert_allclose(got, x.astype(np.float64) @ w + 0.5, rtol=1e-5, atol=1e-4)


def _symbolic_packed_matmul(k: int, n: int, panel: int, row_tile: int):
    """matmul_packed over a symbolic row count (a decoder's prompt), as decoder/dense.py emits
    it."""
    from tvmdeploy.compiler.kernels.pack_weights import packed_matmul

    bb = relax.BlockBuilder()
    rows = tvm.tirx.Var("rows", "int64")
    x_var = relax.Var("x", relax.TensorType([1, rows, k], "float32"))
    w_var = relax.Var("w", relax.TensorType([n // panel, k, panel], "float32"))
    with bb.function("main", [x_var, w_var]):
        with bb.dataflow():
            product = bb.emit(
                bb.call_te(
                    packed_matmul,
                    x_var,
                    w_var,
                    panel,
                    "float32",
                    row_tile,
                    primfunc_name_hint="mm",
                )
            )
            y = bb.emit_output(product)
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("rows", [1, 5, 6, 13, 64])
def test_weight_matmul_over_symbolic_rows_is_exact(rows):
    """A prompt's row count is symbolic: its rows are always padded to whole register tiles
    (re-reading the last row) and sliced back, for any count, one row and an exact tile
    included."""
    from tvmdeploy import targets
    from tvmdeploy.compiler.kernels.cpu_schedule import cpu_pipeline
    from tvmdeploy.runtime.probe import missing_requirements, probe

    profile = targets.get("x86-64-v3")
    if missing_requirements(profile.requires, probe()):
        pytest.skip("this CPU cannot run x86-64-v3 code")
    k, n, panel = 40, 48, 16
    target = build_stage.tvm_target(profile)
    module = _symbolic_packed_matmul(k, n, panel, 6)
    vm = relax.VirtualMachine(
        tvm.compile(module, target, relax_pipeline=cpu_pipeline(target, pack=False)), tvm.cpu()
    )
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((1, rows, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    panels = np.ascontiguousarray(w.reshape(n // panel, panel, k).transpose(0, 2, 1))
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(panels)).numpy()
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-4)


def test_symbolic_row_tiles_keep_their_accumulators_off_the_heap():
    """Over padded symbolic rows the GEMM's register tile is a constant stack array (LLVM keeps
    it in registers), not a workspace allocation per task: in a workspace, every accumulator
    was stored on every k step, a third of the speed (cpu_matmul.CPUMatmul._accumulator_scope)."""
    from tvmdeploy import targets
    from tvmdeploy.compiler.kernels.cpu_schedule import default_schedule_pass

    target = build_stage.tvm_target(targets.get("x86-64-v3"))
    module = relax.transform.LegalizeOps()(_symbolic_packed_matmul(576, 64, 16, 6))
    kernels = tvm.IRModule(
        {
            gv: f.with_attr({"target": target, "global_symbol": gv.name_hint})
            for gv, f in module.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc)
        }
    )
    scheduled = default_schedule_pass(target)(kernels)
    (func,) = scheduled.functions.values()
    assert func.attrs["tirx.is_scheduled"]
    assert "_reindex_global" in func.script()  # the accumulator tile
    llvm_ir = tvm.compile(scheduled, target=target).mod.inspect_source("ll")
    assert "TVMBackendAllocWorkspace" not in llvm_ir
