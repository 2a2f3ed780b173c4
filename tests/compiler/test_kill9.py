"""`kill -9` at any moment of `tvmdeploy compile`: nothing at the output path, or a whole bundle.

Each kill comes a seeded short delay after the run logs the start of a seeded stage; the stages
are weighted toward the end, where packaging happens, so that several kills land inside it
whatever the machine's speed. Tuning's own kill -9 test is in test_tune.py.
"""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from tvmdeploy.runtime import Bundle

SEEDS = (1, 2, 3, 4, 5)
# The stages that `compile` logs as "[i/n] <stage> …" as each one starts, in order.
STAGES = ("export", "import", "reference", "build", "verify", "package")
DELAY_S = 0.25  # the longest delay after a stage's start line; packaging takes ~0.1 s
# One bucket as long as the model's positions: no symbolic-length fallback to build, which
# triples the build and proves nothing about packaging.
BUCKETS = "1x128"


def compile_command(model_dir, out) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tvmdeploy.compiler.cli",
        "compile",
        str(model_dir),
        "-o",
        str(out),
        "--buckets",
        BUCKETS,
    ]


def source(stage: str, model_dir, exported):
    """What a run compiles: the model folder where the kill lands in its export, else the
    session's export of it (the .onnx with its config beside it), which skips optimum's export
    (the costliest stage here) and packages the same bundle."""
    return model_dir if stage == "export" else exported.onnx_path


def start(model_dir, out, env) -> subprocess.Popen:
    return subprocess.Popen(
        compile_command(model_dir, out),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def moment(seed: int) -> tuple[str, float]:
    """A stage (more of them late, near packaging) and a delay after its start line."""
    rng = random.Random(seed)
    fraction = 1 - rng.random() ** 2
    return STAGES[min(int(fraction * len(STAGES)), len(STAGES) - 1)], rng.random() * DELAY_S


def kill_during(proc: subprocess.Popen, stage: str, delay: float) -> None:
    """kill -9 the run (its whole process group) `delay` s after it logs that `stage` starts."""
    marker = re.compile(rb"\[\d+/\d+\] " + stage.encode() + rb"\b")
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker.search(line):
            break
    else:
        proc.wait(timeout=60)
        pytest.fail(f"the run ended before {stage}: " + b"".join(seen).decode()[-2000:])
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()


def assert_whole_or_absent(out) -> str:
    if not out.exists():
        return "absent"
    Bundle(out).verify()  # every file present and matching its checksum
    return "whole"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("kill9-cache")
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("TVM_")},
        "TVMDEPLOY_CACHE_DIR": str(cache),
    }


def test_kill9_anywhere_leaves_no_partial_bundle(tiny_model_dir, tiny_exported, tmp_path, env):
    out = tmp_path / "k.tvmd"
    outcomes = []
    for seed in SEEDS:
        stage, delay = moment(seed)
        kill_during(start(source(stage, tiny_model_dir, tiny_exported), out, env), stage, delay)
        outcomes.append((stage, round(delay, 2), assert_whole_or_absent(out)))
        shutil.rmtree(out, ignore_errors=True)
    # A complete run afterwards cleans up whatever the killed runs left beside the output.
    done = start(tiny_exported.onnx_path, out, env)
    _, err = done.communicate(timeout=900)
    assert done.returncode == 0, err.decode()[-2000:]
    assert assert_whole_or_absent(out) == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.tvmd"], outcomes
