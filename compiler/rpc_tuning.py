"""Tuning on a remote device: MetaSchedule's RPC runner, set up to work with any `rpc_server`.

Why: schedules measured on the build host are tuned for the wrong CPU when the target is a board;
with `--rpc HOST:PORT --rpc-key KEY` each candidate kernel is timed on the device itself.

Two things differ from MetaSchedule's defaults, both so that a device running TVM's runtime alone
(`TVM_USE_RUNTIME_LIB=1`, or a runtime-only build) can measure:
- arguments are filled with numpy random data here and uploaded, because the runtime library has
  no `tvm.contrib.random.random_fill_for_measure`;
- candidates must be linked shared libraries (`.so`; for ARM linked with the profile's
  `cross_cc`): loading a `.tar` would need a C compiler on the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvmdeploy.runtime.remote import parse_address


def rpc_config(address: str, key: str, session_timeout: float = 60.0):
    """MetaSchedule's RPCConfig for the tracker `address` (HOST:PORT) and device `key`."""
    from tvm.s_tir.meta_schedule.runner import RPCConfig

    host, port = parse_address(address)
    return RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                     session_priority=1, session_timeout_sec=int(session_timeout))


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


def alloc_arguments(session: Any, device: Any, args_info: list, alloc_repeat: int) -> list[list[Any]]:
    """MetaSchedule's `f_alloc_argument`, filling tensors from numpy (see the module docstring)."""
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    return alloc_argument_common(fill_random, device, args_info, alloc_repeat)


def rpc_runner(address: str, key: str, session_timeout: float = 60.0, number: int = 3, repeat: int = 1,
               min_repeat_ms: int = 100, max_workers: int = 1):
    """A MetaSchedule `RPCRunner` that times candidates on the device behind `key`.

    For `ms.tune_tasks(..., runner=rpc_runner(...))`; the builder must export `.so` files.
    """
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCRunner

    return RPCRunner(
        rpc_config(address, key, session_timeout),
        EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms),
        f_alloc_argument=alloc_arguments,
        max_workers=max_workers,
    )


def measure_rpc(artifact: str, args_info: list, repeat: int, address: str, key: str,
                session_timeout: float = 60.0, request_timeout: float = 60.0) -> list[float]:
    """Time one built kernel (`.so`) on the remote device; like tune.py's `_measure_candidate`.

    Returns the best cold timing (seconds; see `tune.cold_evaluator_config`), measured by
    `time_evaluator` on the device (network excluded). Runs in the caller's process or a worker.

    The session is opened with `tvmdeploy.runtime.remote.connect`, so a missing tracker or key,
    or a key whose servers stay busy for `request_timeout` s, raises `RemoteError` (the device is
    unreachable: no verdict on the kernel), while anything that fails after the session is open
    (upload, load, run) raises TVM's own error (the kernel failed on the device).
    """
    from tvm.s_tir.meta_schedule.runner.rpc_runner import _worker_func
    from tvmdeploy.compiler.tune import cold_evaluator_config
    from tvmdeploy.runtime import remote

    session = remote.connect(address, key, session_timeout=session_timeout, request_timeout=request_timeout)
    try:
        costs = _worker_func(lambda _config: session.rpc, None, alloc_arguments, None, None,
                             rpc_config(address, key, session_timeout),
                             cold_evaluator_config(repeat), 1, artifact,
                             "cpu", args_info)
    finally:
        session.close()  # the server is free for the next candidate as soon as this returns
    return [min(costs)]
