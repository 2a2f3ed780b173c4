"""Measuring workers: one build pool and one measuring process for a whole tuning run, local or RPC.

Why not MetaSchedule's `LocalBuilder`/`LocalRunner`: they start a fresh process pool for every
batch and each worker re-imports TVM (~6 s on two cores); here the pools live for the whole run.
Workers die with the tuner, even when it is killed with -9 (PR_SET_PDEATHSIG and a watch thread).

Remote devices (`RpcMeasure`): candidates are built here as shared libraries (ARM ones linked with
the profile's `cross_cc`) and timed on the device behind the key, one short RPC session per
candidate. Two things differ from MetaSchedule's RPC runner, both so that a device running TVM's
runtime alone (`TVM_USE_RUNTIME_LIB=1`, or a runtime-only build) can measure: arguments are filled
with numpy random data here and uploaded (the runtime library has no
`tvm.contrib.random.random_fill_for_measure`), and candidates are linked `.so` files (loading a
`.tar` would need a C compiler on the device).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from tvmdeploy.runtime import remote
from tvmdeploy.runtime._tvm import default_num_threads
from tvmdeploy.runtime.errors import RemoteError
from tvmdeploy.runtime.remote import parse_address

from ..errors import TuningError


def num_cores() -> int:
    """The cores builds and the search use here (TVM_NUM_THREADS, else all this process may use)."""
    return int(os.environ.get("TVM_NUM_THREADS") or default_num_threads())


_PR_SET_PDEATHSIG = 1


def _worker_init() -> None:
    """Runs first in every worker: die with the tuner, even when it is killed with -9."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent or parent == 1:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:  # belt and braces: PDEATHSIG follows the spawning thread, not process
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="tvmdeploy-parent-watch").start()
    import tvm.s_tir.meta_schedule  # noqa: F401 - pay the import once, at start


def _build_candidate(
    mod, target, scratch: str, shared: bool = False, cross_cc: str | None = None
) -> str:
    """Build one scheduled kernel to an artifact under `scratch` (runs in a build worker).

    A .tar of object files for the local runner (it links them itself), or with `shared` a linked
    `.so` for a remote device, which may have no C compiler (with `cross_cc`, linked by that
    cross compiler, e.g. aarch64-linux-gnu-gcc for ARM profiles, as compiler/build.py links).
    """
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support.tar import tar

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    from tvm.driver import build as tvm_build

    rt_mod = tvm_build(mod, target=target)
    folder = tempfile.mkdtemp(prefix="cand-", dir=scratch)
    if shared:
        from tvm.support import cc

        path = os.path.join(folder, "kernel.so")
        rt_mod.export_library(path, fcompile=cc.cross_compiler(cross_cc) if cross_cc else None)
        return path
    path = os.path.join(folder, "kernel." + tar.output_format)
    rt_mod.export_library(path, fcompile=tar)
    return path


def cold_evaluator_config(repeat: int):
    """How every candidate (and every rule-based baseline) is timed: cold, as inside the model.

    Each of `5 * repeat` (at least 10) single runs starts with every argument but the first flushed
    from the CPU caches: the activation the previous kernel just wrote stays, the weights do not
    (in a forward pass a layer's weights were last touched a whole pass ago). Timed hot, with
    the weights left in cache by the previous run, schedules that stream weights badly win in
    isolation and lose in the model: tuned DistilBERT 1x32 and MiniLM 1x128 ran 10% slower than
    the rule-based build with hot-timed records. The best run is kept: other load only adds time.
    """
    from tvm.s_tir.meta_schedule.runner.config import EvaluatorConfig

    return EvaluatorConfig(
        number=1, repeat=max(10, 5 * repeat), min_repeat_ms=0, enable_cpu_cache_flush=True
    )


def _measure_candidate(artifact: str, args_info: list, repeat: int) -> list[float]:
    """Time one built kernel on random inputs (runs in the measuring worker), cold: see
    `cold_evaluator_config`."""
    from tvm.s_tir.meta_schedule.runner.local_runner import _worker_func

    costs = _worker_func(
        None, None, None, cold_evaluator_config(repeat), 1, artifact, "cpu", args_info
    )
    return [min(costs)]


