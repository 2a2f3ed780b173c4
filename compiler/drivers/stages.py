"""Numbered stage lines with timings, through `logging`; an unexpected error inside a stage
(TVM's, ONNX's, optimum's) becomes a StageError that names the stage and what to try."""

from __future__ import annotations

import logging
import time
from typing import Self

from ..errors import StageError, TvmdeployError

logger = logging.getLogger(__name__)


#: What to try when a stage fails inside TVM, ONNX or optimum (not with a tvmdeploy error).
STAGE_HINTS = {
    "export": "check that the model loads with transformers, or pass an exported .onnx file",
    "import": "the ONNX graph uses something TVM's importer cannot take: try another --opset, "
    "or simplify the graph (e.g. onnxslim) and compile the .onnx file",
    "reference": "ONNX Runtime could not run the exported graph: check it with onnxruntime",
    "tune": "compile without --tune (the rule-based schedules need no tuning)",
    "build": "compile for another profile (-t), or without --tune; run with -v and report the "
    "traceback",
    "verify": "run with -v for the traceback; --no-verify skips the check (not recommended)",
    "package": "check the output path and free disk space",
}


class Stages:
    """Numbered stage lines with timings, through `logging`."""

    def __init__(self, total: int):
        self.total, self.index = total, 0

    def __call__(self, title: str) -> _Stage:
        self.index += 1
        return _Stage(f"[{self.index}/{self.total}] {title}")


class _Stage:
    """One stage: logs its start and end; an unexpected error inside it (TVM's, ONNX's) becomes
    a StageError naming the stage, with one line on what to try (traceback kept as the cause)."""

    def __init__(self, title: str):
        self.title = title
        self.name = title.split("] ", 1)[-1].split(" ", 1)[0]

    def __enter__(self) -> Self:
        self.start = time.perf_counter()
        logger.info("%s …", self.title)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        took = time.perf_counter() - self.start
        logger.info("%s %s in %.1f s", self.title, "done" if exc_type is None else "failed", took)
        if exc is not None and isinstance(exc, Exception) and not isinstance(exc, TvmdeployError):
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise StageError(
                f"{self.name} failed ({type(exc).__name__}: {first[:300]}); "
                f"{STAGE_HINTS.get(self.name, 'run with -v for the traceback')}. "
                "Nothing was written."
            ) from exc
