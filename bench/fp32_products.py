"""The fp32 decoder's weight products alone, at SmolLM2-135M's shapes: the decode GEMVs in GB/s of
weights read out of cache, and the prompt's GEMMs in GFLOPS over a symbolic row count, each in the
form the decoder ran before (TVM's matmul over the `[N, K]` weight through the project's CPU
pipeline) and the one it runs now (decoder/dense.py: weights packed in panels, the packed GEMV,
the GEMM over padded rows), against NumPy's OpenBLAS on the same shapes.

    python bench/fp32_products.py [--rows 32,128,512] [--rounds 5] [--json out.json]

The TVM forms are timed in turn per shape (machine noise hits both alike); OpenBLAS after all of
them, since its threads spin after a call and slow whatever runs next. GEMV weights: copies that
together exceed the last-level cache, called in turn, as a decode step reads every layer once.
Threads: TVM_NUM_THREADS, else the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time

#: (K, N) of SmolLM2-135M's linear layers: gate_up, qkv, down, o_proj.
SHAPES = [(576, 3072), (576, 960), (1536, 576), (576, 576)]
COLD_BYTES = 200_000_000


def _target():
    import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2"})


def panels(weight, panel: int):
    """weight[N, K] as [N / panel, K, panel], decoder/dense.packed's layout."""
    import numpy as np

    n, k = weight.shape
    return np.ascontiguousarray(weight.reshape(n // panel, panel, k).transpose(0, 2, 1))


def _vm_function(build_body, x_shape, w_shape):
    """A Relax function main(x, w) built by `build_body(bb, x, w)`, compiled with the decoder's
    CPU pipeline, as a callable."""
    import tvm
    from tvm import relax
    from tvmdeploy.compiler.decoder.lower import cpu_pipeline

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    w = relax.Var("w", relax.TensorType(w_shape, "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(build_body(bb, x, w))
        bb.emit_func_output(out)
    target = _target()
    executable = tvm.compile(bb.get(), target=target, relax_pipeline=cpu_pipeline(target))
    return relax.VirtualMachine(executable, tvm.cpu())["main"]


def gemm_forms(k: int, n: int, panel: int, row_tile: int) -> dict:
    """{form: callable(x, w)} of the prompt's product over a symbolic row count."""
    from tvm import relax, tirx
    from tvmdeploy.compiler.kernels.pack_weights import packed_matmul

    rows = tirx.Var("rows", "int64")

    def matmul(bb, x, w):
        return bb.emit(relax.op.matmul(x, relax.op.permute_dims(w)))

    def packed(bb, x, w):
        return bb.emit(bb.call_te(packed_matmul, x, w, panel, "float32", row_tile))

    return {
        "matmul": _vm_function(matmul, [rows, k], [n, k]),
        "packed": _vm_function(packed, [rows, k], [n // panel, k, panel]),
    }


def gemv_forms(k: int, n: int, panel: int, lanes: int) -> dict:
    """{form: callable(x, w, out)} of one decode row's product."""
    import tvm
    from tvm import relax
    from tvmdeploy.compiler.kernels import cpu_gemv

    matmul = _vm_function(
        lambda bb, x, w: bb.emit(relax.op.matmul(x, relax.op.permute_dims(w))), [1, k], [n, k]
    )
    packed = tvm.compile(cpu_gemv.packed_gemv(k, n, panel, lanes), target=_target())
    return {
        "matmul": lambda x, w, out: matmul(x, w),
        "packed": packed[f"fp32_packed_gemv_k{k}_n{n}_p{panel}"],
    }


def _best(call, rounds: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def measure_gemv(k: int, n: int, rounds: int, panel: int = 16, lanes: int = 8) -> dict:
    """GB/s of weights read, out of cache, per form (TVM forms alternated; OpenBLAS after)."""
    import numpy as np
    import tvm

    rng = np.random.default_rng(k * n)
    size = 4 * n * k
    copies = max(2, COLD_BYTES // size)
    weights = [rng.standard_normal((n, k)).astype(np.float32) for _ in range(copies)]
    stored = {
        "matmul": [tvm.runtime.tensor(w) for w in weights],
        "packed": [tvm.runtime.tensor(panels(w, panel)) for w in weights],
    }
    x_np = rng.standard_normal((1, k)).astype(np.float32)
    x = tvm.runtime.tensor(x_np)
    out = tvm.runtime.tensor(np.zeros((1, n), np.float32))
    forms = gemv_forms(k, n, panel, lanes)
    best = dict.fromkeys(forms, float("inf"))
    for _ in range(rounds):
        for name, call in forms.items():

            def sweep(call=call, ws=stored[name]):
                for w in ws:
                    call(x, w, out)

            best[name] = min(best[name], _best(sweep, 1, 1) / copies)
    rates = {name: size / t / 1e9 for name, t in best.items()}
    return {"k": k, "n": n, "gbps": {name: round(r, 1) for name, r in rates.items()}}


def openblas_gemv(k: int, n: int, rounds: int) -> float:
    """GB/s of NumPy's OpenBLAS GEMV on the same shape, out of cache."""
    import numpy as np

    rng = np.random.default_rng(k * n)
    copies = max(2, COLD_BYTES // (4 * n * k))
    weights = [rng.standard_normal((n, k)).astype(np.float32) for _ in range(copies)]
    x = rng.standard_normal((1, k)).astype(np.float32)
    seconds = _best(lambda: [x @ w.T for w in weights], rounds, 1) / copies
    return round(4 * n * k / seconds / 1e9, 1)


def measure_gemm(k: int, n: int, rows: int, rounds: int, panel: int = 16, row_tile: int = 6):
    """GFLOPS per form over `rows` prompt rows (TVM forms alternated; OpenBLAS after)."""
    import numpy as np
    import tvm

    rng = np.random.default_rng(rows)
    weight = rng.standard_normal((n, k)).astype(np.float32)
    x_np = rng.standard_normal((rows, k)).astype(np.float32)
    x = tvm.runtime.tensor(x_np)
    stored = {
        "matmul": tvm.runtime.tensor(weight),
        "packed": tvm.runtime.tensor(panels(weight, panel)),
    }
    forms = gemm_forms(k, n, panel, row_tile)
    want = x_np.astype(np.float64) @ weight.astype(np.float64).T
    for name, call in forms.items():  # both forms compute the product
        np.testing.assert_allclose(call(x, stored[name]).numpy(), want, rtol=1e-3, atol=1e-3)
    best = dict.fromkeys(forms, float("inf"))
    for _ in range(rounds):
        for name, call in forms.items():
            best[name] = min(best[name], _best(lambda c=call, w=stored[name]: c(x, w), 1, 3))
    flops = 2 * rows * k * n
    return {
        "k": k,
        "n": n,
        "rows": rows,
        "gflops": {name: round(flops / t / 1e9, 2) for name, t in best.items()},
    }


def openblas_gemm(k: int, n: int, rows: int, rounds: int) -> float:
    """GFLOPS of NumPy's OpenBLAS GEMM on the same shape."""
    import numpy as np

    rng = np.random.default_rng(rows)
    weight = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    return round(2 * rows * k * n / _best(lambda: x @ weight.T, rounds, 3) / 1e9, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32,128,512", help="prompt rows of the GEMMs")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, best kept (default 5)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    results = {"threads": int(os.environ["TVM_NUM_THREADS"]), "gemv": [], "gemm": []}
    for k, n in SHAPES:
        results["gemv"].append(measure_gemv(k, n, args.rounds))
    for count in rows:
        for k, n in SHAPES:
            results["gemm"].append(measure_gemm(k, n, count, args.rounds))
    # OpenBLAS last: its threads spin after a call and would slow the TVM forms that follow.
    for row in results["gemv"]:
        row["gbps"]["openblas"] = openblas_gemv(row["k"], row["n"], args.rounds)
        rates = "  ".join(f"{name} {rate:5.1f}" for name, rate in row["gbps"].items())
        print(f"GEMV k{row['k']:>5} n{row['n']:>5}  GB/s: {rates}", flush=True)
    for row in results["gemm"]:
        row["gflops"]["openblas"] = openblas_gemm(row["k"], row["n"], row["rows"], args.rounds)
        rates = "  ".join(f"{name} {rate:6.1f}" for name, rate in row["gflops"].items())
        print(f"GEMM rows {row['rows']:>4} k{row['k']:>5} n{row['n']:>5}  GFLOPS: {rates}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
