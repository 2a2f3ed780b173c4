"""TVMScript's parser without a source lookup for every frame on the stack.

Every `@T.prim_func`, `@I.ir_module` and `@R.function` calls `inspect.stack()`, which reads the
source line of each frame; finding a frame's file scans all of `sys.modules` (about 2,000 in a
compile process, torch and transformers loaded), so each TVMScript function cost tens of
milliseconds. Importing TVM's tensor intrinsics (the int8 kernels' `register_intrinsics`) took
48-58 s of CPU that way, 3.2-3.5 s without (measured in one process each, alternated).

The parser reads only each frame's `frame` (closure variables) and the source line of the third
(`core.utils.is_defined_in_class`), so `stack` gives the first `CONTEXT_FRAMES` in full and the
rest without source. `install` puts it in the three parser entry modules, nowhere else.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types

ENTRY_MODULES = (
    "tvm.tirx.script.parser.entry",
    "tvm.script.parser.ir.entry",
    "tvm.relax.script.parser.entry",
)
#: Frames whose source line the parser reads (frames[2] in is_defined_in_class), plus margin.
CONTEXT_FRAMES = 4


def stack(context: int = 1) -> list[inspect.FrameInfo]:
    """`inspect.stack(context)` with source lines for the first CONTEXT_FRAMES frames only."""
    frame = sys._getframe(1)
    frames = []
    while frame is not None:
        if len(frames) < CONTEXT_FRAMES:
            frames.append(inspect.FrameInfo(frame, *inspect.getframeinfo(frame, context)))
        else:
            code = frame.f_code
            frames.append(
                inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None)
            )
        frame = frame.f_back
    return frames


class _Inspect(types.ModuleType):
    """`inspect` as the parser entry modules see it: the same, but for `stack`."""

    stack = staticmethod(stack)

    def __getattr__(self, name: str):
        return getattr(inspect, name)


def install() -> None:
    """Give the TVMScript parser entry modules the cheap `stack` (idempotent; imports TVM)."""
    proxy = _Inspect("inspect")
    for name in ENTRY_MODULES:
        module = importlib.import_module(name)
        if not isinstance(module.inspect, _Inspect):
            module.inspect = proxy
