"""Prefill tokens/s of several tvmdeploy bundles (or precisions of one), in one process, engines
alternated, best of `--rounds`: the before/after of a prefill kernel change on a shared machine.

    python bench/prefill.py --engine before=old.tvmd:int8 --engine after=new.tvmd:int8 \\
        [--prompts 32,128,512] [--rounds 3] [--output bench/results/prefill.json] [--json]

Each engine is LABEL=BUNDLE:PRECISION; one sequence is prefilled from a fresh cache entry with a
fixed-id prompt of each length (the runtime's `TvmDecoder.prefill`, one call per prompt, under
the bundle's prefill chunk). Ratios between engines are what the numbers say on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.decode_profile import prefill_seconds


def _engine(bundle: Path, precision: str):
    from tvmdeploy.runtime import load
    from tvmdeploy.runtime.decode_tvm import TvmDecoder
    from tvmdeploy.runtime.probe import probe

    generator = load(bundle, precision=precision)
    engine = TvmDecoder(generator.bundle, generator.choice.artifact, probe(), 1)
    engine.open()
    return engine, generator.vocab_size, generator.choice.artifact


def measure(engines: dict, prompts: list[int], rounds: int) -> dict:
    """{label: {prompt length: best seconds}}, the engines alternated within each round."""
    import numpy as np

    best: dict[str, dict[int, float]] = {label: {} for label in engines}
    for _ in range(rounds):
        for n in prompts:
            for label, (engine, vocab, _artifact) in engines.items():
                prompt = np.array([(7 * k + 3) % vocab for k in range(n)])
                prefill_seconds(engine, prompt[: min(n, 8)])  # warm the thread pool
                s = prefill_seconds(engine, prompt)
                best[label][n] = min(best[label].get(n, s), s)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--engine", action="append", required=True, help="LABEL=BUNDLE:PRECISION (repeat)"
    )
    parser.add_argument("--prompts", default="32,128,512", help="prompt lengths, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, help="write the results JSON here")
    parser.add_argument("--json", action="store_true", help="print the results JSON on stdout")
    args = parser.parse_args(argv)
    prompts = [int(p) for p in args.prompts.split(",")]
    engines = {}
    for spec in args.engine:
        label, _, rest = spec.partition("=")
        bundle, _, precision = rest.rpartition(":")
        if not label or not bundle or not precision:
            raise SystemExit(f"--engine {spec!r}: give LABEL=BUNDLE:PRECISION")
        engines[label] = _engine(Path(bundle), precision)
    best = measure(engines, prompts, args.rounds)
    report = {
        "machine": platform.processor() or platform.machine(),
        "threads": os.environ.get("TVM_NUM_THREADS"),
        "load_average": os.getloadavg(),
        "rounds": args.rounds,
        "engines": {
            label: {
                "artifact": engines[label][2],
                "prefill_ms": {n: 1e3 * s for n, s in best[label].items()},
                "prefill_tokens_per_s": {n: n / s for n, s in best[label].items()},
            }
            for label in engines
        },
    }
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("engine".ljust(16) + "".join(f"{n:>10d}" for n in prompts) + "  (prefill tok/s)")
        for label, row in report["engines"].items():
            rates = row["prefill_tokens_per_s"]
            print(label.ljust(16) + "".join(f"{rates[n]:10.1f}" for n in prompts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
