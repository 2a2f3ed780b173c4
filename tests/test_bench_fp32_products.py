"""bench/fp32_products.py: both forms it times compute the product (against NumPy), on shapes
that leave tails, and a run writes its rates."""

from __future__ import annotations

import numpy as np

from bench import fp32_products as bench


def test_both_gemv_forms_compute_the_product():
    import tvm

    k, n = 40, 32
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((1, k)).astype(np.float32)
    stored = {"matmul": weight, "packed": bench.panels(weight, 16)}
    for name, call in bench.gemv_forms(k, n, 16, 8).items():
        out = tvm.runtime.tensor(np.zeros((1, n), np.float32))
        got = call(tvm.runtime.tensor(x), tvm.runtime.tensor(stored[name]), out)
        got = (got if got is not None else out).numpy()
        np.testing.assert_allclose(got, x @ weight.T, rtol=1e-4, atol=1e-4, err_msg=name)


def test_a_gemm_measurement_checks_its_forms_and_reports_rates():
    row = bench.measure_gemm(256, 48, rows=7, rounds=1)  # 7 rows: a padded tail tile
    assert set(row["gflops"]) == {"matmul", "packed"}
    assert all(rate > 0 for rate in row["gflops"].values())
