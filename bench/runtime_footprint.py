"""How thin is the runtime? Time `import tvmdeploy.runtime`, `load()` and a first call, and the
resident memory after each, in fresh processes (as a user's program would see it).

    python bench/runtime_footprint.py BUNDLE [--repeat 5] \
        [--out bench/results/runtime_footprint.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, sys, time
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
t0 = time.perf_counter(); base = rss_mib()
import numpy as np
import tvmdeploy.runtime as rt
t1 = time.perf_counter(); after_import = rss_mib()
model = rt.load(sys.argv[1])
t2 = time.perf_counter(); after_load = rss_mib()
model(input_ids=np.ones((1, 32), np.int64))
t3 = time.perf_counter(); after_call = rss_mib()
HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "optimum")
heavy = sorted(m for m in HEAVY if m in sys.modules)
maps = open("/proc/self/maps").read()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_call_s": t3 - t2,
  "rss_start_mib": base, "rss_import_mib": after_import, "rss_load_mib": after_load,
  "rss_call_mib": after_call, "choice": str(model.choice), "heavy_modules": heavy,
  "tvm_compiler_lib_loaded": "libtvm_compiler" in maps}))
"""


def measure(bundle: str, repeat: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVM_")}
    runs = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-c", PROBE, bundle],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = [k for k in runs[0] if k.endswith(("_s", "_mib"))]
    summary = {k: statistics.median(r[k] for r in runs) for k in keys}
    weights = sum(f.stat().st_size for f in Path(bundle, "weights").iterdir()) / 2**20
    return {
        "bundle": Path(bundle).name,
        "repeat": repeat,
        "median": summary,
        "weights_mib": weights,
        "choice": runs[0]["choice"],
        "heavy_modules": runs[0]["heavy_modules"],
        "tvm_compiler_lib_loaded": runs[0]["tvm_compiler_lib_loaded"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="bench/results/runtime_footprint.json")
    args = parser.parse_args()
    result = measure(args.bundle, args.repeat)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    m = result["median"]
    print(
        f"| import tvmdeploy.runtime | {m['import_s'] * 1e3:.0f} ms "
        f"| {m['rss_import_mib']:.0f} MiB RSS |"
    )
    print(
        f"| load() ({result['choice'].split(':')[0]}) | {m['load_s'] * 1e3:.0f} ms "
        f"| {m['rss_load_mib']:.0f} MiB RSS "
        f"(weights {result['weights_mib']:.0f} MiB) |"
    )
    print(
        f"| first call, 1x32 | {m['first_call_s'] * 1e3:.0f} ms | {m['rss_call_mib']:.0f} MiB RSS |"
    )
    print(
        f"heavy modules loaded: {result['heavy_modules'] or 'none'}; "
        f"TVM compiler library loaded: {result['tvm_compiler_lib_loaded']}"
    )


if __name__ == "__main__":
    main()
