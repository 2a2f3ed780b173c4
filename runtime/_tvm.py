"""Import TVM's runtime alone, without its compiler library and without torch.

`import tvmdeploy.runtime` must stay light: TVM_USE_RUNTIME_LIB=1 keeps libtvm_compiler unloaded,
and tvm_ffi imports torch eagerly when it can, so torch is hidden while TVM itself is imported
(it stays importable afterwards). Where TVM is already imported (for example by the compiler in
the same process), that module is reused as it is.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType


def default_num_threads() -> int:
    """All the cores this process may run on (TVM's own pool defaults to half of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def import_tvm() -> ModuleType:
    """The `tvm` module, imported runtime-only unless it is already loaded."""
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
        import tvm.runtime.vm  # noqa: F401
    finally:
        if hide_torch and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tvm
