"""bench/decode_attention.py: its inputs are a real paged sequence (the kernel's output on them
matches NumPy's attention), and it times both forms and writes them."""

from __future__ import annotations

import json
import math

import numpy as np

from bench import decode_attention as bench


def test_the_bench_inputs_are_a_sequence_the_kernel_attends_over():
    import tvm
    from tvmdeploy.compiler.kernels import cpu_paged_attention as cpa

    keys = 37
    q, pages, indptr, ids, last = bench._inputs(keys)
    rows = pages[ids].transpose(1, 2, 0, 3, 4).reshape(2, bench.KV_HEADS, -1, bench.HEAD_DIM)
    k, v = rows[0][:, :keys], rows[1][:, :keys]
    group = bench.HEADS // bench.KV_HEADS
    want = np.zeros((bench.HEADS, bench.HEAD_DIM))
    for h in range(bench.HEADS):
        scores = k[h // group] @ q[0, h] / math.sqrt(bench.HEAD_DIM)
        weights = np.exp(scores - scores.max())
        want[h] = weights @ v[h // group] / weights.sum()
    target = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2"})
    kernel = tvm.compile(
        cpa.decode_attention(bench.KV_HEADS, bench.HEADS, bench.HEAD_DIM, bench.PAGE), target
    )
    out = tvm.runtime.tensor(np.zeros_like(q))
    zeros = tvm.runtime.tensor(np.zeros(1, np.int32))
    lse = tvm.runtime.tensor(np.zeros((1, bench.HEADS), np.float32))
    args = [tvm.runtime.tensor(x) for x in (q, pages, indptr, ids, last)]
    kernel(*args, zeros, zeros, out, lse, 0, 1.0, 10000.0, 1 / math.sqrt(bench.HEAD_DIM))
    np.testing.assert_allclose(out.numpy()[0], want, rtol=1e-4, atol=1e-5)


def test_the_bench_times_both_forms(tmp_path, capsys):
    assert bench.main(["--keys", "40", "--json", str(tmp_path / "out.json")]) == 0
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [r["keys"] for r in rows] == [40]
    assert rows[0]["serial"] > 0 and rows[0]["split"] > 0
    assert "serial us" in capsys.readouterr().out
