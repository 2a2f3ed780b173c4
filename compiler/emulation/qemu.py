"""Emulated verification of aarch64 artifacts: an arm64 Python sysroot run under qemu-user.

An x86 machine cannot load an aarch64 `lib.so`, so verification runs it in an *aarch64* Python
under `qemu-aarch64-static`. That Python is Debian's `python3.11` for arm64 plus the aarch64 wheels
of the same TVM, tvm-ffi and numpy versions as this environment, unpacked (never installed) into a
sysroot in the user's cache. It is prepared once
(`python -m tvmdeploy.compiler.emulation.qemu --prepare`,
which `.ci/setup.sh` runs), staged and renamed into place, so a half-made sysroot is never used.

Importing TVM under emulation takes ~10 s, so all cases of one artifact run in one emulated
process: inputs, weights and outputs cross over as files in a temporary directory.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tvmdeploy.runtime.paths import cache_dir

from ..errors import QemuUnavailable

logger = logging.getLogger(__name__)

RECIPE = 1  # bump when the sysroot recipe changes; a new recipe gets a new directory
DEBIAN_PYTHON = "3.11"  # Debian 12 (bookworm)'s python3; the wheels are chosen for it
DEBIAN_ROOTS = [f"python{DEBIAN_PYTHON}-minimal", f"libpython{DEBIAN_PYTHON}-stdlib", "libstdc++6"]
# The aarch64 wheels, pinned to the versions installed here (ml_dtypes and typing_extensions are
# TVM's own runtime imports).
WHEELS = ["apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions"]
WHEEL_PLATFORM = "manylinux_2_28_aarch64"  # the tag the TVM wheel carries; glibc 2.36 satisfies it
WORKER = Path(__file__).with_name("qemu_worker.py")
EM_AARCH64 = 183


@dataclass(frozen=True)
class ArmPython:
    """An aarch64 Python that runs here under qemu-user, with TVM's runtime importable."""

    qemu: Path  # qemu-aarch64-static
    root: Path  # the sysroot qemu resolves absolute paths in (`-L`): loader, libc, python stdlib
    python: Path  # root/usr/bin/python3.11
    site: Path  # the aarch64 wheels (TVM, tvm-ffi, numpy …)
    info: dict[str, Any]  # what sysroot.json records: versions, Debian packages, set-up time

    def command(self, *args: str, cpu: str = "max") -> list[str]:
        """argv that runs the emulated Python with `args` on the qemu CPU model `cpu`."""
        return [str(self.qemu), "-L", str(self.root), "-cpu", cpu, str(self.python), "-I", *args]

    def env(self) -> dict[str, str]:
        """Environment for the emulated Python: TVM's runtime alone, no torch DLPack probe."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "QEMU_"))}
        env.update(
            TVM_USE_RUNTIME_LIB="1",
            TVM_FFI_DISABLE_TORCH_C_DLPACK="1",
            TVMDEPLOY_ARM_SITE=str(self.site),
        )
        return env


@dataclass
class EmulatedRun:
    """Outputs of every case from one emulated process, or why there are none."""

    cpu: str
    outputs: list[list[np.ndarray]] | None  # per case, per model output; None when the run failed
    returncode: int
    detail: str  # empty on success; what went wrong otherwise
    seconds: float

    @property
    def ok(self) -> bool:
        return self.outputs is not None


# -- locating tools and the sysroot -------------------------------------------------------------


def find_qemu() -> Path:
    """The qemu-user binary for aarch64; the error says which Debian package provides it."""
    for name in ("qemu-aarch64-static", "qemu-aarch64"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise QemuUnavailable(
        "qemu-aarch64-static is not installed; run `bash .ci/setup.sh` or "
        "`apt-get install qemu-user-static`"
    )


def pinned_wheels() -> dict[str, str]:
    """The wheel versions the sysroot must match: those installed in this environment."""
    pins = {}
    for name in WHEELS:
        try:
            pins[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise QemuUnavailable(
                f"{name} is not installed in this environment ({sys.prefix})"
            ) from None
    return pins


def sysroot_base() -> Path:
    """Where sysroots live: $TVMDEPLOY_ARM64_SYSROOT, else <cache dir>/arm64-sysroot."""
    explicit = os.environ.get("TVMDEPLOY_ARM64_SYSROOT")
    return Path(explicit) if explicit else cache_dir() / "arm64-sysroot"


def sysroot_dir(pins: dict[str, str] | None = None) -> Path:
    """The sysroot for these wheel versions (a version change gets a fresh one, never a mix)."""
    pins = pins or pinned_wheels()
    key = json.dumps([RECIPE, DEBIAN_PYTHON, sorted(pins.items())])
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return sysroot_base() / f"py{DEBIAN_PYTHON}-tvm{pins['apache-tvm']}-{digest}"


def _arm_python(path: Path, qemu: Path) -> ArmPython:
    info = json.loads((path / "sysroot.json").read_text())
    return ArmPython(
        qemu,
        path / "root",
        path / "root" / "usr" / "bin" / f"python{DEBIAN_PYTHON}",
        path / "site",
        info,
    )


def find_arm64_python() -> ArmPython:
    """The prepared arm64 Python; raises QemuUnavailable (saying how to prepare it) if absent."""
    qemu = find_qemu()
    path = sysroot_dir()
    if not (path / "sysroot.json").is_file():
        raise QemuUnavailable(
            f"the arm64 Python sysroot is not prepared ({path}); run "
            "`python -m tvmdeploy.compiler.emulation.qemu --prepare` (~1-2 min once; "
            "needs the Debian and "
            "PyPI mirrors)"
        )
    return _arm_python(path, qemu)


def ensure_arm64_python() -> ArmPython:
    """The arm64 Python, prepared first if needed (once; concurrent callers wait for the first)."""
    try:
        return find_arm64_python()
    except QemuUnavailable:
        pass
    qemu = find_qemu()
    path = sysroot_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "sysroot.json").is_file():
            for stale in path.parent.glob(".stage-*"):  # left by a killed set-up; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            _prepare(path, qemu)
    return _arm_python(path, qemu)


# -- preparing the sysroot ----------------------------------------------------------------------


def _run(cmd: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise QemuUnavailable(
            f"{what}: {cmd[0]} is not installed (Debian/Ubuntu tools are needed)"
        ) from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise QemuUnavailable(
            f"{what} failed (exit {done.returncode}): {' '.join(cmd[:4])} …\n{tail}"
        )
    return done


def _apt_options(apt_dir: Path) -> list[str]:
    """apt options for a private arm64 view of the system's sources: no root, no system change."""
    for sub in ("lists/partial", "archives/partial"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    (apt_dir / "status").touch()
    options = {
        "APT::Architecture": "arm64",
        "APT::Architectures::": "arm64",
        "Dir::State::Lists": apt_dir / "lists",
        "Dir::State::status": apt_dir / "status",  # an empty system: resolve the full closure
        "Dir::Cache": apt_dir,
        "Dir::Cache::archives": apt_dir / "archives",
        "Acquire::Languages": "none",
        "Debug::NoLocking": "1",  # the system's apt locks are not ours to take
    }
    if os.geteuid() == 0:  # apt's _apt sandbox user cannot write into our private directory
        options["APT::Sandbox::User"] = "root"
    return [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]


def _debian_packages(stage: Path, root: Path) -> list[str]:
    """Debian's arm64 python and its dependency closure, downloaded and unpacked into `root`."""
    apt = _apt_options(stage / "apt")
    _run(["apt-get", *apt, "update", "-qq"], "apt-get update (arm64 package lists)")
    _run(
        ["apt-get", *apt, "install", "--download-only", "--no-install-recommends", "-y", "-qq"]
        + DEBIAN_ROOTS,
        f"downloading {', '.join(DEBIAN_ROOTS)} for arm64 (Debian 12 sources expected)",
    )
    debs = sorted((stage / "apt" / "archives").glob("*.deb"))
    if not debs:
        raise QemuUnavailable(
            "apt downloaded no arm64 packages; check the Debian sources in /etc/apt"
        )
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
    return [deb.name for deb in debs]


def _wheels(site: Path, pins: dict[str, str]) -> None:
    """The aarch64 wheels of the pinned versions, unpacked into `site` (no dependency solving)."""
    wanted = [f"{name}=={version}" for name, version in pins.items()]
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--target",
            str(site),
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            WHEEL_PLATFORM,
            "--python-version",
            DEBIAN_PYTHON,
            "--implementation",
            "cp",
            *wanted,
        ],
        f"pip: aarch64 wheels {', '.join(wanted)}",
    )


