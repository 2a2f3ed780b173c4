"""The per-call floor: a 2-layer BERT (hidden 32, the test suite's tiny model) at batch 1 x seq 16,
where the work is a few microseconds and the call's own overhead is the time.

tvmdeploy through `compile` + `load()` + `Model.__call__` (input checks, bucket choice, staging,
the Relax VM call, output copies) against ONNX Runtime on the bundle's own `model.onnx` with the
same threads, interleaved in one process, the best round's median kept (other load only adds
time). Beside the total, two parts of tvmdeploy's call timed alone: `Model.validate` (input
checks) and the engine's `run` (staging the inputs + the Relax VM call + output copies).

    python bench/floor.py             # -t host, writes bench/results/floor-MACHINE-TARGET.json
    python bench/floor.py --target x86-64-v3 --calls 5000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from x86_latency import ROOT, log, machine_class

sys.path.insert(0, str(ROOT))
# The test suite's own tiny model and buckets (1x16 is an exact fit: no padding).
from tests.conftest import TINY_BUCKETS as BUCKETS
from tests.conftest import save_tiny_bert


def median_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="host", help="profile to compile for (default host)")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per round and engine")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="result file (default bench/results/floor-…)")
    args = parser.parse_args()

    import onnxruntime as ort
    from tvmdeploy.compiler import CompileOptions, compile_model
    from tvmdeploy.runtime import load
    from tvmdeploy.runtime._tvm import default_num_threads
    from tvmdeploy.runtime.inputs import synthetic_inputs

    threads = default_num_threads()
    title, slug = machine_class()
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        work = Path(tmp)
        log(f"compile -t {args.target} --buckets {BUCKETS!r}")
        bundle = compile_model(
            CompileOptions(
                model=str(save_tiny_bert(work / "tiny-bert")),
                output=str(work / "tiny.tvmd"),
                profiles=[args.target],
                buckets=BUCKETS,
            )
        )
        model = load(bundle, precision="fp32")
        vocab = int(model.bundle.model["vocab_size"])
        feeds = synthetic_inputs(model.input_names, vocab, 1, args.seq)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(
            str(Path(bundle) / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        arrays = model.validate(feeds)
        bucket = model.bucket_for(1, args.seq)
        padded = model.pad(arrays, bucket)
        engines = {
            "tvmdeploy": lambda: model(**feeds),
            "onnxruntime": lambda: session.run(None, feeds),
            "validate": lambda: model.validate(feeds),
            "engine.run": lambda: model.engine.run(bucket, padded),
        }
        for fn in engines.values():  # warm-up: first calls build the VMs' staged inputs
            for _ in range(50):
                fn()
        best: dict[str, float] = {}
        for round_ in range(args.rounds):
            log(f"round {round_ + 1} of {args.rounds}")
            for name, fn in engines.items():
                best[name] = min(best.get(name, float("inf")), median_ms(fn, args.calls))
        ours = model.choice.artifact
        np.testing.assert_allclose(  # the two engines compute the same thing
            model(**feeds)["logits"], session.run(None, feeds)[0], rtol=1e-4, atol=1e-4
        )
    result = {
        "machine": title,
        "artifact": ours,
        "threads": threads,
        "shape": f"1x{args.seq}",
        "calls": args.calls,
        "rounds": args.rounds,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "ms": {name: round(ms, 4) for name, ms in best.items()},
        "vs_onnxruntime": round(best["tvmdeploy"] / best["onnxruntime"], 3),
        "command": "python bench/floor.py " + " ".join(sys.argv[1:]),
    }
    out = args.json or ROOT / "bench" / "results" / f"floor-{slug}-{args.target}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{title}, {ours}, 1x{args.seq}, {threads} threads, median of {args.calls} calls:")
    print(f"  tvmdeploy   {best['tvmdeploy']:.4f} ms  ({result['vs_onnxruntime']:.2f}x ORT)")
    print(f"    validate  {best['validate']:.4f} ms")
    print(f"    engine    {best['engine.run']:.4f} ms (staging + VM + outputs)")
    print(f"  onnxruntime {best['onnxruntime']:.4f} ms")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
