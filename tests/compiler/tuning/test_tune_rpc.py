"""`tune(..., rpc=, rpc_key=)` and `tvmdeploy tune --rpc --rpc-key`, for real: a TVM RPC tracker and
rpc_servers on loopback (the fixtures of tests/runtime/test_rpc.py), real MetaSchedule, tiny
budgets.

Candidates are built here as shared libraries and timed on the server; the records land in the
per-key cache (`tuning/<profile>/rpc-<key>/`, never beside this machine's timings), a rerun with the
same budget measures nothing, `lookup(rpc_key=...)` reads them, and a wrong key or a device of
another arch fails before anything is built.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from tvmdeploy import targets
from tvmdeploy.compiler import tuning
from tvmdeploy.compiler.errors import TuningError
from tvmdeploy.runtime import remote
from tvmdeploy.runtime.errors import RemoteError
from typer.testing import CliRunner

from tests.compiler.tuning import test_tune
from tests.compiler.tuning.test_tune import BUCKETS, _lines
from tests.runtime import test_rpc

pytestmark = pytest.mark.rpc

# The fixtures of both modules, shared by name (each module gets its own tracker and servers).
profile, tiny_onnx, tiny_import, top_task = (
    test_tune.profile,
    test_tune.tiny_onnx,
    test_tune.tiny_import,
    test_tune.top_task,
)
tracker, x86_server, arm_server = test_rpc.tracker, test_rpc.x86_server, test_rpc.arm_server

TRIALS = 6


@pytest.fixture(scope="module")
def rpc_cache(tmp_path_factory):
    """A tuning cache of this module's own."""
    return tmp_path_factory.mktemp("rpc-tune-cache")


