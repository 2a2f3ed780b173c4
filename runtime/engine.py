"""Engines: what runs a bundle on a device. A compiled artifact on TVM's Relax VM, or ONNX Runtime.

Every engine has the same small interface (`Engine`), so the model session, the bench and the
remote path treat them alike. `fixed_shapes` says whether the engine runs only the bundle's
bucket shapes (the session then pads to a bucket and slices the outputs back) or any shape.

Thread safety: a Relax `VirtualMachine` keeps its call frames and registers in the instance, so
two threads calling one VM at once corrupt each other (the crash seen in
`StorageObj::AllocTensor`). `TvmEngine` therefore keeps a bounded pool of VMs over one loaded
library and one set of (packed) weights: each call takes an idle VM, or makes one while fewer
than `max_concurrency` exist, or waits for one to come back. Weights are read-only inputs, so
all VMs share them.

fork(): TVM's parallel kernels run on a thread pool that belongs to the calling thread. In a child
process (gunicorn `--preload`, multiprocessing's fork) the thread that called fork() keeps a pool
whose worker threads did not survive, and any kernel it launches waits forever; threads started
in the child get pools of their own and work. So in a child the engine resets its VM pool (VMs
held by threads that no longer exist are gone) and runs calls from the forking thread on a
helper thread of the child's own.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from ._tvm import TRANSFORM_PARAMS, default_num_threads, import_tvm, prepare_params
from .bundle import Bucket, Bundle
from .errors import BundleError
from .probe import DeviceInfo

Arrays = dict[str, np.ndarray]

#: In a forked child: the thread that called fork() (its TVM thread pool is stale), a lock for the
#: engines' one-time reset, and the child's helper threads. Set by `os.register_at_fork`.
_fork_state: dict[str, Any] = {"forking_thread": None, "lock": threading.Lock(), "helper": None}


def _after_fork_in_child() -> None:
    _fork_state.update(forking_thread=threading.get_ident(), lock=threading.Lock(), helper=None)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _on_a_live_pool(fn, *args):
    """`fn(*args)`, moved to a helper thread when called on a forked child's forking thread."""
    if threading.get_ident() != _fork_state["forking_thread"]:
        return fn(*args)
    with _fork_state["lock"]:
        if _fork_state["helper"] is None:
            _fork_state["helper"] = ThreadPoolExecutor(
                default_num_threads(), thread_name_prefix="tvmdeploy-forked"
            )
    return _fork_state["helper"].submit(fn, *args).result()


class Engine(Protocol):
    """Runs validated int64 arrays of one bucket (or any shape, when not `fixed_shapes`)."""

    #: True when only the bundle's bucket shapes can run (inputs are padded to a bucket).
    fixed_shapes: bool

    def run(self, bucket: Bucket | None, arrays: Arrays) -> list[np.ndarray]:
        """The model's outputs, in the bundle's output order."""
        ...


def cuda_index(requires: dict[str, Any], device: DeviceInfo) -> int:
    """The first GPU that meets the artifact's compute capability (not simply GPU 0)."""
    need = int(requires.get("cuda_arch", 0))
    return next((c.index for c in device.cuda if c.compute_capability >= need), 0)


def read_weights(bundle: Bundle, artifact, device) -> list:
    """The artifact's weights from the bundle (checksum checked), in the order its functions take
    them, on `device` (a TVM device)."""
    tvm = import_tvm()
    entry = bundle.weights_entry(artifact.weights)
    path = bundle.file(entry["file"])
    by_name = tvm.runtime.load_param_dict_from_file(str(path))
    missing = [n for n in entry["names"] if n not in by_name]
    if missing:
        raise BundleError(f"{path}: weights {missing[:3]} are missing; recompile the bundle")
    if artifact.is_gpu:
        return [by_name[n].copyto(device) for n in entry["names"]]
    return [by_name[n] for n in entry["names"]]


