"""tvmdeploy's thin runtime: load a bundle, pick the artifact this device runs best, run it.

What each module holds: docs/design.md. This package must never import the compiler: no torch,
transformers, onnx or TVM's compiler
library is loaded by `import tvmdeploy.runtime` or `load()` (TVM is imported runtime-only, and
only when a compiled artifact is loaded). ONNX Runtime is imported only for its fallback engine.
"""

from .bundle import Artifact, Bucket, Bundle
from .engine import Engine
from .errors import (
    BundleError,
    IncompatibleDeviceError,
    InputError,
    OptionError,
    RemoteError,
    SignatureError,
    TvmdeployError,
)
from .generate import GenerationResult, GenerationStream, Generator
from .model import Model, load
from .probe import DeviceInfo, probe
from .select import Choice
from .tasks import Entity, Prediction

__all__ = [
    "Artifact",
    "Bucket",
    "Bundle",
    "BundleError",
    "Choice",
    "DeviceInfo",
    "Engine",
    "Entity",
    "GenerationResult",
    "GenerationStream",
    "Generator",
    "IncompatibleDeviceError",
    "InputError",
    "Model",
    "OptionError",
    "Prediction",
    "RemoteError",
    "SignatureError",
    "TvmdeployError",
    "load",
    "probe",
]
