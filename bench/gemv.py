"""The decode GEMVs alone, in GB/s of weights read, at SmolLM2-135M's shapes: with the weights
hot in cache (one copy, called again and again) and cold (copies that together exceed the last
level cache, called in turn, as in a decode step that reads every layer once).

    python bench/gemv.py [--threads 2] [--json]

Cold is what a decode step sees; hot shows the kernel's compute limit.
"""

from __future__ import annotations

import argparse
import json
import os
import time

#: (K, N) of SmolLM2-135M's linear layers: gate_up, qkv, down, o_proj, tied LM head.
SHAPES = [(576, 3072), (576, 960), (1536, 576), (576, 576), (576, 49152)]
COLD_BYTES = 160_000_000


def measure(k: int, n: int, rounds: int) -> dict:
    """Best-of-`rounds` seconds per call, hot and cold, for one shape."""
    import numpy as np
    import tvm
    from tvmdeploy.compiler.kernels import cpu_gemv

    target = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2"})
    lib = tvm.compile(cpu_gemv.int8_gemv(k, n, 8), target=target)
    gemv = lib.mod.get_function(f"int8_gemv_k{k}_n{n}")
    rng = np.random.default_rng(0)
    copies = max(2, COLD_BYTES // (n * k))
    weights = [
        tvm.runtime.tensor(rng.integers(-127, 128, (n, k), dtype=np.int8)) for _ in range(copies)
    ]
    scale = tvm.runtime.tensor(rng.uniform(0.01, 0.1, n).astype(np.float32))
    x = tvm.runtime.tensor(rng.standard_normal((1, k)).astype(np.float32))
    out = tvm.runtime.tensor(np.zeros((1, n), np.float32))
    best = {"hot": float("inf"), "cold": float("inf")}
    for _ in range(rounds):
        for kind, order in (("hot", [weights[0]] * copies), ("cold", weights)):
            start = time.perf_counter()
            for w in order:
                gemv(x, w, scale, out)
            best[kind] = min(best[kind], (time.perf_counter() - start) / len(order))
    return {
        "k": k,
        "n": n,
        **{f"{kind}_us": round(t * 1e6, 1) for kind, t in best.items()},
        **{f"{kind}_gbps": round(n * k / t / 1e9, 1) for kind, t in best.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="TVM_NUM_THREADS (default 2)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, best kept (default 4)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    rows = []
    for k, n in SHAPES:
        rows.append(measure(k, n, args.rounds))
        if not args.json:
            row = rows[-1]
            print(
                f"k{k:>5} n{n:>6}: hot {row['hot_us']:8.1f} us {row['hot_gbps']:5.1f} GB/s"
                f"   cold {row['cold_us']:8.1f} us {row['cold_gbps']:5.1f} GB/s",
                flush=True,
            )
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
