"""The runtime stays thin: no torch, transformers, onnx, nor TVM's compiler library."""

import json
import os
import subprocess
import sys

SCRIPT = """
import json, sys, numpy as np
import tvmdeploy.runtime as rt
LIGHT = ("torch", "transformers", "onnx", "optimum", "tvm")
after_import = sorted(m for m in LIGHT if m in sys.modules)
model = rt.load(sys.argv[1], artifact=sys.argv[2])
model(input_ids=np.ones((1, 8), np.int64))
HEAVY = ("torch", "transformers", "onnx", "optimum", "onnxruntime")
heavy = sorted(m for m in HEAVY if m in sys.modules)
maps = open("/proc/self/maps").read()
import os
print(json.dumps({"after_import": after_import, "heavy": heavy,
                  "threads": os.environ.get("TVM_NUM_THREADS"),
                  "compiler_lib": "libtvm_compiler" in maps,
                  "runtime_lib": "libtvm_runtime" in maps}))
"""


def test_runtime_loads_no_compiler(tiny_bundle):
    from tvmdeploy.runtime import Bundle

    profile = Bundle(tiny_bundle).artifacts[0].profile
    # A user's process: none of the variables the compiler (imported by this test session) sets.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TVM_", "TVMDEPLOY_"))}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_bundle), profile],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["after_import"] == []
    assert result["heavy"] == []
    assert result["runtime_lib"] and not result["compiler_lib"]
    assert result["threads"] == str(len(os.sched_getaffinity(0)))  # all cores, not TVM's half
