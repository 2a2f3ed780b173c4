"""The CPU decode attention kernel alone (kernels/cpu_paged_attention.py), one layer of
SmolLM2-135M (9 query heads on 3 KV heads of 64), one sequence, over a paged cache with its
pages scattered: microseconds per call at several context lengths, on the calling thread and
split over the thread pool, to place the kernel's `MIN_PARALLEL_KEYS`.

    python bench/decode_attention.py [--keys 32,64,128,300,1000,2000] [--json out.json]

Each time is the best of 5 batches of calls from Python (a call's ~5 us of FFI
included, as a Relax VM's call costs about 1 us). Threads: TVM_NUM_THREADS, else the cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

HEADS, KV_HEADS, HEAD_DIM, PAGE = 9, 3, 64, 16


def _inputs(keys: int):
    """(q, pages, page indptr, page ids, last page length) of one sequence of `keys` keys."""
    import numpy as np

    rng = np.random.default_rng(keys)
    count = math.ceil(keys / PAGE)
    pages = rng.standard_normal((count + 3, 2, KV_HEADS, PAGE, HEAD_DIM)).astype(np.float32)
    ids = rng.permutation(count + 3)[:count].astype(np.int32)
    last = np.array([keys - (count - 1) * PAGE], np.int32)
    q = rng.standard_normal((1, HEADS, HEAD_DIM)).astype(np.float32)
    return q, pages, np.array([0, count], np.int32), ids, last


def time_kernel(kernel, keys: int, calls: int = 300) -> float:
    """Microseconds per call: the best of 5 batches of `calls`."""
    import numpy as np
    import tvm

    args = [tvm.runtime.tensor(x) for x in _inputs(keys)]
    zeros = tvm.runtime.tensor(np.zeros(1, np.int32))
    out = tvm.runtime.tensor(np.zeros((1, HEADS, HEAD_DIM), np.float32))
    lse = tvm.runtime.tensor(np.zeros((1, HEADS), np.float32))

    def call():
        kernel(*args, zeros, zeros, out, lse, 0, 1.0, 10000.0, 1 / math.sqrt(HEAD_DIM))

    for _ in range(20):
        call()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", default="32,64,128,300,1000,2000", help="context lengths")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    import tvm
    from tvmdeploy.compiler.kernels import cpu_paged_attention as cpa

    target = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2"})
    forms = {"serial": 1 << 30, "split": 0}  # min_parallel_keys: never / always split
    kernels = {
        name: tvm.compile(cpa.decode_attention(KV_HEADS, HEADS, HEAD_DIM, PAGE, at), target)
        for name, at in forms.items()
    }
    rows = []
    print(f"threads {os.environ['TVM_NUM_THREADS']}; split from {cpa.MIN_PARALLEL_KEYS} keys")
    print(f"{'keys':>6} {'serial us':>10} {'split us':>10}")
    for keys in (int(k) for k in args.keys.split(",")):
        row = {"keys": keys, **{name: time_kernel(k, keys) for name, k in kernels.items()}}
        rows.append(row)
        print(f"{keys:>6} {row['serial']:>10.1f} {row['split']:>10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": int(os.environ["TVM_NUM_THREADS"]), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
