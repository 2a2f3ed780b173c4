"""Remote devices through TVM's RPC: a tracker hands out an `rpc_server` on the device by key.

Why: a board (an ARM single-board computer, a phone, a cloud instance of another arch) runs only
TVM's runtime and `python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`. This host
uploads an artifact's `lib.so` (checked against the bundle's sha256 first) and the weights file,
loads both on the device, runs bucket functions there on numpy inputs it sends, and downloads
the outputs. Timings come from `time_evaluator` *on the device* (`invoke_stateful` of the bucket
function with inputs already there), so network latency and transfers are excluded.

What the remote tells us: TVM's RPC has no CPU probe. The arch is the ELF machine of the server's
own executable (`/proc/self/exe`, downloaded once per tracker and key), the core count comes from
`/sys/devices/system/cpu/online`. CPU features stay unknown (procfs files cannot be read through
`tvm.rpc.server.download`), so artifacts are matched on arch only; without a named profile the
least demanding artifact of that arch is chosen (the one least likely to need an instruction the
device lacks; a crash on the device is reported as such).
CPU artifacts only: CUDA artifacts are refused over RPC.

Must never: import the compiler (`tvm.rpc` needs only libtvm_runtime, so the client side runs with
TVM_USE_RUNTIME_LIB=1), or contact anything but the tracker and the server that it names.

Why this module is long (~570 lines): running on a device over RPC is one concern; most of the
lines turn TVM's RPC failures into errors that say what happened and what to do.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from ._tvm import TRANSFORM_PARAMS, import_tvm
from .bundle import Bucket, Bundle
from .errors import BundleError, IncompatibleDeviceError, OptionError, RemoteError
from .select import Choice

SESSION_TIMEOUT_S = 600.0  # the server ends a session after this long (TVM's `-timeout=`)
REQUEST_TIMEOUT_S = 60.0  # how long to wait for a free server of the key
CONNECT_TIMEOUT_S = 10.0  # how long the tracker may take to answer at all
_RPC_TRACKER_MAGIC = 0x2F271  # tvm.rpc.base.RPC_TRACKER_MAGIC (kept here: no `import tvm` to ask)
_TRACKER_SUMMARY = 6  # tvm.rpc.base.TrackerCode.SUMMARY
_TRACKER_SUCCESS = 0
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm", 243: "riscv64", 3: "i386", 21: "ppc64le"}


@dataclass(frozen=True)
class RpcTarget:
    """A remote device behind a TVM RPC tracker: the tracker's HOST:PORT and the device's key.

    Parsed once, from `--rpc` and `--rpc-key`, by `from_options`; everything downstream takes one.
    """

    tracker: str
    key: str

    @classmethod
    def from_options(cls, tracker: str | None, key: str | None) -> RpcTarget | None:
        """None when neither is given; both or neither, and the tracker as HOST:PORT."""
        if not tracker and not key:
            return None
        if not tracker or not key:
            raise OptionError(
                "remote work needs both --rpc HOST:PORT and --rpc-key KEY (the key the device's "
                "rpc_server registered under at the tracker)"
            )
        parse_address(tracker)
        return cls(tracker, key)


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """(host, port) from 'HOST:PORT' (or a tuple, returned as it is)."""
    if isinstance(address, tuple):
        return address[0], int(address[1])
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RemoteError(
            f"--rpc takes the tracker as HOST:PORT (e.g. 127.0.0.1:9190), not {address!r}"
        )
    return host.strip("[]"), int(port)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("the tracker closed the connection")
        data += chunk
    return data


def tracker_summary(
    address: str | tuple[str, int], timeout: float = CONNECT_TIMEOUT_S
) -> dict[str, Any]:
    """The tracker's queue and server list, asked over one short-lived socket.

    TVM's own `connect_tracker` retries a refused connection for 60 s; this fails at once with
    what to do, so a wrong --rpc is reported in milliseconds.
    """
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("<i", _RPC_TRACKER_MAGIC))
            if struct.unpack("<i", _recv_exact(sock, 4))[0] != _RPC_TRACKER_MAGIC:
                raise RemoteError(
                    f"{host}:{port} answers, but it is not a TVM RPC tracker; check --rpc"
                )
            request = json.dumps([_TRACKER_SUMMARY]).encode()
            sock.sendall(struct.pack("<i", len(request)) + request)
            size = struct.unpack("<i", _recv_exact(sock, 4))[0]
            reply = json.loads(_recv_exact(sock, size))
    except TimeoutError:
        raise RemoteError(
            f"the RPC tracker at {host}:{port} did not answer within {timeout:.0f} s; "
            "check --rpc and that the tracker is running"
        ) from None
    except OSError as err:
        why = "connection refused" if err.errno == errno.ECONNREFUSED else str(err)
        raise RemoteError(
            f"no RPC tracker at {host}:{port} ({why}); start one with `python -m "
            f"tvm.exec.rpc_tracker "
            f"--host {host} --port {port}` or fix --rpc"
        ) from None
    if not (isinstance(reply, list) and reply and reply[0] == _TRACKER_SUCCESS):
        raise RemoteError(f"the RPC tracker at {host}:{port} refused a summary request ({reply!r})")
    return reply[1]


def registered_keys(summary: dict[str, Any]) -> dict[str, int]:
    """Servers per key in a tracker summary (busy ones included)."""
    keys: dict[str, int] = {}
    for server in summary.get("server_info", []):
        key = str(server.get("key", "")).removeprefix("server:")
        keys[key] = keys.get(key, 0) + 1
    return keys


@dataclass(frozen=True)
class RemoteDevice:
    """What the host can learn about a device behind a tracker key (see the module docstring)."""

    tracker: str  # HOST:PORT
    key: str
    arch: str
    cores: int | None

    @property
    def fingerprint(self) -> str:
        return f"rpc:{self.key}:{self.arch}"

    @property
    def description(self) -> str:
        cores = f", {self.cores} cores" if self.cores else ""
        return f"{self.arch} device via RPC key {self.key!r} (tracker {self.tracker}{cores})"

    def to_dict(self) -> dict[str, Any]:
        """The `device` of a BenchReport: DeviceInfo's keys, plus how it was reached and timed."""
        return {
            "fingerprint": self.fingerprint,
            "description": self.description,
            "arch": self.arch,
            "cpu_model": "unknown (remote)",
            "cores": self.cores,
            "cpu_features": [],
            "cuda": [],
            "rpc": {
                "tracker": self.tracker,
                "key": self.key,
                "timing": "time_evaluator on the remote device; network latency excluded",
            },
        }


