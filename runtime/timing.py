"""Device-side timing: a bundle's latency on this device (or a remote one), in one process.

A benchmark is a config in and a report out (`BenchConfig` → `BenchReport`, versioned JSON), as
optimum-benchmark does it: warm-up reported apart from timed runs, p50/p90/p99/mean/std and
sequences per second, and each engine's parity against ONNX Runtime on the inputs it was timed
on. Baselines (PyTorch, ONNX Runtime as a user runs it) are tooling, not device code: the caller
passes them in as runners (`compiler/tooling/baselines.py` makes them), so this module never imports
torch or transformers.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_json_atomic
from .bundle import Bundle
from .engine import OnnxRuntimeEngine
from .errors import InputError, OptionError, TvmdeployError
from .inputs import synthetic_inputs
from .probe import probe
from .remote import RpcTarget

#: A baseline: token arrays in, the first output out (e.g. PyTorch eager on the source model).
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]

SCHEMA = "tvmdeploy.bench"
SCHEMA_VERSION = 1
ENGINES = ("tvmdeploy", "onnxruntime", "torch")


@dataclass
class BenchConfig:
    bundle: str
    engines: list[str] = field(default_factory=lambda: ["tvmdeploy"])
    batches: list[int] = field(default_factory=lambda: [1])
    seqs: list[int] = field(default_factory=lambda: [32, 128])
    warmup: int = 5
    runs: int = 30
    artifact: str | None = None  # force a tvmdeploy artifact
    torch_model: str | None = (
        None  # HF directory for the PyTorch baseline (default: manifest source)
    )
    rpc: str | None = None  # HOST:PORT of a TVM RPC tracker: time tvmdeploy on a remote device
    rpc_key: str | None = None  # the device's key at that tracker
    rpc_timeout: float = 600.0  # seconds the remote session may last
    precision: str = "auto"  # the tvmdeploy artifact's precision, as load(precision=...) takes


@dataclass
class BenchResult:
    engine: str
    artifact: str | None
    batch: int
    seq: int
    warmup: int
    runs: int
    warmup_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    throughput_per_s: float  # sequences per second
    parity: dict[str, Any]


@dataclass
class BenchReport:
    device: dict[str, Any]
    bundle: dict[str, Any]
    config: dict[str, Any]
    results: list[BenchResult]
    created: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "device": self.device,
            "bundle": self.bundle,
            "config": self.config,
            "results": [asdict(r) for r in self.results],
        }

    def write(self, path: str | Path) -> Path:
        """Write the JSON atomically."""
        return write_json_atomic(path, self.to_dict(), indent=2)


def timed(fn: Callable[[], Any], warmup: int, runs: int) -> tuple[float, np.ndarray]:
    """Warm-up time (ms, total) and the per-run latencies (ms)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    warmup_ms = (time.perf_counter() - start) * 1e3
    times = np.empty(runs)
    for k in range(runs):
        start = time.perf_counter()
        fn()
        times[k] = (time.perf_counter() - start) * 1e3
    return warmup_ms, times


def summarize(
    engine: str,
    artifact: str | None,
    batch: int,
    seq: int,
    warmup: int,
    warmup_ms: float,
    times: np.ndarray,
    parity: dict[str, Any],
) -> BenchResult:
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    mean = float(times.mean())
    return BenchResult(
        engine,
        artifact,
        batch,
        seq,
        warmup,
        len(times),
        warmup_ms,
        float(p50),
        float(p90),
        float(p99),
        mean,
        float(times.std()),
        batch * 1e3 / mean,
        parity,
    )


def make_report(
    device: dict[str, Any], model, config: BenchConfig, results: list[BenchResult]
) -> BenchReport:
    """The report for `results` measured with `model` on `device`."""
    bundle = model.bundle
    return BenchReport(
        device=device,
        bundle={
            "name": bundle.name,
            "identity": bundle.identity,
            "path_name": bundle.path.name,
            "choice": str(model.choice),
        },
        config=asdict(config),
        results=results,
    )