def _smoke_test(arm: ArmPython, pins: dict[str, str]) -> dict[str, str]:
    """Import TVM's runtime and numpy in the emulated Python; their versions must be the pins."""
    code = (
        "import json, os, sys; sys.path.insert(0, os.environ['TVMDEPLOY_ARM_SITE']); "
        "import platform, numpy, tvm, tvm.runtime.vm; "
        "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(), "
        "'numpy': numpy.__version__, 'apache-tvm': tvm.__version__}))"
    )
    done = _run(
        arm.command("-c", code),
        "importing TVM in the emulated arm64 Python",
        env=arm.env(),
        timeout=600,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    want = {"machine": "aarch64", "numpy": pins["numpy"], "apache-tvm": pins["apache-tvm"]}
    wrong = {k: (found.get(k), v) for k, v in want.items() if found.get(k) != v}
    if wrong:
        raise QemuUnavailable(
            f"the emulated Python reports {wrong} (found, expected); delete {arm.root.parent}"
        )
    return found


def _prepare(path: Path, qemu: Path) -> None:
    """Build the sysroot in a staging directory beside `path`, check it, then rename it there."""
    pins = pinned_wheels()
    start = time.perf_counter()
    logger.info("preparing the arm64 Python sysroot in %s (once; ~1-2 min)", path)
    stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=path.parent))
    try:
        root = stage / "root"
        root.mkdir()
        packages = _debian_packages(stage, root)
        _wheels(stage / "site", pins)
        shutil.rmtree(stage / "apt")
        info: dict[str, Any] = {
            "recipe": RECIPE,
            "wheels": pins,
            "debian_packages": packages,
            "wheel_platform": WHEEL_PLATFORM,
        }
        (stage / "sysroot.json").write_text(json.dumps(info, indent=1))
        arm = _arm_python(stage, qemu)
        info["emulated"] = _smoke_test(arm, pins)
        info["prepared_seconds"] = round(time.perf_counter() - start, 1)
        (stage / "sysroot.json").write_text(json.dumps(info, indent=1))
        os.rename(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    logger.info("arm64 sysroot ready in %.0f s", time.perf_counter() - start)


# -- running artifacts --------------------------------------------------------------------------


def elf_machine(path: str | Path) -> int:
    """The ELF e_machine of a file (183 = aarch64, 62 = x86-64)."""
    with open(path, "rb") as f:
        header = f.read(20)
    if header[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


def _failure(returncode: int, stderr: str, cpu: str) -> str:
    """A readable reason for a failed emulated run: the signal, or the worker's own error."""
    signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if signum == signal.SIGILL:
        return (
            f"illegal instruction (SIGILL) under qemu -cpu {cpu}: the library uses an instruction "
            f"this CPU model does not have"
        )
    if signum:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"the emulated process died of {name} under qemu -cpu {cpu}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "no error output"
    return f"the emulated process failed (exit {returncode}): {last}"


def _no_core_dumps() -> None:
    """In the child: a guest crash must not leave a core file of qemu behind."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@dataclass
class _WorkerDone:
    returncode: int
    detail: str  # empty when the worker ran and wrote outputs.npz
    seconds: float


def run_worker(
    arm: ArmPython, worker: Path, lib_path: str | Path, work: Path, cpu: str, timeout: float
) -> _WorkerDone:
    """Run `worker LIB_SO WORK_DIR` in the emulated Python; a crash or a timeout is a reason."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            arm.command(str(worker), str(Path(lib_path).resolve()), str(work), cpu=cpu),
            check=False,
            cwd=work,
            env=arm.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=_no_core_dumps,
        )
    except subprocess.TimeoutExpired:
        return _WorkerDone(
            -signal.SIGKILL,
            f"timed out after {timeout:.0f} s under qemu -cpu {cpu}",
            time.perf_counter() - start,
        )
    seconds = time.perf_counter() - start
    if done.returncode != 0 or not (work / "outputs.npz").is_file():
        return _WorkerDone(done.returncode, _failure(done.returncode, done.stderr, cpu), seconds)
    return _WorkerDone(0, "", seconds)


def run_cases(
    lib_path: str | Path,
    imported,
    cases,
    cpu: str,
    arm: ArmPython | None = None,
    timeout: float = 1800,
) -> EmulatedRun:
    """Run every (bucket, inputs, _) case of an aarch64 `lib_path` in one emulated process.

    Weights go over as a TVM param dict, inputs and outputs as .npz files. A crash (e.g. SIGILL
    on a CPU model without the library's instructions) comes back as a failed run, not an error.
    """
    import tvm

    arm = arm or find_arm64_python()
    machine = elf_machine(lib_path)
    if machine != EM_AARCH64:
        return EmulatedRun(
            cpu, None, 0, f"{lib_path} is not an aarch64 library (ELF machine {machine})", 0.0
        )
    with tempfile.TemporaryDirectory(prefix="tvmdeploy-qemu-") as tmp:
        work = Path(tmp)
        (work / "params.bin").write_bytes(
            tvm.runtime.save_param_dict(dict(zip(imported.param_names, imported.params)))
        )
        names = [i["name"] for i in imported.inputs]
        arrays = {
            f"c{k}.{name}": np.ascontiguousarray(case[1][name])
            for k, case in enumerate(cases)
            for name in names
        }
        np.savez(work / "inputs.npz", **arrays)
        spec = {
            "param_names": list(imported.param_names),
            "cases": [
                {
                    "function": bucket.function,
                    "inputs": [f"c{k}.{n}" for n in names],
                    "raw_weights": bucket.name is not None,  # the fallback: weights as stored
                }
                for k, (bucket, _, _) in enumerate(cases)
            ],
        }
        (work / "spec.json").write_text(json.dumps(spec))
        failed = run_worker(arm, WORKER, lib_path, work, cpu, timeout)
        if failed.detail:
            return EmulatedRun(cpu, None, failed.returncode, failed.detail, failed.seconds)
        seconds = failed.seconds
        with np.load(work / "outputs.npz") as saved:
            outputs = []
            for k in range(len(cases)):
                count = sum(1 for key in saved.files if key.startswith(f"c{k}.o"))
                outputs.append([saved[f"c{k}.o{j}"] for j in range(count)])
    return EmulatedRun(cpu, outputs, 0, "", seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tvmdeploy.compiler.emulation.qemu", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--prepare", action="store_true", help="prepare the arm64 Python sysroot if it is missing"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[tvmdeploy] %(message)s")
    try:
        arm = ensure_arm64_python() if args.prepare else find_arm64_python()
    except QemuUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"arm64 Python: {arm.python} (wheels {arm.info['wheels']}) under {arm.qemu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
