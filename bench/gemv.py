"""The decode GEMVs alone, in GB/s of weights read, at SmolLM2-135M's shapes: with the weights
hot in cache (one copy, called again and again) and cold (copies that together exceed the last
level cache, called in turn, as in a decode step that reads every layer once).

    python bench/gemv.py [--threads 2] [--kernels int8,int4,w4a8,w8a8] [--json]

Cold is what a decode step sees; hot shows the kernel's compute limit. The kernels are timed in
turn per shape (so machine noise hits both alike); int4 bytes are the packed nibbles plus its
fp16 scale and min planes (0.625 bytes a weight), int8's the weights plus one scale a row.
`w4a8` and `w8a8` (kernels/cpu_gemv_a8.py) read int4's and int8's weights with the activation
row quantized to int8; their time includes that quantization, a second call per GEMV, as in a
decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import time

#: (K, N) of SmolLM2-135M's linear layers: gate_up, qkv, down, o_proj, tied LM head.
SHAPES = [(576, 3072), (576, 960), (1536, 576), (576, 576), (576, 49152)]
COLD_BYTES = 160_000_000


def _kernel(name: str, k: int, n: int):
    """(the compiled GEMV, [weight argument lists, cold copies], bytes read per call)."""
    import numpy as np
    import tvm
    from tvmdeploy.compiler.kernels import cpu_gemv, cpu_gemv_a8, cpu_gemv_int4

    target = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2"})
    rng = np.random.default_rng(0)
    if name == "int8":
        lib = tvm.compile(cpu_gemv.int8_gemv(k, n, 8), target=target)
        size = n * k + 4 * n

        def weights():
            scale = rng.uniform(0.01, 0.1, n).astype(np.float32)
            return [rng.integers(-127, 128, (n, k), dtype=np.int8), scale]
    elif name in ("w4a8", "w8a8"):
        bits = 4 if name == "w4a8" else 8
        layout = cpu_gemv_a8.layout_for("avx2", bits)
        make = cpu_gemv_a8.w4a8_gemv if bits == 4 else cpu_gemv_a8.w8a8_gemv
        mod = tvm.IRModule(
            {
                "quantize": cpu_gemv_a8.quantize_activations(k, layout),
                "gemv": make(k, n, "avx2"),
            }
        )
        lib = tvm.compile(mod, target=target)
        quantize = lib.mod.get_function(f"a8_quantize_{layout}_k{k}")
        gemv = lib.mod.get_function(f"{name}_gemv_avx2_k{k}_n{n}")
        xq = tvm.runtime.tensor(np.zeros((1, k), np.int8))
        sx4 = tvm.runtime.tensor(np.zeros((1, k // 8), np.float32))
        xs = tvm.runtime.tensor(np.zeros((1, k // 32), np.float32))
        activations = [xq, sx4, xs] if bits == 4 else [xq, sx4]

        def call(x, *weights_and_out):
            quantize(x, xq, sx4, xs)
            gemv(*activations, *weights_and_out)

        if bits == 4:
            size = n * k // 2 + 2 * 2 * n * (k // 32)

            def weights():
                d = rng.uniform(0.01, 0.1, (n, k // 32)).astype(np.float16)
                return [rng.integers(0, 256, (n, k // 2), dtype=np.uint8), d, -8 * d]
        else:
            size = n * k + 4 * n

            def weights():
                scale = rng.uniform(0.01, 0.1, n).astype(np.float32)
                return [rng.integers(-127, 128, (n, k), dtype=np.int8), scale]

        copies = max(2, COLD_BYTES // size)
        sets = [[tvm.runtime.tensor(a) for a in weights()] for _ in range(copies)]
        return call, sets, size
    else:
        lib = tvm.compile(cpu_gemv_int4.int4_gemv(k, n, 8), target=target)
        size = n * k // 2 + 2 * 2 * n * (k // 32)

        def weights():
            d = rng.uniform(0.01, 0.1, (n, k // 32)).astype(np.float16)
            return [rng.integers(0, 256, (n, k // 2), dtype=np.uint8), d, -8 * d]

    copies = max(2, COLD_BYTES // size)
    sets = [[tvm.runtime.tensor(a) for a in weights()] for _ in range(copies)]
    return lib.mod.get_function(f"{name}_gemv_k{k}_n{n}"), sets, size


def measure(k: int, n: int, rounds: int, kernels: list[str]) -> list[dict]:
    """Best-of-`rounds` seconds per call, hot and cold, for one shape, per kernel (alternated)."""
    import numpy as np
    import tvm

    x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((1, k)).astype(np.float32))
    out = tvm.runtime.tensor(np.zeros((1, n), np.float32))
    loaded = {name: _kernel(name, k, n) for name in kernels}
    best = {name: {"hot": float("inf"), "cold": float("inf")} for name in kernels}
    for _ in range(rounds):
        for name, (gemv, sets, _) in loaded.items():
            for kind, order in (("hot", [sets[0]] * len(sets)), ("cold", sets)):
                start = time.perf_counter()
                for w in order:
                    gemv(x, *w, out)
                best[name][kind] = min(best[name][kind], (time.perf_counter() - start) / len(order))
    return [
        {
            "kernel": name,
            "k": k,
            "n": n,
            **{f"{kind}_us": round(t * 1e6, 1) for kind, t in best[name].items()},
            **{
                f"{kind}_gbps": round(loaded[name][2] / t / 1e9, 1)
                for kind, t in best[name].items()
            },
        }
        for name in kernels
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="TVM_NUM_THREADS (default 2)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, best kept (default 4)")
    parser.add_argument(
        "--kernels", default="int8,int4,w4a8,w8a8", help="int8, int4, w4a8, w8a8 (default: all)"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    kernels = [name.strip() for name in args.kernels.split(",") if name.strip()]
    if not kernels or set(kernels) - {"int8", "int4", "w4a8", "w8a8"}:
        raise SystemExit(f"--kernels {args.kernels!r}: choose from int8, int4, w4a8, w8a8")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    rows = []
    for k, n in SHAPES:
        for row in measure(k, n, args.rounds, kernels):
            rows.append(row)
            if not args.json:
                print(
                    f"{row['kernel']} k{k:>5} n{n:>6}: hot {row['hot_us']:8.1f} us "
                    f"{row['hot_gbps']:5.1f} GB/s   cold {row['cold_us']:8.1f} us "
                    f"{row['cold_gbps']:5.1f} GB/s",
                    flush=True,
                )
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