@pytest.fixture(scope="module")
def rpc_tuned(tiny_import, profile, top_task, tracker, x86_server, rpc_cache):
    """TRIALS trials of the top task on the x86 rpc_server, then the same call again."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TVMDEPLOY_CACHE_DIR", str(rpc_cache))
        only_top = lambda t: t.key == top_task.key
        first = tuning.tune(
            tiny_import.mod,
            profile,
            TRIALS,
            rpc_cache / "out1",
            progress=False,
            task_filter=only_top,
            rpc=tracker,
            rpc_key=x86_server,
        )
        second = tuning.tune(
            tiny_import.mod,
            profile,
            TRIALS,
            rpc_cache / "out2",
            progress=False,
            task_filter=only_top,
            rpc=tracker,
            rpc_key=x86_server,
        )
    return first, second


def test_remote_records_go_to_the_per_key_cache_with_measured_times(
    rpc_tuned, rpc_cache, profile, top_task, tracker, x86_server
):
    first, _ = rpc_tuned
    assert first.summary["new_trials"] == TRIALS and first.summary["rule_based_measured"] == 1
    assert first.summary["measured_on"] == {
        "where": "rpc",
        "tracker": tracker,
        "key": x86_server,
        "arch": "x86_64",
        "cores": first.summary["measured_on"]["cores"],
        "description": first.summary["measured_on"]["description"],
    }
    local = rpc_cache / "tuning" / profile.name
    per_key = local / f"rpc-{x86_server}"
    assert first.cache == per_key
    records = _lines(per_key / tuning.RECORD_FILE)
    assert len(records) == TRIALS
    assert {w[0] for w in _lines(per_key / tuning.WORKLOAD_FILE)} == {top_task.key}
    secs = [sum(r[1][1]) / len(r[1][1]) for r in records]
    assert all(0 < s for s in secs)
    valid = [s for s in secs if s < tuning.ERROR_SECS / 10]
    assert valid and all(s < 1 for s in valid), secs  # timed on the device, not failed candidates
    rule_based = json.loads((per_key / tuning.RULE_BASED_FILE).read_text())[top_task.key]
    assert 0 < rule_based["secs"] < 1
    # Nothing measured remotely is mixed into this machine's cache.
    assert (
        not (local / tuning.RECORD_FILE).exists() and not (local / tuning.RULE_BASED_FILE).exists()
    )


def test_rerun_over_rpc_measures_nothing(rpc_tuned, rpc_cache, profile, x86_server):
    _, second = rpc_tuned
    assert second.summary["new_trials"] == 0 and second.summary["trials"] == TRIALS
    assert second.summary["rule_based_measured"] == 0
    assert (
        len(_lines(rpc_cache / "tuning" / profile.name / f"rpc-{x86_server}" / tuning.RECORD_FILE))
        == TRIALS
    )


def test_lookup_reads_the_per_key_cache_only_when_asked(
    rpc_tuned, rpc_cache, tiny_import, profile, x86_server, monkeypatch, tmp_path
):
    monkeypatch.setenv("TVMDEPLOY_CACHE_DIR", str(rpc_cache))
    on_key = tuning.lookup(
        tiny_import.mod,
        profile,
        tmp_path / "remote",
        quiet=True,
        only_faster=False,
        rpc_key=x86_server,
    )
    assert on_key is not None and on_key.summary["records"].get("cache") == 1
    assert on_key.summary["measured_on"] == {"where": "rpc", "key": x86_server}
    local = tuning.lookup(
        tiny_import.mod, profile, tmp_path / "local", quiet=True, only_faster=False
    )
    assert local is None or not local.summary["records"].get("cache")


def test_cli_tune_over_rpc_reports_where_it_measured(
    rpc_tuned, rpc_cache, tiny_onnx, profile, tracker, x86_server, monkeypatch
):
    """The CLI on the same cache: the budget is spent already, so it only checks and reports."""
    from tvmdeploy.compiler.cli import app

    monkeypatch.setenv("TVMDEPLOY_CACHE_DIR", str(rpc_cache))
    result = CliRunner().invoke(
        app,
        [
            "tune",
            str(tiny_onnx),
            "--target",
            profile.name,
            "--trials",
            str(TRIALS),
            "--buckets",
            BUCKETS,
            "--rpc",
            tracker,
            "--rpc-key",
            x86_server,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["profile"] == profile.name and summary["new_trials"] == 0
    assert summary["cache"] == str(rpc_cache / "tuning" / profile.name / f"rpc-{x86_server}")
    assert summary["measured_on"]["where"] == "rpc" and summary["measured_on"]["key"] == x86_server
    assert summary["measured_on"]["arch"] == "x86_64"


def test_wrong_key_fails_fast_and_clearly(
    tiny_import, profile, tracker, x86_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("TVMDEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    started = time.perf_counter()
    with pytest.raises(
        RemoteError, match=r"no RPC server is registered under key 'no-such-board'.*x86-local"
    ):
        tuning.tune(
            tiny_import.mod,
            profile,
            4,
            tmp_path / "out",
            progress=False,
            rpc=tracker,
            rpc_key="no-such-board",
        )
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "cache").exists()  # refused before any cache directory was made


def test_device_of_another_arch_is_refused_before_building(
    tiny_import, tracker, x86_server, tmp_path
):
    arm = targets.get("arm64-neon")
    with pytest.raises(
        TuningError,
        match=r"arm64-neon: its code is for aarch64, but the device behind "
        r"RPC key 'x86-local' .* is x86_64",
    ):
        tuning.tune(
            tiny_import.mod,
            arm,
            4,
            tmp_path / "out",
            progress=False,
            rpc=tracker,
            rpc_key=x86_server,
        )
    with pytest.raises(TuningError, match="needs both --rpc"):
        tuning.check_tunable(arm, rpc=tracker)


def test_device_lost_mid_run_stops_clearly_and_keeps_what_was_measured(
    tiny_import, profile, top_task, tracker, tmp_path, monkeypatch
):
    """The server dies after two trials: the run stops with what to do, no failed record is written
    for candidates that could not reach the device, and the two measured records stay."""
    monkeypatch.setenv("TVMDEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    port = test_rpc.free_port()
    log = tmp_path / "flaky-server.log"
    proc = test_rpc._start(
        [
            sys.executable,
            "-m",
            "tvm.exec.rpc_server",
            "--tracker",
            tracker,
            "--key",
            "x86-flaky",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
        ],
        log,
        test_rpc._server_env(),
    )

    def progress(status: tuning.TuneStatus) -> None:
        if status.phase == "search" and status.done >= 2 and proc.poll() is None:
            test_rpc._stop(proc)

    try:
        remote.wait_for_server(tracker, "x86-flaky", timeout=60)
        with pytest.raises(
            TuningError,
            match=r"measuring on the remote device stopped: .*'x86-flaky'.*"
            r"run the same command again to continue",
        ):
            tuning.tune(
                tiny_import.mod,
                profile,
                8,
                tmp_path / "out",
                progress=progress,
                task_filter=lambda t: t.key == top_task.key,
                rpc=tracker,
                rpc_key="x86-flaky",
            )
    finally:
        test_rpc._stop(proc)
    records = _lines(
        tmp_path / "cache" / "tuning" / profile.name / "rpc-x86-flaky" / tuning.RECORD_FILE
    )
    assert len(records) == 2
    assert all(0 < sum(r[1][1]) / len(r[1][1]) < 1 for r in records)


def test_cli_needs_both_rpc_options(tiny_onnx):
    from tvmdeploy.compiler.cli import app

    result = CliRunner().invoke(
        app, ["tune", str(tiny_onnx), "--trials", "4", "--rpc", "127.0.0.1:9190"]
    )
    assert result.exit_code == 2 and "needs both --rpc HOST:PORT and --rpc-key KEY" in result.output


@pytest.mark.qemu
def test_arm_profile_tuned_on_the_emulated_aarch64_device(
    tiny_import, tracker, arm_server, tmp_path, monkeypatch
):
    """Cross-linked aarch64 kernels timed by the rpc_server under qemu-user (timings: noise)."""
    monkeypatch.setenv("TVMDEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    arm = targets.get("arm64-neon")
    from tvmdeploy.compiler import build as build_stage

    # The same kernel as the x86 top task, as extracted for the ARM target.
    arm_task = next(
        t
        for t in tuning.extract_tasks(tiny_import.mod, build_stage.tvm_target(arm))
        if t.kind == "matmul"
    )
    result = tuning.tune(
        tiny_import.mod,
        arm,
        3,
        tmp_path / "out",
        progress=False,
        task_filter=lambda t: t.key == arm_task.key,
        rpc=tracker,
        rpc_key=arm_server,
    )
    assert result.summary["new_trials"] == 3
    assert result.summary["measured_on"]["arch"] == "aarch64"
    per_key = Path(tmp_path / "cache" / "tuning" / "arm64-neon" / f"rpc-{arm_server}")
    records = _lines(per_key / tuning.RECORD_FILE)
    assert len(records) == 3
    secs = [sum(r[1][1]) / len(r[1][1]) for r in records]
    assert any(0 < s < tuning.ERROR_SECS / 10 for s in secs), secs
