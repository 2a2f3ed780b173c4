"""Decode step time of several generation bundles (or entries of one), alternated in one process,
so that a shared machine's noise hits each variant alike (issue 28: before/after comparisons).

    python bench/decode_compare.py base=OLD.tvmd new=NEW.tvmd --precision int8 --context 40,300
    python bench/decode_compare.py a=B.tvmd:decode b=B.tvmd:decode1 --json out.json

Each variant is LABEL=BUNDLE[:ENTRY] (ENTRY: decode or decode1; default what the runtime calls
at batch 1). Per round and context, every variant in turn takes a fresh sequence, prefills
`context` fixed ids and times `--steps` decode steps (the whole engine step: begin_forward, the
VM call, end_forward, the logits view); the report is the median step per variant and context
over all rounds, and each variant's ratio to the first.

`--clock cpu` times the calling thread's CPU time instead of the wall clock: on a machine shared
by many processes it leaves out the time the step waits for a core. It counts only work done on
the calling thread, so run it with TVM_NUM_THREADS=1 (one-thread steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def _engine(bundle: Path, precision: str, entry: str | None):
    from tvmdeploy.runtime import load
    from tvmdeploy.runtime.decode_tvm import TvmDecoder
    from tvmdeploy.runtime.probe import probe

    generator = load(bundle, precision=precision)
    engine = TvmDecoder(generator.bundle, generator.choice.artifact, probe(), 1)
    if entry is not None:
        if entry == "decode1" and not engine._decode1:
            raise SystemExit(f"{bundle}: its {generator.choice.artifact} artifact has no decode1")
        engine.step_function = lambda _batch: entry
    engine.open()
    return engine, generator.vocab_size


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def _steps(engine, vocab: int, context: int, steps: int, clock=time.perf_counter) -> list[float]:
    import numpy as np

    prompt = np.array([(7 * k + 3) % vocab for k in range(context)])
    engine.add_sequence(0)
    logits = engine.prefill_whole(0, prompt)
    token = int(np.argmax(logits))
    times = []
    for _ in range(steps):
        t0 = clock()
        logits = engine.decode([0], np.array([token]))
        times.append((clock() - t0) * 1e3)
        token = int(np.argmax(logits[0]))
    engine.remove_sequence(0)
    return times


def compare(variants, precision, contexts, steps, rounds, clock="wall"):
    engines = {label: _engine(path, precision, entry) for label, path, entry in variants}
    times: dict[str, dict[int, list[float]]] = {v: {c: [] for c in contexts} for v in engines}
    for label, (engine, vocab) in engines.items():  # warm-up
        _steps(engine, vocab, contexts[0], 3)
    for _ in range(rounds):
        for context in contexts:
            for label, (engine, vocab) in engines.items():
                times[label][context].extend(_steps(engine, vocab, context, steps, CLOCKS[clock]))
    first = variants[0][0]
    out = {}
    for context in contexts:
        base = statistics.median(times[first][context])
        out[context] = {
            label: {
                "step_ms": statistics.median(times[label][context]),
                "tokens_per_s": 1e3 / statistics.median(times[label][context]),
                "vs_first": base / statistics.median(times[label][context]),
            }
            for label in engines
        }
    return out


def _variant(text: str) -> tuple[str, Path, str | None]:
    label, _, rest = text.partition("=")
    path, _, entry = rest.partition(":")
    if not label or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=BUNDLE[:ENTRY]")
    if entry not in ("", "decode", "decode1"):
        raise argparse.ArgumentTypeError(f"{text!r}: ENTRY is decode or decode1")
    return label, Path(path), entry or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", type=_variant, help="LABEL=BUNDLE[:ENTRY]")
    parser.add_argument("--precision", default="int8", help="fp32 or int8 (default int8)")
    parser.add_argument("--context", default="40,300", help="prompt lengths, comma-separated")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (variants alternated)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall or cpu")
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.context.split(",")]
    report = compare(args.variants, args.precision, contexts, args.steps, args.rounds, args.clock)
    for context, rows in report.items():
        print(f"context {context}:")
        for label, row in rows.items():
            print(
                f"  {label:>12} {row['step_ms']:7.3f} ms/step  {row['tokens_per_s']:6.1f} tok/s"
                f"  x{row['vs_first']:.2f}"
            )
    if args.json:
        from x86_latency import machine_class

        meta = {
            "machine": machine_class()[0],
            "threads": os.environ.get("TVM_NUM_THREADS", ""),
            "precision": args.precision,
            "clock": args.clock,
            "rounds": args.rounds,
            "variants": {
                label: f"{path.name}:{entry or 'runtime'}" for label, path, entry in args.variants
            },
        }
        args.json.write_text(json.dumps({**meta, "contexts": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