@dataclass(frozen=True)
class RpcMeasure:
    """Where `Workers` measures when tuning over RPC: the tracker, the key, how to link."""

    tracker: str  # HOST:PORT
    key: str
    cross_cc: str | None = None  # the profile's cross compiler, for the shared libraries
    request_timeout: float = 60.0  # how long a candidate waits for a free server of the key


class Workers:
    """A persistent build pool and a single measuring worker (`tvm.exec.popen_worker`s).

    With `rpc`, candidates are built as shared libraries and the measuring worker times them on
    the remote device (`measure_rpc`) instead of here.
    """

    def __init__(
        self,
        build_workers: int,
        build_timeout: float,
        run_timeout: float,
        rpc: RpcMeasure | None = None,
    ):
        from tvm.support.popen_pool import PopenPoolExecutor

        self.build_timeout, self.run_timeout, self.rpc = build_timeout, run_timeout, rpc
        # Every artifact lives under one directory per run, removed on close (interrupted runs
        # leave built-but-unmeasured candidates behind otherwise).
        self.scratch = scratch_dir("tvmdeploy-scratch")
        self.builders = PopenPoolExecutor(
            max_workers=build_workers,
            timeout=build_timeout,
            initializer=_worker_init,
            maximum_process_uses=256,
        )
        # Over RPC a measurement may first wait (bounded) for a free server of the key.
        runner_timeout = run_timeout + (rpc.request_timeout + 10 if rpc else 0)
        self.runner = PopenPoolExecutor(
            max_workers=1,
            timeout=runner_timeout,
            initializer=_worker_init,
            maximum_process_uses=2048,
        )

    def build(self, mods: list, target) -> list[tuple[str | None, str | None]]:
        """(artifact, None) or (None, error) per module, built in parallel."""
        from tvm.support.popen_pool import StatusKind

        results = []
        scratch = self.scratch
        shared = self.rpc is not None
        cross_cc = self.rpc.cross_cc if self.rpc else None
        for result in self.builders.map_with_error_catching(
            lambda m: _build_candidate(m, target, scratch, shared, cross_cc), mods
        ):
            if result.status == StatusKind.COMPLETE:
                results.append((result.value, None))
            elif result.status == StatusKind.TIMEOUT:
                results.append((None, f"build timed out after {self.build_timeout:.0f} s"))
            else:
                results.append((None, f"build failed: {_last_line(result.value)}"))
        return results

    def measure(
        self, artifact: str, args_info: list, repeat: int
    ) -> tuple[list[float] | None, str | None]:
        """([seconds], None) or (None, error) for one built kernel; the artifact is removed.

        Over RPC, a device that cannot be reached (tracker gone, key no longer registered, its
        servers busy past the request timeout) is no verdict on the kernel: that raises
        TuningError, so no failed record is written for it and the run stops.
        """
        try:
            if self.rpc is None:
                future = self.runner.submit(_measure_candidate, artifact, args_info, repeat)
            else:
                future = self.runner.submit(
                    measure_rpc,
                    artifact,
                    args_info,
                    repeat,
                    self.rpc.tracker,
                    self.rpc.key,
                    max(self.run_timeout, 10.0),
                    self.rpc.request_timeout,
                )
            return future.result(), None
        except TimeoutError:
            return None, f"run timed out after {self.run_timeout:.0f} s"
        except RemoteError as err:  # from the worker, its message is the worker's traceback
            why = _last_line(err).removeprefix(f"{RemoteError.__module__}.{RemoteError.__name__}: ")
            raise TuningError(
                f"measuring on the remote device stopped: {why.rstrip('.')}. Every record measured "
                f"until "
                "now is saved; run the same command again to continue once the device is back"
            ) from None
        except Exception as err:  # noqa: BLE001 - a candidate that crashes is a failed trial
            return None, f"run failed: {_last_line(err)}"
        finally:
            shutil.rmtree(os.path.dirname(artifact), ignore_errors=True)

    def pids(self) -> list[int]:
        """Process ids of the live workers of both pools."""
        pids = []
        for pool in (self.builders, self.runner):
            for worker in list(getattr(pool, "_worker_map", {}).values()):
                proc = getattr(worker, "_proc", None)
                if proc is not None and proc.poll() is None:
                    pids.append(proc.pid)
        return pids

    def close(self) -> None:
        """Stop both pools and make sure none of their workers (or their children) lives on."""
        pids = self.pids()
        for pool in (self.builders, self.runner):
            with contextlib.suppress(Exception):
                pool.shutdown(wait=False)
        kill_processes(pids)
        shutil.rmtree(self.scratch, ignore_errors=True)


