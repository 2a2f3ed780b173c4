"""Remote devices over TVM RPC, for real: a tracker and servers on loopback, no mocks.

One tracker per module; an x86 `python -m tvm.exec.rpc_server` (runtime-only TVM, as on a board)
under key x86-local, and for the `qemu` tests an aarch64 server in the arm64 Python under
qemu-user under key arm64-qemu. Every process listens on 127.0.0.1 only, is wrapped in
`timeout` so that it ends by itself, and is killed with its whole process group at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tvmdeploy.compiler.emulation import qemu, qemu_rpc
from tvmdeploy.runtime import remote
from tvmdeploy.runtime.errors import IncompatibleDeviceError, RemoteError
from tvmdeploy.runtime.remote import RpcTarget
from typer.testing import CliRunner

from tests.conftest import TINY_BUCKETS

pytestmark = pytest.mark.rpc

LIFETIME_S = 900  # every server and the tracker exit by themselves after this
# Resolved at import, before conftest points TVMDEPLOY_CACHE_DIR at a per-session temp dir.
USER_SYSROOT = qemu.sysroot_base()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process in its own session, so that killing its group also ends its children."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["timeout", "-k", "5", str(LIFETIME_S), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""


@pytest.fixture(scope="module")
def tracker(tmp_path_factory) -> Iterator[str]:
    """`python -m tvm.exec.rpc_tracker` on a free loopback port; yields HOST:PORT."""
    port = free_port()
    log = tmp_path_factory.mktemp("rpc") / "tracker.log"
    proc = _start(
        [
            sys.executable,
            "-m",
            "tvm.exec.rpc_tracker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
        ],
        log,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                remote.tracker_summary(address, timeout=2)
                break
            except RemoteError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the RPC tracker did not start:\n{_tail(log)}")
                time.sleep(0.3)
        yield address
    finally:
        _stop(proc)


def _server_env() -> dict[str, str]:
    # Runtime-only TVM, as on a device; none of the compiler's variables from this test session.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TVM_", "TVMDEPLOY_"))}
    return env | {"TVM_USE_RUNTIME_LIB": "1", "TVM_FFI_DISABLE_TORCH_C_DLPACK": "1"}


@pytest.fixture(scope="module")
def x86_server(tracker, tmp_path_factory) -> Iterator[str]:
    """`python -m tvm.exec.rpc_server` registered under x86-local; yields the key."""
    port = free_port()
    log = tmp_path_factory.mktemp("rpc") / "x86-server.log"
    proc = _start(
        [
            sys.executable,
            "-m",
            "tvm.exec.rpc_server",
            "--tracker",
            tracker,
            "--key",
            "x86-local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
        ],
        log,
        _server_env(),
    )
    try:
        try:
            remote.wait_for_server(tracker, "x86-local", timeout=60)
        except RemoteError as err:
            pytest.fail(f"{err}\n{_tail(log)}")
        yield "x86-local"
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def arm_server(tracker, tmp_path_factory) -> Iterator[str]:
    """The aarch64 rpc_server under qemu-aarch64-static (-cpu cortex-a72) under key arm64-qemu."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TVMDEPLOY_ARM64_SYSROOT", str(USER_SYSROOT))
        arm = qemu.ensure_arm64_python()  # raises QemuUnavailable with what to do: no silent skip
    port = free_port()
    log = tmp_path_factory.mktemp("rpc") / "arm-server.log"
    argv = qemu_rpc.server_command(
        arm,
        tracker,
        "arm64-qemu",
        cpu="cortex-a72",
        port=port,
        port_end=port + 1,
        lifetime=LIFETIME_S,
    )
    proc = _start(argv, log, arm.env())
    try:
        try:
            remote.wait_for_server(tracker, "arm64-qemu", timeout=120)  # emulated TVM import: ~10 s
        except RemoteError as err:
            pytest.fail(f"{err}\n{_tail(log)}")
        yield "arm64-qemu"
    finally:
        _stop(proc)


# -- x86 server -----------------------------------------------------------------------------


def test_remote_model_matches_onnxruntime(tiny_bundle, tracker, x86_server):
    from tvmdeploy.runtime.engine import OnnxRuntimeEngine

    model = remote.load_remote(tiny_bundle, tracker, x86_server)
    try:
        assert model.engine.session.device.arch == "x86_64"
        assert model.engine.session.device.fingerprint == "rpc:x86-local:x86_64"
        texts = ["a wonderful, moving film", "dull", "not what I hoped for at all, sadly"]
        arrays = model.encode(texts)  # 3 x n: two chunks of the batch-2 buckets, padded, sliced
        got = model(**arrays)["logits"]
        expected = OnnxRuntimeEngine(model.bundle).run(None, arrays)[0]
        assert got.shape == expected.shape == (3, 2)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    finally:
        model.engine.close()


