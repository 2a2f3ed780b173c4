"""TVM's tensor intrinsics, one CPU family at a time (the package registers all of them)."""

from __future__ import annotations

import importlib
import importlib.util
import sys


def import_tensor_intrinsics(family: str = "x86") -> None:
    """Register the tensor intrinsics of one CPU family only.

    `import tvm.s_tir.tensor_intrin` (which MetaSchedule's TuneContext and LocalBuilder do in
    every process, and importing any of its submodules does) registers every intrinsic TVM has,
    CUDA's hundreds included, by parsing TVMScript: 30-90 s on two shared cores, most of what a
    tuning process spent before its first trial; 5.7 s of every int8 compile on a quiet 2-core
    Zen 3 (0.8 s this way). The package is entered without running its `__init__`, and only the
    submodule the profile's schedule rules use is imported; code that needs another family's
    intrinsics imports that submodule itself (as DLight's GPU rules do), which still works.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        import tvm.s_tir

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return
        package = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run
        sys.modules[name] = package
        tvm.s_tir.tensor_intrin = package
    submodule = {"x86": "x86", "arm": "arm_cpu"}.get(family)
    if submodule:
        importlib.import_module(f"{name}.{submodule}")
