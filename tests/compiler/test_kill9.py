"""`kill -9` at any moment of `tvmdeploy compile`: nothing at the output path, or a whole bundle.

The moments are seeded fractions of a measured uninterrupted run, weighted toward its end, where
packaging happens. Tuning's own kill -9 test is in test_tune.py.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from tvmdeploy.runtime import Bundle

SEEDS = (1, 2, 3, 4, 5)


def compile_command(model_dir, out) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tvmdeploy.compiler.cli",
        "-q",
        "compile",
        str(model_dir),
        "-o",
        str(out),
        "--buckets",
        "1x16",
    ]


def start(model_dir, out, env) -> subprocess.Popen:
    return subprocess.Popen(
        compile_command(model_dir, out),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


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


def test_kill9_anywhere_leaves_no_partial_bundle(tiny_model_dir, tmp_path, env):
    out = tmp_path / "k.tvmd"
    began = time.perf_counter()
    first = start(tiny_model_dir, tmp_path / "full.tvmd", env)
    assert first.wait(timeout=900) == 0, first.stderr.read().decode()[-2000:]
    full_s = time.perf_counter() - began
    outcomes = []
    for seed in SEEDS:
        fraction = 1 - random.Random(seed).random() ** 2  # more kills late, near packaging
        proc = start(tiny_model_dir, out, env)
        time.sleep(full_s * fraction)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        outcomes.append(assert_whole_or_absent(out))
        shutil.rmtree(out, ignore_errors=True)
    # A complete run afterwards cleans up whatever the killed runs left beside the output.
    done = start(tiny_model_dir, out, env)
    assert done.wait(timeout=900) == 0, done.stderr.read().decode()[-2000:]
    assert assert_whole_or_absent(out) == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.tvmd", "k.tvmd"], outcomes


def test_kill9_while_replacing_keeps_the_old_bundle(tiny_bundle, tmp_path):
    """A run killed after moving the old bundle aside: the next run puts it back first."""
    from tvmdeploy.compiler.package import _recover

    out = tmp_path / "b.tvmd"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    shutil.copytree(tiny_bundle, tmp_path / f".b.tvmd.old-{dead}")
    (tmp_path / f".b.tvmd.partial-{dead}").mkdir()
    _recover(out)
    Bundle(out).verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tvmd"]