def scratch_dir(prefix: str) -> str:
    """A temporary directory named after this process; ones left by dead processes (kill -9
    gives no chance to clean up) are removed first."""
    for stale in Path(tempfile.gettempdir()).glob(f"{prefix}-*-*"):
        pid = stale.name[len(prefix) + 1 :].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-")


def _last_line(error: object) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def kill_processes(pids: list[int]) -> int:
    """SIGKILL these processes and their descendants; returns how many were still alive."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            procs += [*proc.children(recursive=True), proc]
    alive = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
            alive += 1
    psutil.wait_procs(procs, timeout=3)
    return alive


def rpc_config(address: str, key: str, session_timeout: float = 60.0):
    """MetaSchedule's RPCConfig for the tracker `address` (HOST:PORT) and device `key`."""
    from tvm.s_tir.meta_schedule.runner import RPCConfig

    host, port = parse_address(address)
    return RPCConfig(
        tracker_host=host,
        tracker_port=port,
        tracker_key=key,
        session_priority=1,
        session_timeout_sec=int(session_timeout),
    )


def fill_random(tensor: Any) -> None:
    """Fill a (remote) tensor with random data made here; it crosses the network once."""
    dtype = np.dtype(str(tensor.dtype))
    shape = tuple(int(x) for x in tensor.shape)
    rng = np.random.default_rng(0)
    if dtype.kind == "f":
        data = rng.uniform(-1, 1, shape).astype(dtype)
    elif dtype.kind == "b":
        data = rng.integers(0, 2, shape).astype(dtype)
    else:  # small non-negative integers: valid as indices into any tensor the kernel gathers from
        data = rng.integers(0, 8, shape).astype(dtype)
    tensor.copyfrom(data)


def alloc_arguments(
    session: Any, device: Any, args_info: list, alloc_repeat: int
) -> list[list[Any]]:
    """MetaSchedule's `f_alloc_argument`, filling tensors from numpy (see the module docstring)."""
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    return alloc_argument_common(fill_random, device, args_info, alloc_repeat)


def measure_rpc(
    artifact: str,
    args_info: list,
    repeat: int,
    address: str,
    key: str,
    session_timeout: float = 60.0,
    request_timeout: float = 60.0,
) -> list[float]:
    """Time one built kernel (`.so`) on the remote device; like `_measure_candidate`.

    Returns the best cold timing (seconds; see `cold_evaluator_config`), measured by
    `time_evaluator` on the device (network excluded). Runs in the caller's process or a worker.

    The session is opened with `tvmdeploy.runtime.remote.connect`, so a missing tracker or key,
    or a key whose servers stay busy for `request_timeout` s, raises `RemoteError` (the device is
    unreachable: no verdict on the kernel), while anything that fails after the session is open
    (upload, load, run) raises TVM's own error (the kernel failed on the device).
    """
    from tvm.s_tir.meta_schedule.runner.rpc_runner import _worker_func

    session = remote.connect(
        address, key, session_timeout=session_timeout, request_timeout=request_timeout
    )
    try:
        costs = _worker_func(
            lambda _config: session.rpc,
            None,
            alloc_arguments,
            None,
            None,
            rpc_config(address, key, session_timeout),
            cold_evaluator_config(repeat),
            1,
            artifact,
            "cpu",
            args_info,
        )
    finally:
        session.close()  # the server is free for the next candidate as soon as this returns
    return [min(costs)]
