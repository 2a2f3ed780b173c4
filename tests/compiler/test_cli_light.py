"""The device-side commands stay light through the installed `tvmdeploy` console script.

A `sitecustomize` on PYTHONPATH records, when the command's process exits, which modules it loaded
and whether TVM's compiler library was mapped; the command itself runs exactly as a user runs it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "onnx", "optimum", "matplotlib.pyplot")

SITECUSTOMIZE = """
import atexit, json, os, sys

def _dump():
    maps = open("/proc/self/maps").read()
    with open(os.environ["TVMDEPLOY_TEST_DUMP"], "w") as f:
        json.dump({"modules": sorted(sys.modules), "compiler_lib": "libtvm_compiler" in maps,
                   "runtime_lib": "libtvm_runtime" in maps}, f)

atexit.register(_dump)
"""


def console_script() -> Path:
    script = Path(sys.executable).with_name("tvmdeploy")
    if not script.exists():
        found = shutil.which("tvmdeploy")
        assert found, "the tvmdeploy console script is not installed (pip install -e .)"
        script = Path(found)
    return script


def run_command(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    dump = tmp_path / "dump.json"
    dump.unlink(missing_ok=True)
    # A user's shell: none of the variables this test session (which imported the compiler) set.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TVM_", "TVMDEPLOY_"))}
    env.update(
        PYTHONPATH=str(hook),
        TVMDEPLOY_TEST_DUMP=str(dump),
        TVMDEPLOY_CACHE_DIR=str(tmp_path / "cache"),
    )
    result = subprocess.run(
        [str(console_script()), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    return result, json.loads(dump.read_text())


@pytest.mark.parametrize(
    "command",
    [
        ["targets", "--json"],
        ["inspect", "{bundle}", "--check"],
        ["bench", "{bundle}", "--compare", "", "--seq", "16", "--warmup", "1", "--runs", "3"],
        ["report", "{bench_json}"],
        ["verify", "{bundle}"],
    ],
)
def test_device_commands_load_no_compiler(command, tiny_bundle, tmp_path):
    bench_json = tmp_path / "b.json"
    if "{bench_json}" in command:  # a real bench file to merge, written by the bench command itself
        made, _ = run_command(
            tmp_path,
            "bench",
            str(tiny_bundle),
            "--compare",
            "",
            "--seq",
            "16",
            "--warmup",
            "1",
            "--runs",
            "3",
            "--json",
            str(bench_json),
        )
        assert made.returncode == 0, made.stderr
    args = [a.format(bundle=tiny_bundle, bench_json=bench_json) for a in command]
    result, loaded = run_command(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    heavy = [m for m in HEAVY if m in loaded["modules"]]
    assert heavy == [], f"{args[0]} loaded {heavy}"
    assert not loaded["compiler_lib"], f"{args[0]} mapped libtvm_compiler"
    if args[0] in ("inspect", "bench"):
        assert loaded["runtime_lib"]


def test_the_checker_sees_a_heavy_command(tmp_path):
    """The same probe does see the compiler where it is loaded: `compile` on a missing model."""
    result, loaded = run_command(
        tmp_path, "compile", str(tmp_path / "missing"), "-o", str(tmp_path / "x.tvmd")
    )
    assert result.returncode == 2 and "no such file" in result.stderr
    assert "tvmdeploy.compiler.drivers.compile" in loaded["modules"]


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "{bundle}", "The bundle", "--max-new-tokens", "4"],
        ["generate", "{bundle}", "hi", "--chat", "--max-new-tokens", "4", "--json"],
        ["inspect", "{bundle}"],
    ],
)
def test_generation_commands_load_no_compiler(command, tiny_llm_bundle, tmp_path):
    args = [a.format(bundle=tiny_llm_bundle) for a in command]
    result, loaded = run_command(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    heavy = [m for m in HEAVY if m in loaded["modules"]]
    assert heavy == [], f"{args[0]} loaded {heavy}"
    assert not loaded["compiler_lib"], f"{args[0]} mapped libtvm_compiler"
    assert loaded["runtime_lib"] or args[0] == "inspect"