def _elf_arch(header: bytes) -> str:
    if header[:4] != b"\x7fELF" or len(header) < 20:
        return "unknown"
    machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    return _ELF_MACHINES.get(machine, f"elf-machine-{machine}")


def _error_text(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


class RemoteSession:
    """One session with one server of a key: files go to its temporary work directory.

    A session ends when this object is closed (or after `session_timeout` s, when the server
    kills it); a new one starts from a clean directory.
    """

    def __init__(self, rpc_session: Any, tracker: str, key: str, session_timeout: float):
        self.rpc = rpc_session
        self.tracker = tracker
        self.key = key
        self.session_timeout = session_timeout
        self._device: RemoteDevice | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the session (TVM closes the connection when the last reference goes)."""
        self.rpc = None

    @contextmanager
    def calls(self, what: str) -> Iterator[None]:
        """Turn a failure on the remote into a RemoteError that says what was being done."""
        if self.rpc is None:
            raise RemoteError(f"the RPC session with key {self.key!r} is closed")
        try:
            yield
        except (RemoteError, BundleError, IncompatibleDeviceError):
            raise
        except Exception as err:  # noqa: BLE001 - whatever the remote raised, said with what was done
            text = _error_text(err)
            hint = ""
            if "expired" in text or "session_timeout" in text:
                hint = (
                    f"; the {self.session_timeout:.0f} s session expired: raise the RPC session "
                    "timeout"
                )
            elif any(w in text.lower() for w in ("rpccode", "closed", "reset", "broken pipe")):
                hint = (
                    "; the session process on the device died (a crash, e.g. an illegal "
                    "instruction "
                    "from an artifact needing CPU features the device lacks); TVM's rpc_server "
                    "stops "
                    "serving after that: check its log and restart it"
                )
            raise RemoteError(f"{what} on RPC key {self.key!r} failed: {text}{hint}") from None

    @property
    def device(self) -> RemoteDevice:
        """The remote device as far as RPC reveals it (cached per tracker and key)."""
        if self._device is None:
            self._device = _probe_cached(self.tracker, self.key, self)
        return self._device

    def upload(self, data: bytes, name: str) -> None:
        with self.calls(f"uploading {name}"):
            self.rpc.upload(bytearray(data), name)

    def download(self, path: str) -> bytes:
        with self.calls(f"downloading {path}"):
            return bytes(self.rpc.download(path))

    def workpath(self, name: str) -> str:
        """The absolute path of `name` in the session's work directory, on the remote."""
        with self.calls("asking for the work directory"):
            return str(self.rpc.get_function("tvm.rpc.server.workpath")(name))


_PROBED: dict[tuple[str, str], RemoteDevice] = {}


def _count_cpus(online: str) -> int:
    """CPUs in a kernel CPU list such as '0-3,6' (5)."""
    total = 0
    for part in online.strip().split(","):
        first, _, last = part.partition("-")
        total += int(last or first) - int(first) + 1
    return total


def _probe_cached(tracker: str, key: str, session: RemoteSession) -> RemoteDevice:
    if (tracker, key) not in _PROBED:
        exe = session.download(
            "/proc/self/exe"
        )  # the server's own binary: its arch is the device's
        try:
            cores = _count_cpus(
                session.download("/sys/devices/system/cpu/online").split(b"\0")[0].decode()
            )
        except (RemoteError, ValueError):
            cores = None
        _PROBED[(tracker, key)] = RemoteDevice(tracker, key, _elf_arch(exe[:20]), cores)
    return _PROBED[(tracker, key)]


def connect(
    address: str | tuple[str, int],
    key: str,
    session_timeout: float = SESSION_TIMEOUT_S,
    request_timeout: float = REQUEST_TIMEOUT_S,
) -> RemoteSession:
    """A session with a free server registered under `key` at the tracker `address`.

    Fails fast (RemoteError) when no tracker answers or no server is registered under the key, and
    after `request_timeout` s when all of the key's servers stay busy.
    """
    host, port = parse_address(address)
    tracker = f"{host}:{port}"
    keys = registered_keys(tracker_summary((host, port)))
    if key not in keys:
        known = ", ".join(f"{k} ({n})" for k, n in sorted(keys.items())) or "none"
        raise RemoteError(
            f"no RPC server is registered under key {key!r} at tracker {tracker} (registered: "
            f"{known}); "
            f"start one on the device with `python -m tvm.exec.rpc_server --tracker {tracker} "
            f"--key {key}` "
            "or fix --rpc-key"
        )
    import_tvm()  # runtime-only unless TVM is already loaded
    from tvm import rpc

    tracker_session = None
    try:
        tracker_session = rpc.connect_tracker(host, port)
        # TVM's request blocks until a server is free; the socket timeout bounds that wait.
        tracker_session._sock.settimeout(request_timeout)  # TrackerSession has no timeout option
        remote = tracker_session.request(key, session_timeout=session_timeout, max_retry=1)
    except Exception as err:  # noqa: BLE001 - TVM's RuntimeError carries the socket error as text
        text = _error_text(err)
        if "timed out" in text:
            raise RemoteError(
                f"no free RPC server for key {key!r} within {request_timeout:.0f} s: all "
                f"{keys[key]} "
                f"registered are busy; retry later or register more servers under {key!r}"
            ) from None
        raise RemoteError(
            f"could not open an RPC session for key {key!r} via tracker {tracker}: {text}"
        ) from None
    finally:
        if tracker_session is not None:
            tracker_session.close()
    return RemoteSession(remote, tracker, key, session_timeout)


def probe_remote(
    address: str | tuple[str, int], key: str, request_timeout: float = REQUEST_TIMEOUT_S
) -> RemoteDevice:
    """The device behind `key` (arch, cores), learned in one short session."""
    host, port = parse_address(address)
    if (f"{host}:{port}", key) in _PROBED:
        return _PROBED[(f"{host}:{port}", key)]
    with connect(
        (host, port), key, session_timeout=120, request_timeout=request_timeout
    ) as session:
        return session.device


def check_artifact_runs(
    requires: dict[str, Any], is_gpu: bool, name: str, device: RemoteDevice
) -> None:
    """Refuse what cannot run on the remote: another arch, or a CUDA artifact."""
    if is_gpu:
        raise IncompatibleDeviceError(
            f"artifact {name!r} is a CUDA artifact; over RPC tvmdeploy runs CPU artifacts only"
        )
    arch = requires.get("arch")
    if arch and arch != device.arch:
        raise IncompatibleDeviceError(
            f"artifact {name!r} needs arch {arch}, but the device behind RPC key {device.key!r} is "
            f"{device.arch}; pick an artifact compiled for {device.arch} (--artifact) or another "
            f"key"
        )


def select_remote(bundle: Bundle, device: RemoteDevice, artifact: str | None = None) -> Choice:
    """The artifact to run on `device`: the named one (checked), else its arch's least demanding."""
    rejected = {}
    for a in bundle.artifacts:
        if a.is_gpu:
            rejected[a.name] = "a CUDA artifact (CPU artifacts only over RPC)"
        elif a.requires.get("arch", device.arch) != device.arch:
            rejected[a.name] = f"arch {a.requires['arch']}"
    names = [a.name for a in bundle.artifacts if a.name not in rejected]
    if artifact is not None:
        chosen = bundle.artifact(artifact)
        check_artifact_runs(chosen.requires, chosen.is_gpu, chosen.name, device)
        return Choice(
            chosen.name, f"forced by the caller; run via RPC key {device.key!r}", names, rejected
        )
    if not names:
        raise IncompatibleDeviceError(
            f"no artifact in {bundle.path} runs on the {device.arch} device behind RPC key "
            f"{device.key!r} "
            f"({', '.join(f'{k}: {v}' for k, v in rejected.items()) or 'no artifacts'}); compile "
            f"one for "
            f"{device.arch} (`tvmdeploy compile ... --target PROFILE`)"
        )
    # Features cannot be read over RPC: the fewest required features is the one that surely runs.
    best = min(
        (a for a in bundle.artifacts if a.name in names),
        key=lambda a: (len(a.requires.get("cpu_features", [])), a.name),
    )
    reason = (
        f"the least demanding {device.arch} artifact (CPU features cannot be read over RPC; "
        "name a more specific one with --artifact)"
    )
    return Choice(best.name, reason, names, rejected)


class RemoteVM:
    """A library and its weights loaded in a Relax VM on the remote device."""

    def __init__(
        self,
        session: RemoteSession,
        lib_path: Path,
        params_blob: bytes,
        param_names: Sequence[str],
        name: str = "lib",
        raw_weights_for: Sequence[str] = (),
    ):
        tvm = import_tvm()
        self.session = session
        #: Functions that read the weights as stored (an artifact's symbolic-length fallback).
        self.raw_weights_for = set(raw_weights_for)
        self.raw_params: list = []
        self._tensor = tvm.runtime.tensor
        lib_name, params_name = f"{name}.so", f"{name}.params"
        session.upload(Path(lib_path).read_bytes(), lib_name)
        session.upload(params_blob, params_name)
        with session.calls(f"loading {Path(lib_path).name} into a Relax VM"):
            self.dev = session.rpc.cpu(0)
            module = session.rpc.load_module(lib_name)
            self.vm = tvm.runtime.vm.VirtualMachine(module, self.dev)
            # Not VirtualMachine.get_outputs: its recursive closure makes a reference cycle that
            # keeps
            # the VM, and so the session and the server, alive until the garbage collector runs.
            self._output_arity = self.vm.module["get_output_arity"]
            self._output = self.vm.module["get_output"]
        with session.calls("loading the weights"):
            # Loaded by the remote's own runtime: the weights cross the network once, as one file.
            by_name = session.rpc.get_function("runtime.LoadParamsFromFile")(
                session.workpath(params_name)
            )
            count = session.rpc.get_function("ffi.MapCount")
            get = session.rpc.get_function("ffi.MapGetItem")
            missing = [n for n in param_names if not count(by_name, n)]
            if missing:
                raise BundleError(
                    f"weights {missing[:3]} are missing from {params_name}; recompile the bundle"
                )
            self.params = [get(by_name, n) for n in param_names]
            if self.raw_weights_for:
                self.raw_params = list(self.params)
            if self.vm.module.implements_function(
                TRANSFORM_PARAMS
            ):  # packed weights, see _tvm.prepare_params
                self.vm.set_input(TRANSFORM_PARAMS, *self.params)
                self.vm.invoke_stateful(TRANSFORM_PARAMS)
                self.params = [
                    self._output(TRANSFORM_PARAMS, k)
                    for k in range(self._output_arity(TRANSFORM_PARAMS))
                ]

    def close(self) -> None:
        """Drop the remote handles, then the session: the connection closes with the last one."""
        self.vm = self.params = self.dev = self._output = self._output_arity = None
        self.raw_params = []
        self.session.close()

    def _set_input(self, function: str, inputs: Sequence[np.ndarray]) -> None:
        args = [self._tensor(np.ascontiguousarray(a), self.dev) for a in inputs]
        params = self.raw_params if function in self.raw_weights_for else self.params
        self.vm.set_input(function, *args, *params)

    def run(self, function: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run `function` on the remote; its outputs, downloaded."""
        with self.session.calls(f"running {function}"):
            self._set_input(function, inputs)
            self.vm.invoke_stateful(function)
            arity = self._output_arity(function)
            if arity == -1:  # a single tensor
                return [self._output(function).numpy()]
            return [self._output(function, k).numpy() for k in range(arity)]

    def time(
        self, function: str, inputs: Sequence[np.ndarray], warmup: int, runs: int
    ) -> tuple[float, np.ndarray]:
        """Warm-up total and per-run latencies (ms), measured on the device by `time_evaluator`."""
        with self.session.calls(f"timing {function}"):
            self._set_input(function, inputs)
            warmup_ms = 0.0
            if warmup:
                warm = self.vm.time_evaluator("invoke_stateful", self.dev, number=warmup, repeat=1)(
                    function
                )
                warmup_ms = float(warm.mean) * warmup * 1e3
            timed = self.vm.time_evaluator("invoke_stateful", self.dev, number=1, repeat=runs)(
                function
            )
            return warmup_ms, np.asarray(timed.results, dtype=np.float64) * 1e3


class RemoteEngine:
    """A bundle artifact on a remote device, an `Engine` (engine.py: `Model` pads and slices as it
    does locally) plus `time` on the device. One RPC session carries one call at a time: calls
    from several threads take turns."""

    fixed_shapes = True

    def __init__(self, bundle: Bundle, profile: str, session: RemoteSession):
        self.artifact = bundle.artifact(profile)
        check_artifact_runs(self.artifact.requires, self.artifact.is_gpu, profile, session.device)
        lib_path = bundle.file(self.artifact.file)  # checksummed before anything is uploaded
        weights = bundle.weights_entry(self.artifact.weights)
        params_blob = bundle.file(weights["file"]).read_bytes()
        self.input_names = [i["name"] for i in bundle.inputs]
        self.session = session
        self.vm = RemoteVM(session, lib_path, params_blob, weights["names"], name=profile)
        self._turn = threading.Lock()

    def run(self, bucket: Bucket | None, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._turn:
            return self.vm.run(bucket.function, [arrays[n] for n in self.input_names])

    def time(
        self, bucket: Bucket, arrays: dict[str, np.ndarray], warmup: int, runs: int
    ) -> tuple[float, np.ndarray]:
        with self._turn:
            return self.vm.time(
                bucket.function, [arrays[n] for n in self.input_names], warmup, runs
            )

    def close(self) -> None:
        """Free the remote VM and weights, end the session (the server can serve the next one)."""
        self.vm.close()


def load_remote(
    bundle_dir: str | Path,
    address: str | tuple[str, int],
    key: str,
    artifact: str | None = None,
    session_timeout: float = SESSION_TIMEOUT_S,
    request_timeout: float = REQUEST_TIMEOUT_S,
):
    """A `Model` whose artifact runs on the device behind `key` (the session lives as long)."""
    from .model import Model

    bundle = Bundle(bundle_dir)
    session = connect(
        address, key, session_timeout=session_timeout, request_timeout=request_timeout
    )
    try:
        choice = select_remote(bundle, session.device, artifact)
        return Model(bundle, RemoteEngine(bundle, choice.artifact, session), choice)
    except BaseException:
        session.close()  # free the server now, not when the traceback is collected
        raise


def wait_for_server(
    address: str | tuple[str, int], key: str, timeout: float, poll: float = 0.5
) -> None:
    """Block until a free server is registered under `key` (bounded by `timeout` s)."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            summary = tracker_summary(address, timeout=min(CONNECT_TIMEOUT_S, timeout))
            if summary.get("queue_info", {}).get(key, {}).get("free", 0) and key in registered_keys(
                summary
            ):
                return
            last = f"registered: {sorted(registered_keys(summary)) or 'none'}"
        except RemoteError as err:
            last = str(err)
        time.sleep(poll)
    raise RemoteError(f"no server registered under key {key!r} within {timeout:.0f} s ({last})")
