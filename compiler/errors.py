"""Compiler error types (the runtime's error types are shared: one hierarchy to catch)."""

from tvmdeploy.runtime.errors import (
    BundleError,
    IncompatibleDeviceError,
    InputError,
    TvmdeployError,
)

__all__ = [
    "BundleError",
    "IncompatibleDeviceError",
    "InputError",
    "ModelLoadError",
    "ParityError",
    "TvmdeployError",
    "UnsupportedOperatorError",
]


class ModelLoadError(TvmdeployError):
    """The model path is missing, unreadable, or not a model tvmdeploy can export."""


class UnsupportedOperatorError(TvmdeployError):
    """The ONNX graph uses operators TVM's Relax importer does not implement."""

    def __init__(self, ops: list[str], model: str):
        self.ops = ops
        super().__init__(
            f"{model}: TVM's ONNX importer does not support operator(s) {', '.join(ops)}. "
            "Export with another opset (--opset) or simplify the model so these ops disappear."
        )


class ParityError(TvmdeployError):
    """A built artifact's outputs differ from the reference by more than the tolerance."""
