"""Import TVM without torch: the runtime alone, or (for the compiler) the full library.

`import tvmdeploy.runtime` must stay light: TVM_USE_RUNTIME_LIB=1 keeps libtvm_compiler unloaded.
tvm_ffi imports torch eagerly when it can (2 of `import tvm`'s 3 s on a 2-core Zen 3), though
nothing in TVM needs it, so torch is hidden while TVM itself is imported, by the runtime and by
the compiler alike; it stays importable afterwards (the export stage imports it when it runs).
Where TVM is already imported (for example by the compiler in the same process), that module is
reused as it is.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

#: Relax function of CPU artifacts that packs the weights for the artifact's kernels
#: (compiler/kernels/pack_weights.py makes it); run once when the weights are loaded.
TRANSFORM_PARAMS = "transform_params"
#: A decoder's weight work for `prefill` alone (an int4 artifact's prompt weights, in int8): its
#: outputs are what `prefill` takes; the decode steps take the weights as stored.
PREFILL_TRANSFORM = "prefill_transform_params"


def prepare_params(vm, params: list) -> list:
    """The weights in the layout this artifact's kernels read.

    The bundle stores each weight once, as exported. A CPU artifact packs its matmul weights for its
    own vector width in `transform_params`, so it runs here, once per load (not per call); an
    artifact without it takes the weights as stored.
    """
    if not vm.module.implements_function(TRANSFORM_PARAMS):
        return list(params)
    return list(vm[TRANSFORM_PARAMS](*params))


def default_num_threads() -> int:
    """All the cores this process may run on (TVM's own pool defaults to half of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def import_tvm() -> ModuleType:
    """The `tvm` module, imported without torch; runtime-only unless the compiler asked for the
    full library (TVM_USE_RUNTIME_LIB=0) or it is already loaded."""
    if "tvm" in sys.modules:
        return sys.modules["tvm"]
    os.environ.setdefault("TVM_NUM_THREADS", str(default_num_threads()))
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail
    try:
        import tvm
        import tvm.runtime.vm
    finally:
        if hide_torch and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    _load_cuda_runtime()
    return tvm


def _load_cuda_runtime() -> None:
    """Load TVM's CUDA runtime (device API, CUDA module loader) where this host can.

    Runtime-only TVM skips backend autoloading, so without this no CUDA device is visible and no
    CUDA artifact can be loaded. It needs the NVIDIA driver (libcuda.so.1) and the CUDA 13 runtime
    (libcudart.so.13); without them there is simply no GPU for tvmdeploy, as on a CPU-only host.
    """
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" in _LOADED_LIBS:  # full TVM loads it in tvm.backend.cuda
        return
    from pathlib import Path

    from tvm_ffi.libinfo import load_lib_ctypes

    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm",
            target_name="tvm_runtime_cuda",
            extra_lib_paths=[Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent],
            mode="RTLD_LOCAL",
        )
    except (OSError, RuntimeError):  # no driver or CUDA runtime here, or a TVM built without CUDA
        pass
