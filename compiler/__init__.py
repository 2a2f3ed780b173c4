"""tvmdeploy's compiler: export, import, tune, build, verify and package a model into a bundle.

One stage per module; `compile.compile_model` composes them and `cli` is a thin skin over it.
"""

import os as _os

from tvmdeploy.runtime._tvm import default_num_threads as _default_num_threads

# TVM's thread pool starts with half the cores unless told otherwise; set it before TVM loads.
_os.environ.setdefault("TVM_NUM_THREADS", str(_default_num_threads()))
_os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
# The compiler needs TVM's full library; say so before anything (e.g. the device probe) imports
# TVM, which would otherwise load the runtime-only library in this process.
_os.environ["TVM_USE_RUNTIME_LIB"] = "0"
