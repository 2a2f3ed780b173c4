"""Throughput of one loaded model shared by 1, 2 and 8 threads (a server's worker pool).

Every thread calls the same `Model` with batch 1 inputs of one sequence length; the number is
calls per second over the whole pool, after a warm-up. `--max-concurrency` compares the VM pool
(default: one VM per core) with a single VM (1: calls take turns, as a lock would make them).

    python bench/threads.py BUNDLE [--seq 16] [--seconds 5] [--json bench/results/threads.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from x86_latency import machine_class


def calls_per_second(model, ids: np.ndarray, threads: int, seconds: float) -> float:
    """Calls per second of `threads` threads calling `model` for `seconds`."""
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def work(k: int) -> None:
        while time.perf_counter() < stop:
            model(input_ids=ids)
            counts[k] += 1

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


CONFIGS = {
    "pool": ("tvmdeploy", None),  # one VM per core (the default)
    "one-vm": ("tvmdeploy", 1),  # calls take turns, as a lock would make them
    "onnxruntime": ("onnxruntime", None),
}


def measure_config(
    bundle: str, config: str, seq: int, threads: list[int], seconds: float
) -> list[dict]:
    """Rows for one configuration, measured in this (fresh) process."""
    from tvmdeploy.runtime import load

    engine, concurrency = CONFIGS[config]
    ids = np.random.default_rng(0).integers(0, 1000, (1, seq), dtype=np.int64)
    model = load(
        bundle,
        artifact="onnxruntime" if engine == "onnxruntime" else None,
        max_concurrency=concurrency,
    )
    for _ in range(20):
        model(input_ids=ids)
    label = (
        engine
        if engine == "onnxruntime"
        else (
            f"tvmdeploy ({model.choice.artifact}, " + ("1 VM)" if concurrency == 1 else "VM pool)")
        )
    )
    return [
        {
            "engine": label,
            "threads": n,
            "calls_per_s": round(calls_per_second(model, ids, n, seconds), 1),
        }
        for n in threads
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", default="1,2,8")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = [int(n) for n in args.threads.split(",")]
    if args.config:  # the child: one configuration, rows as JSON on stdout
        print(json.dumps(measure_config(args.bundle, args.config, args.seq, threads, args.seconds)))
        return
    rows = []
    for config in CONFIGS:  # each in a fresh process: a second model in one process measures slower
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                args.bundle,
                "--config",
                config,
                "--seq",
                str(args.seq),
                "--seconds",
                str(args.seconds),
                "--threads",
                args.threads,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        for row in json.loads(done.stdout.strip().splitlines()[-1]):
            rows.append(row)
            print(
                f"{row['engine']:<40} {row['threads']} threads: {row['calls_per_s']:8.1f} calls/s",
                flush=True,
            )
    report = {
        "bundle": Path(args.bundle).name,
        "seq": args.seq,
        "cpu": machine_class()[0],
        "cores": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "loadavg": os.getloadavg(),
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
