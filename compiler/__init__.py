"""tvmdeploy's compiler: export, import, tune, build, verify and package a model into a bundle.

The public API (`compile_model`, `CompileOptions`, `tune_model`, `TuneOptions`) is loaded on first
use, so `import tvmdeploy.compiler` (and with it the `tvmdeploy` command's device-side commands)
stays light: no torch, onnx or TVM is imported here. See docs/design.md for the layout.
"""

import importlib as _importlib
import os as _os

from tvmdeploy.runtime._tvm import default_num_threads as _default_num_threads

# TVM's thread pool starts with half the cores unless told otherwise; set it before TVM loads.
_os.environ.setdefault("TVM_NUM_THREADS", str(_default_num_threads()))
_os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
# The compiler needs TVM's full library; say so before anything (e.g. the device probe) imports
# TVM, which would otherwise load the runtime-only library in this process. Setting a variable
# loads nothing: the device-side CLI commands reset it before they import TVM (cli.py).
_os.environ["TVM_USE_RUNTIME_LIB"] = "0"

_API = {
    "compile_model": ".drivers.compile",
    "CompileOptions": ".drivers.compile",
    "tune_model": ".drivers.tune",
    "TuneOptions": ".drivers.tune",
}

__all__ = ["CompileOptions", "TuneOptions", "compile_model", "tune_model"]


def __getattr__(name: str):
    """Load a public name's module on first use (PEP 562)."""
    if name in _API:
        # TVM before the stages import it, without torch (runtime/_tvm.py: 2 s of every
        # `tvmdeploy compile`/`tune` start); the export stage imports torch when it runs.
        from tvmdeploy.runtime._tvm import import_tvm

        import_tvm()
        return getattr(_importlib.import_module(_API[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
