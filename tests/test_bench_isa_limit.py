"""bench/isa_limit.py: the patched `xgetbv` reports XCR0 without AVX-512 state, and the patched
onnxruntime copy still loads and computes correctly in a child process (the benchmark's AVX2
baselines rest on both)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import isa_limit

pytestmark = pytest.mark.skipif(
    shutil.which("objdump") is None or shutil.which("gcc") is None, reason="needs binutils and gcc"
)

XCR0_SOURCE = r"""
#include <stdint.h>
uint64_t xcr0(void) {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}
"""


def read_xcr0(library: Path) -> int:
    read = ctypes.CDLL(str(library)).xcr0
    read.restype = ctypes.c_uint64
    return read()


def test_patched_xgetbv_reports_no_avx512_state(tmp_path):
    source = tmp_path / "xcr0.c"
    source.write_text(XCR0_SOURCE)
    original = tmp_path / "libxcr0.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", str(source), "-o", str(original)], check=True)
    assert read_xcr0(original) & 0x7 == 0x7  # x87, SSE and AVX state: any x86-64-v3 machine

    patched = tmp_path / "libxcr0-patched.so"
    shutil.copy(original, patched)
    assert isa_limit.hide_avx512(patched) == 1
    assert (
        read_xcr0(patched) & 0xFFFFFFFF == 0x7
    )  # no opmask/ZMM bits (5-7): MLAS takes AVX2 kernels


def test_limited_onnxruntime_runs_in_a_child(tmp_path):
    env = {**os.environ, **isa_limit.limited_environment("avx2", tmp_path)}
    assert env["DNNL_MAX_CPU_ISA"] == "AVX2"
    child = r"""
import numpy as np
from bench import isa_limit
from onnx import TensorProto, helper
import onnxruntime as ort

assert isa_limit.limited_isa() == "avx2"
graph = helper.make_graph(
    [helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
    [helper.make_tensor_value_info(x, TensorProto.FLOAT, [64, 64]) for x in "ab"],
    [helper.make_tensor_value_info("c", TensorProto.FLOAT, [64, 64])],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
a, b = np.random.default_rng(0).standard_normal((2, 64, 64), dtype=np.float32)
np.testing.assert_allclose(session.run(None, {"a": a, "b": b})[0], a @ b, rtol=1e-4, atol=1e-4)
print("ok")
"""
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] += os.pathsep + str(root)
    result = subprocess.run(
        [sys.executable, "-c", child],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    assert isa_limit.limited_isa() is None  # this process: the installed package, unlimited
