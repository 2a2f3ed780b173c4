"""Runs inside the emulated aarch64 Python (see qemu.py): one process for all cases of a library.

It imports only numpy and TVM's runtime (the sysroot has no tvmdeploy), reads `spec.json`,
`params.bin` and `inputs.npz` from the work directory and writes `outputs.npz` there.
Usage: python qemu_worker.py LIB_SO WORK_DIR
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.environ["TVMDEPLOY_ARM_SITE"])

import numpy as np
import tvm
import tvm.runtime.vm


def main(lib_path: str, work_dir: str) -> None:
    work = Path(work_dir)
    spec = json.loads((work / "spec.json").read_text())
    loaded = tvm.runtime.load_param_dict((work / "params.bin").read_bytes())
    raw = [loaded[name] for name in spec["param_names"]]
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(lib_path), tvm.cpu())
    params = raw
    if vm.module.implements_function("transform_params"):  # packed weights (runtime/_tvm.py)
        params = list(vm["transform_params"](*raw))
    outputs = {}
    with np.load(work / "inputs.npz") as inputs:
        for k, case in enumerate(spec["cases"]):
            args = [tvm.runtime.tensor(inputs[key]) for key in case["inputs"]]
            weights = raw if case.get("raw_weights") else params  # the fallback reads them raw
            result = vm[case["function"]](*args, *weights)
            values = [result.numpy()] if hasattr(result, "numpy") else [o.numpy() for o in result]
            outputs.update({f"c{k}.o{j}": value for j, value in enumerate(values)})
    np.savez(work / "outputs.npz.tmp.npz", **outputs)
    os.replace(work / "outputs.npz.tmp.npz", work / "outputs.npz")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