CLIENT_SCRIPT = """
import json, sys, numpy as np
from tvmdeploy.runtime import remote
model = remote.load_remote(sys.argv[1], sys.argv[2], sys.argv[3])
logits = model(input_ids=np.ones((1, 8), np.int64))["logits"]
maps = open("/proc/self/maps").read()
print(json.dumps({"shape": list(logits.shape), "compiler_lib": "libtvm_compiler" in maps,
                  "heavy": sorted(m for m in ("torch", "onnx", "tvm.relax") if m in sys.modules)}))
"""


def test_client_needs_only_the_tvm_runtime(tiny_bundle, tracker, x86_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TVM_", "TVMDEPLOY_"))}
    out = subprocess.run(
        [sys.executable, "-c", CLIENT_SCRIPT, str(tiny_bundle), tracker, x86_server],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=120,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"shape": [1, 2], "compiler_lib": False, "heavy": []}


def test_bench_over_rpc_writes_a_valid_report(tiny_bundle, tracker, x86_server, tmp_path):
    from tvmdeploy.compiler.cli import app
    from tvmdeploy.compiler.tooling.report import load_bench

    out = tmp_path / "remote.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            str(tiny_bundle),
            "--rpc",
            tracker,
            "--rpc-key",
            x86_server,
            "--batch",
            "1,2",
            "--seq",
            "16,32",
            "--warmup",
            "2",
            "--runs",
            "5",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = load_bench(out)  # the schema `tvmdeploy report` reads
    device = data["device"]
    assert device["fingerprint"] == "rpc:x86-local:x86_64"
    assert (
        "via RPC key 'x86-local'" in device["description"] and device["rpc"]["key"] == "x86-local"
    )
    assert data["config"]["rpc"] == tracker and data["config"]["engines"] == ["tvmdeploy"]
    assert [(r["batch"], r["seq"]) for r in data["results"]] == [(1, 16), (1, 32), (2, 16), (2, 32)]
    for r in data["results"]:
        assert r["engine"] == "tvmdeploy" and r["runs"] == 5
        assert r["parity"]["max_abs_diff"] <= 1e-4
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["throughput_per_s"] > 0
    json.dumps(data)


def test_baselines_are_refused_over_rpc(tiny_bundle, tracker):
    from tvmdeploy.compiler.cli import app

    result = CliRunner().invoke(
        app,
        [
            "bench",
            str(tiny_bundle),
            "--rpc",
            tracker,
            "--rpc-key",
            "x86-local",
            "--compare",
            "onnxruntime",
        ],
    )
    assert result.exit_code == 2
    assert "run only on this machine" in result.output and "tvmdeploy report" in result.output


def test_compile_verifies_through_rpc(tiny_exported, tracker, x86_server, tmp_path):
    from tvmdeploy.compiler import CompileOptions, compile_model

    bundle = compile_model(
        CompileOptions(
            model=str(tiny_exported.onnx_path),  # the session's export: no second one
            output=str(tmp_path / "v.tvmd"),
            profiles=["host"],
            buckets=TINY_BUCKETS,
            rpc=RpcTarget(tracker, x86_server),
        )
    )
    (artifact,) = json.loads((bundle / "manifest.json").read_text())["artifacts"]
    assert artifact["parity"]["where"] == "rpc:x86-local", artifact["parity"]
    assert artifact["parity"]["ok"] is True and artifact["parity"]["max_abs_diff"] < 1e-4


def test_unknown_key_and_closed_port_fail_fast_and_clearly(tracker, x86_server):
    start = time.monotonic()
    with pytest.raises(RemoteError) as unknown:
        remote.connect(tracker, "no-such-board")
    text = str(unknown.value)
    assert "no-such-board" in text and "x86-local (1)" in text and "tvm.exec.rpc_server" in text
    closed = f"127.0.0.1:{free_port()}"
    with pytest.raises(
        RemoteError, match=r"no RPC tracker at .*\(connection refused\).*tvm.exec.rpc_tracker"
    ):
        remote.connect(closed, "x86-local")
    with pytest.raises(RemoteError, match="HOST:PORT"):
        remote.connect("localhost", "x86-local")
    assert time.monotonic() - start < 5


def test_busy_key_times_out_clearly(tracker, x86_server):
    with remote.connect(tracker, x86_server) as held:
        assert held.device.arch == "x86_64"
        start = time.monotonic()
        with pytest.raises(RemoteError, match="no free RPC server for key 'x86-local' within 2 s"):
            remote.connect(tracker, x86_server, request_timeout=2)
        assert time.monotonic() - start < 10


def test_crash_on_the_device_is_a_clear_error(tiny_bundle, tracker, tmp_path):
    """A session process that dies (here: SIGILL sent to it) is reported so, with what to do."""
    import psutil

    port = free_port()
    log = tmp_path / "crash-server.log"
    proc = _start(
        [
            sys.executable,
            "-m",
            "tvm.exec.rpc_server",
            "--tracker",
            tracker,
            "--key",
            "x86-crash",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
        ],
        log,
        _server_env(),
    )
    try:
        remote.wait_for_server(tracker, "x86-crash", timeout=60)
        model = remote.load_remote(tiny_bundle, tracker, "x86-crash")
        session_proc = max(
            psutil.Process(proc.pid).children(recursive=True), key=lambda p: p.create_time()
        )
        session_proc.send_signal(signal.SIGILL)
        session_proc.wait(10)
        with pytest.raises(
            RemoteError,
            match="running b1_s16 on RPC key 'x86-crash' failed.*session process "
            "on the device died.*restart it",
        ):
            model(input_ids=np.ones((1, 8), np.int64))
    finally:
        _stop(proc)


def test_cli_reports_unreachable_tracker(tiny_bundle):
    from tvmdeploy.compiler.cli import app

    result = CliRunner().invoke(
        app,
        ["bench", str(tiny_bundle), "--rpc", f"127.0.0.1:{free_port()}", "--rpc-key", "x86-local"],
    )
    assert result.exit_code == 2 and "no RPC tracker at 127.0.0.1" in result.output


def test_tuning_measures_a_kernel_on_the_remote(tracker, x86_server, tmp_path):
    import tvm
    from tvm import te
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvmdeploy.compiler.tuning import measure_rpc

    a = te.placeholder((64, 64), name="A")
    b = te.placeholder((64, 64), name="B")
    k = te.reduce_axis((0, 64), "k")
    c = te.compute((64, 64), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    func = te.create_prim_func([a, b, c])
    path = tmp_path / "kernel.so"
    tvm.compile(tvm.IRModule({"main": func}), target="llvm").export_library(str(path))
    args_info = [info.as_json() for info in ArgInfo.from_prim_func(func)]
    (secs,) = measure_rpc(str(path), args_info, repeat=2, address=tracker, key=x86_server)
    assert 0 < secs < 1


# -- aarch64 server under QEMU --------------------------------------------------------------


@pytest.fixture(scope="module")
def arm_bundle(tiny_exported, tracker, arm_server, tmp_path_factory) -> Path:
    """The tiny BERT (the session's export) compiled for arm64-neon and verified on the
    emulated device through RPC."""
    from tvmdeploy.compiler import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("arm-rpc") / "tiny-arm.tvmd"
    return compile_model(
        CompileOptions(
            model=str(tiny_exported.onnx_path),
            output=str(out),
            profiles=["arm64-neon"],
            buckets=TINY_BUCKETS,
            rpc=RpcTarget(tracker, arm_server),
        )
    )


@pytest.mark.qemu
def test_arm_artifact_verified_through_rpc_under_qemu(arm_bundle):
    (artifact,) = json.loads((arm_bundle / "manifest.json").read_text())["artifacts"]
    assert artifact["profile"] == "arm64-neon"
    parity = artifact["parity"]
    assert parity["where"] == "rpc:arm64-qemu", parity
    assert parity["ok"] is True and parity["max_abs_diff"] < 1e-4
    assert artifact["latency"] == []


@pytest.mark.qemu
def test_arm_device_runs_the_arm_artifact_and_x86_refuses_it(
    arm_bundle, tracker, arm_server, x86_server
):
    from tvmdeploy.runtime.engine import OnnxRuntimeEngine
    from tvmdeploy.runtime.timing import bench_inputs

    with pytest.raises(IncompatibleDeviceError, match="needs arch aarch64.*'x86-local' is x86_64"):
        remote.load_remote(arm_bundle, tracker, x86_server, artifact="arm64-neon")
    with pytest.raises(IncompatibleDeviceError, match="no artifact .* runs on the x86_64 device"):
        remote.load_remote(arm_bundle, tracker, x86_server)
    model = remote.load_remote(arm_bundle, tracker, arm_server)
    try:
        assert model.choice.artifact == "arm64-neon"
        assert model.engine.session.device.fingerprint == "rpc:arm64-qemu:aarch64"
        arrays = bench_inputs(model.bundle, 2, 20)
        np.testing.assert_allclose(
            model(**arrays)["logits"],
            OnnxRuntimeEngine(model.bundle).run(None, arrays)[0],
            atol=1e-4,
            rtol=0,
        )
    finally:
        model.engine.close()


@pytest.mark.qemu
def test_remote_failure_is_a_clear_error(tiny_bundle, tracker, arm_server):
    from tvmdeploy.runtime import Bundle

    bundle = Bundle(tiny_bundle)
    x86_lib = bundle.file(bundle.artifacts[0].file)  # an x86 library: the aarch64 loader rejects it
    failed = "loading lib.so into a Relax VM on RPC key 'arm64-qemu' failed"
    with remote.connect(tracker, arm_server) as session, pytest.raises(RemoteError, match=failed):
        remote.RemoteVM(session, x86_lib, b"", [])