def bench_inputs(bundle: Bundle, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The token arrays every engine is timed on (seeded ids, full mask)."""
    names = [i["name"] for i in bundle.inputs]
    return synthetic_inputs(names, int(bundle.model["vocab_size"]), batch, seq, seed)


def run_bench(
    config: BenchConfig,
    progress: Callable[[str], None] = lambda _: None,
    baselines: Mapping[str, Runner] | None = None,
) -> BenchReport:
    """Benchmark tvmdeploy, and the given baseline runners, at every (batch, seq) of `config`
    (tvmdeploy alone on a remote device with `config.rpc`).

    `config.engines` names what to time; every name but "tvmdeploy" needs a runner in `baselines`.
    """
    from .model import load

    unknown = set(config.engines) - set(ENGINES)
    if unknown:
        raise OptionError(f"unknown engine(s) {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    if config.rpc or config.rpc_key:
        return run_remote_bench(config, progress)
    missing = [e for e in config.engines if e != "tvmdeploy" and e not in (baselines or {})]
    if missing:
        raise OptionError(
            f"no runner for baseline(s) {', '.join(missing)}: baselines come from "
            "tvmdeploy.compiler.tooling.baselines (pip install 'tvmdeploy[compile]')"
        )
    model = load(config.bundle, artifact=config.artifact, precision=config.precision)
    bundle = model.bundle
    reference = OnnxRuntimeEngine(bundle)
    first_output = bundle.outputs[0]["name"]
    runners: dict[str, Runner] = {}
    for engine in config.engines:
        if engine == "tvmdeploy":
            runners[engine] = lambda a: model(**a)[first_output]
        else:
            runners[engine] = baselines[engine]
    results = []
    for batch in config.batches:
        for seq in config.seqs:
            arrays = bench_inputs(bundle, batch, seq)
            expected = reference.run(None, arrays)[0]
            for engine, run in runners.items():
                progress(f"{engine} batch {batch} seq {seq}")
                diff = float(np.abs(run(arrays) - expected).max())
                warmup_ms, times = timed(
                    lambda run=run, arrays=arrays: run(arrays), config.warmup, config.runs
                )
                artifact = model.choice.artifact if engine == "tvmdeploy" else None
                parity = {"reference": "onnxruntime", "max_abs_diff": diff}
                results.append(
                    summarize(engine, artifact, batch, seq, config.warmup, warmup_ms, times, parity)
                )
    return make_report(probe().to_dict(), model, config, results)


def run_remote_bench(
    config: BenchConfig, progress: Callable[[str], None] = lambda _: None
) -> BenchReport:
    """tvmdeploy on the device behind `config.rpc_key`, timed there by `time_evaluator`.

    The p50/p90/p99 are the bucket function alone on the device (inputs already uploaded, outputs
    left there), so network latency is excluded; warm-up is timed the same way. Parity is against
    ONNX Runtime on this machine, on the outputs downloaded from a separate run. Baselines are
    refused rather than timed here: a report's rows are all about one device, so bench them in a
    run without --rpc and merge both JSONs with `tvmdeploy report`.
    """
    from .remote import load_remote

    RpcTarget.from_options(config.rpc, config.rpc_key)  # both or neither, HOST:PORT
    baselines = [e for e in config.engines if e != "tvmdeploy"]
    if baselines:
        raise TvmdeployError(
            f"baselines ({', '.join(baselines)}) run only on this machine, not over RPC: bench "
            f"them in a "
            "separate run without --rpc (or pass --compare '') and merge the JSONs with `tvmdeploy "
            "report`"
        )
    model = load_remote(
        config.bundle,
        config.rpc,
        config.rpc_key,
        artifact=config.artifact,
        session_timeout=config.rpc_timeout,
    )
    bundle, engine = model.bundle, model.engine
    reference = OnnxRuntimeEngine(bundle)
    results = []
    for batch in config.batches:
        for seq in config.seqs:
            arrays = bench_inputs(bundle, batch, seq)
            try:
                bucket = model.bucket_for(batch, seq)
            except InputError as err:
                raise InputError(
                    f"{err}; over RPC each case is one bucket call (larger batches are not "
                    "split): choose a smaller --batch"
                ) from None
            progress(f"tvmdeploy via RPC batch {batch} seq {seq}")
            got = model(**arrays)[bundle.outputs[0]["name"]]
            diff = float(np.abs(got - reference.run(None, arrays)[0]).max())
            warmup_ms, times = engine.time(
                bucket, model.pad(model.validate(arrays), bucket), config.warmup, config.runs
            )
            parity = {"reference": "onnxruntime", "max_abs_diff": diff}
            results.append(
                summarize(
                    "tvmdeploy",
                    model.choice.artifact,
                    batch,
                    seq,
                    config.warmup,
                    warmup_ms,
                    times,
                    parity,
                )
            )
    device = engine.session.device
    engine.close()
    return make_report(device.to_dict(), model, config, results)