class TvmEngine:
    """Runs one compiled artifact with TVM's Relax VM; weights are loaded once, shared by buckets
    and by every VM of the pool (see the module docstring)."""

    fixed_shapes = True

    def __init__(
        self, bundle: Bundle, profile: str, device: DeviceInfo, max_concurrency: int | None = None
    ):
        tvm = import_tvm()
        self.artifact = bundle.artifact(profile)
        lib_path = bundle.file(self.artifact.file)
        gpu = self.artifact.is_gpu
        self.device = tvm.cuda(cuda_index(self.artifact.requires, device)) if gpu else tvm.cpu(0)
        try:
            self.lib = tvm.runtime.load_module(str(lib_path))
        except Exception as err:  # noqa: BLE001 - a library this TVM cannot load, or no CUDA driver
            hint = (
                "; it carries CUDA source that TVM would have to compile on this device: recompile "
                "the "
                "bundle where nvcc is installed so that its kernels are embedded as a fatbin"
                if self.artifact.code_form == "cuda-source-in-library"
                else ""
            )
            raise BundleError(
                f"{lib_path}: TVM could not load this artifact: {err}{hint}"
            ) from None
        self._new_vm = lambda: tvm.runtime.vm.VirtualMachine(self.lib, self.device)
        first = self._new_vm()
        stored = read_weights(bundle, self.artifact, self.device)
        self.params = _on_a_live_pool(prepare_params, first, stored)
        # The symbolic-length function reads the weights as stored (its matmuls are not packed):
        # loaded from the file the first time a long input comes, then kept.
        fallback = bundle.fallback if self.artifact.fallback else None
        self._raw_for = fallback.function if fallback else None
        transformed = first.module.implements_function(TRANSFORM_PARAMS)
        self._raw_params: list | None = None if transformed else self.params
        self._bundle = bundle
        self._tensor = tvm.runtime.tensor
        self.input_names = [i["name"] for i in bundle.inputs]
        self.max_concurrency = max(1, max_concurrency or default_num_threads())
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._idle.put(first)
        self._staged: dict[int, dict[tuple, list]] = {}  # id(vm) -> bucket shape -> inputs
        self._created = 1
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _reset_after_fork(self) -> None:
        """In a forked child, once: a fresh VM pool (VMs held by threads that did not survive
        the fork are gone)."""
        with _fork_state["lock"]:
            if self._pid == os.getpid():
                return
            self._idle = queue.LifoQueue()
            self._staged = {}
            self._created = 0
            self._lock = threading.Lock()
            self._pid = os.getpid()

    def _acquire(self) -> Any:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            grow = self._created < self.max_concurrency
            if grow:
                self._created += 1
        return self._new_vm() if grow else self._idle.get()

    def _raw(self) -> list:
        """The weights as stored, for the fallback function (loaded once, on first use)."""
        with self._lock:
            if self._raw_params is None:
                self._raw_params = read_weights(self._bundle, self.artifact, self.device)
            return self._raw_params

    def run(self, bucket: Bucket | None, arrays: Arrays) -> list[np.ndarray]:
        if self._pid != os.getpid():
            self._reset_after_fork()
        return _on_a_live_pool(self._run, bucket, arrays)

    def _run(self, bucket: Bucket | None, arrays: Arrays) -> list[np.ndarray]:
        vm = self._acquire()
        try:
            # Input tensors per VM and bucket, allocated once and refilled: a fresh allocation per
            # input and call was a measurable part of a small model's per-call time.
            staged = self._staged.setdefault(id(vm), {})
            key = (bucket.function, bucket.batch, bucket.seq)  # the fallback takes any length
            args = staged.get(key)
            if args is None:
                args = [self._tensor(arrays[name], self.device) for name in self.input_names]
                staged[key] = args
            else:
                for arg, name in zip(args, self.input_names, strict=True):
                    arg.copyfrom(np.ascontiguousarray(arrays[name]))
            params = self._raw() if bucket.function == self._raw_for else self.params
            result = vm[bucket.function](*args, *params)
            outputs = [result] if hasattr(result, "numpy") else list(result)
            return [o.numpy() for o in outputs]
        finally:
            self._idle.put(vm)


def ort_input_dtypes(session) -> dict[str, type]:
    """The numpy dtype of each input of an ONNX Runtime session: arrays arrive as int64, and a
    graph that takes int32 ids (ORT-optimized graphs) gets them cast."""
    return {
        i.name: np.int32 if i.type == "tensor(int32)" else np.int64 for i in session.get_inputs()
    }


class OnnxRuntimeEngine:
    """The bundle's ONNX model on ONNX Runtime: the fallback and the reference.

    ONNX Runtime's `InferenceSession.run` is safe to call from several threads at once.
    """

    fixed_shapes = False

    def __init__(self, bundle: Bundle):
        import onnxruntime

        path = bundle.file("model.onnx")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.dtypes = ort_input_dtypes(self.session)

    def run(self, bucket: Bucket | None, arrays: Arrays) -> list[np.ndarray]:
        feed = {n: arrays[n].astype(self.dtypes[n], copy=False) for n in self.input_names}
        return self.session.run(None, feed)
