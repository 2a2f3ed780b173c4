"""Every error the compiler side raises on purpose, under the one `TvmdeployError` callers catch.

The runtime's errors (bundle, device, input, remote) live in `tvmdeploy.runtime.errors`, the
profiles' in `tvmdeploy.targets.errors`; they are re-exported here so that a compiler module, the
CLI or a script imports every error from one place. Each message says what to do next.
"""

from __future__ import annotations

import signal
from pathlib import Path

from tvmdeploy.runtime.errors import (
    BundleError,
    IncompatibleDeviceError,
    InputError,
    OptionError,
    RemoteError,
    SignatureError,
    TvmdeployError,
)
from tvmdeploy.targets.errors import NoProfileFitsError, ProfileError, UnknownTargetError

__all__ = [
    "BundleError",
    "CudaBuildError",
    "IncompatibleDeviceError",
    "InputError",
    "ModelLoadError",
    "NoProfileFitsError",
    "OptionError",
    "ParityError",
    "ProfileError",
    "QemuUnavailable",
    "RemoteError",
    "ReportError",
    "SignatureError",
    "StageError",
    "ToolMissingError",
    "TuningError",
    "TuningInterrupted",
    "TvmdeployError",
    "UnknownTargetError",
    "UnsupportedOperatorError",
]


class ModelLoadError(TvmdeployError):
    """The model path is missing, unreadable, or not a model tvmdeploy can export."""


class UnsupportedOperatorError(TvmdeployError):
    """The ONNX graph uses operators (or forms of them) that neither TVM's Relax importer nor
    tvmdeploy's rewrites (onnx_contrib.py) take; the message names each op, domain and node."""

    def __init__(self, ops: list[str], model: str, detail: str = ""):
        self.ops = ops
        where = f" ({detail})" if detail else ""
        super().__init__(
            f"{model}: cannot compile operator(s) {', '.join(ops)}{where}. "
            "Export with another opset (--opset) or without the fusions that produce them "
            "(e.g. ONNX Runtime's transformer optimizer), or open an issue with the op and node."
        )


class StageError(TvmdeployError):
    """A compile stage failed inside TVM, ONNX or optimum; the message names the stage and what to
    try, and the original error is kept as the cause (`-v` shows its traceback)."""


class ParityError(TvmdeployError):
    """A built artifact's outputs differ from the reference by more than the tolerance."""


class TuningError(TvmdeployError):
    """Tuning cannot run as asked (wrong kind of profile, a device this host cannot run, a busy
    cache); the message says what to do instead."""


class TuningInterrupted(TvmdeployError):
    """SIGINT or SIGTERM stopped tuning. Every measured record is saved; rerun to continue."""

    def __init__(self, signum: int, saved: int, cache: Path):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(
            f"tuning stopped by {name}; {saved} new record(s) are saved in {cache}. "
            "Run the same command again to continue where it stopped."
        )


class ToolMissingError(TvmdeployError):
    """A program the build needs (a profile's cross compiler) is not installed here."""


class QemuUnavailable(TvmdeployError):
    """qemu-user or the arm64 Python sysroot is missing, so aarch64 code cannot be run here."""


class CudaBuildError(TvmdeployError):
    """nvcc could not compile TVM's kernels, or TVM's CUDA module has a layout we do not know."""


class ReportError(TvmdeployError):
    """A bench JSON is missing, unreadable, of another schema or version, or clashes with one."""
