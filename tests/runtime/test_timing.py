"""Device-side timing: the bundle timed in this process, baselines passed in as plain runners."""

import numpy as np
import pytest
from tvmdeploy.runtime import OptionError
from tvmdeploy.runtime.engine import OnnxRuntimeEngine
from tvmdeploy.runtime.timing import BenchConfig, bench_inputs, run_bench, timed


def test_tvmdeploy_alone_with_parity_against_onnxruntime(tiny_bundle):
    config = BenchConfig(str(tiny_bundle), ["tvmdeploy"], [1, 2], [16], warmup=1, runs=4)
    report = run_bench(config)
    assert [(r.engine, r.batch, r.seq) for r in report.results] == [
        ("tvmdeploy", 1, 16),
        ("tvmdeploy", 2, 16),
    ]
    for r in report.results:
        assert r.runs == 4 and 0 < r.p50_ms <= r.p99_ms and r.parity["max_abs_diff"] < 1e-4
        assert r.throughput_per_s == pytest.approx(r.batch * 1e3 / r.mean_ms)
    assert report.to_dict()["schema_version"] == 1


def test_a_baseline_is_any_runner_and_its_parity_is_measured(tiny_bundle):
    from tvmdeploy.runtime import Bundle

    ort = OnnxRuntimeEngine(Bundle(tiny_bundle))
    calls = []

    def shifted(arrays):  # a baseline that is off by 0.5: its parity row must say so
        calls.append(arrays["input_ids"].shape)
        return ort.run(None, arrays)[0] + 0.5

    config = BenchConfig(str(tiny_bundle), ["tvmdeploy", "torch"], [1], [16], warmup=1, runs=3)
    report = run_bench(config, baselines={"torch": shifted})
    row = next(r for r in report.results if r.engine == "torch")
    assert row.parity["max_abs_diff"] == pytest.approx(0.5, abs=1e-5)
    assert len(calls) == 1 + 1 + 3 and calls[0] == (1, 16)  # parity, warm-up, timed runs


def test_baselines_named_without_runners_and_unknown_engines_are_refused(tiny_bundle):
    with pytest.raises(OptionError, match="no runner for baseline.*torch"):
        run_bench(BenchConfig(str(tiny_bundle), ["tvmdeploy", "torch"]))
    with pytest.raises(OptionError, match="unknown engine"):
        run_bench(BenchConfig(str(tiny_bundle), ["tvmdeploy", "tensorrt"]))


def test_timed_reports_warmup_apart_and_every_run():
    ticks = []
    warmup_ms, times = timed(lambda: ticks.append(1), warmup=2, runs=5)
    assert len(ticks) == 7 and times.shape == (5,) and warmup_ms >= 0 and (times >= 0).all()


def test_bench_inputs_are_seeded_and_in_vocabulary(tiny_bundle):
    from tvmdeploy.runtime import Bundle

    bundle = Bundle(tiny_bundle)
    a, b = bench_inputs(bundle, 2, 8), bench_inputs(bundle, 2, 8)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert a["input_ids"].max() < bundle.model["vocab_size"] and a["attention_mask"].all()


def test_bench_times_the_precision_asked_for(tiny_bundle):
    from tvmdeploy.runtime.errors import IncompatibleDeviceError

    config = BenchConfig(str(tiny_bundle), ["tvmdeploy"], [1], [16], 1, 2, precision="fp32")
    (result,) = run_bench(config).results
    assert not result.artifact.endswith("-int8")
    with pytest.raises(IncompatibleDeviceError, match="no int8 artifact"):
        run_bench(BenchConfig(str(tiny_bundle), ["tvmdeploy"], [1], [16], precision="int8"))
