"""The cheap `inspect.stack` given to TVMScript's parser: what the parser reads is what
`inspect.stack` gives, and modules with class-defined functions and closures still parse."""

import inspect

import numpy as np
from tvmdeploy.compiler import tvmscript_stack


def test_frames_and_the_first_source_lines_are_inspects():
    cheap, full = tvmscript_stack.stack(), inspect.stack()  # one line: the same frames
    assert [f.frame for f in cheap] == [f.frame for f in full]
    for mine, theirs in zip(cheap[: tvmscript_stack.CONTEXT_FRAMES], full, strict=False):
        assert mine.code_context == theirs.code_context
        assert (mine.filename, mine.lineno, mine.function) == (
            theirs.filename,
            theirs.lineno,
            theirs.function,
        )


def test_tvmscript_parses_and_runs_with_it_installed():
    import tvm
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    tvmscript_stack.install()
    step = 1.5  # a closure variable the parser resolves through the stack's frames

    @I.ir_module
    class Module:  # a prim_func inside a class: the parser reads frames[2]'s source line
        @T.prim_func
        def add(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
            for i in range(4):
                b[i] = a[i] + T.float32(step)

        @R.function
        def main(x: R.Tensor((4,), "float32")):
            cls = Module
            return R.call_tir(cls.add, (x,), R.Tensor((4,), "float32"))

    vm = tvm.relax.VirtualMachine(tvm.compile(Module, "llvm"), tvm.cpu())
    x = np.arange(4, dtype="float32")
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), x + step)
