"""compiler/tuning.py on the tiny BERT with tiny budgets: real MetaSchedule, real workers.

Records are written as they are measured and reused (a rerun measures nothing), survive
SIGTERM and kill -9 of the tuner with no worker left behind, a rerun continues from them, and
applying them changes the built code while keeping parity with ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tvmdeploy.compiler import build as build_stage
from tvmdeploy.compiler import tuning, verify
from tvmdeploy.compiler.drivers.tune import TuneOptions, tune_model
from tvmdeploy.compiler.frontend import importer
from tvmdeploy.compiler.options import parse_buckets
from tvmdeploy.targets.resolve import host_profile

BUCKETS = "1x16"
TVMDEPLOY = [sys.executable, "-m", "tvmdeploy.compiler.cli"]


@pytest.fixture(scope="module")
def profile():
    return host_profile()


@pytest.fixture(scope="module")
def tiny_onnx(tiny_exported) -> Path:
    """The tiny BERT as the session exported it (the CLI accepts the .onnx file with its config
    beside it)."""
    return tiny_exported.onnx_path


@pytest.fixture(scope="module")
def tiny_import(tiny_onnx):
    return importer.import_onnx(tiny_onnx, parse_buckets(BUCKETS))


@pytest.fixture(scope="module")
def top_task(tiny_import, profile) -> tuning.Task:
    """The matmul kernel with the most FLOPs x calls: one task keeps the budgets tiny."""
    target = build_stage.tvm_target(profile)
    return next(t for t in tuning.extract_tasks(tiny_import.mod, target) if t.kind == "matmul")


@pytest.fixture(scope="module")
def tuned(tiny_import, profile, top_task, tmp_path_factory):
    """8 trials on the top task into a cache of this module's own, then the same call again."""
    cache = tmp_path_factory.mktemp("tune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TVMDEPLOY_CACHE_DIR", str(cache))
        only_top = lambda t: t.key == top_task.key
        first = tuning.tune(
            tiny_import.mod, profile, 8, cache / "out1", progress=False, task_filter=only_top
        )
        second = tuning.tune(
            tiny_import.mod, profile, 8, cache / "out2", progress=False, task_filter=only_top
        )
    return cache, first, second


def _lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_records_are_written_in_metaschedule_format(tuned, profile, top_task):
    cache, first, _ = tuned
    assert first.summary["new_trials"] == 8
    assert first.summary["rule_based_measured"] == 1
    db_dir = cache / "tuning" / profile.name
    records = _lines(db_dir / tuning.RECORD_FILE)
    assert len(records) == 8
    assert {w[0] for w in _lines(db_dir / tuning.WORKLOAD_FILE)} == {top_task.key}
    assert top_task.key in json.loads((db_dir / tuning.RULE_BASED_FILE).read_text())
    # TVM's own JSONDatabase reads the cache as it is.
    from tvm.s_tir import meta_schedule as ms

    database = ms.database.JSONDatabase(work_dir=str(db_dir), allow_missing=False)
    assert len(database.get_all_tuning_records()) == 8


def test_rerun_measures_nothing(tuned):
    _, first, second = tuned
    assert second.summary["new_trials"] == 0
    assert second.summary["rule_based_measured"] == 0  # the rule-based time is cached too
    assert second.summary["trials"] == first.summary["trials"] == 8


def test_record_is_applied_only_where_it_beats_the_rule_based_schedule(
    tuned, tiny_import, profile, top_task, tmp_path, monkeypatch
):
    cache, _, _ = tuned
    monkeypatch.setenv("TVMDEPLOY_CACHE_DIR", str(cache))
    store = tuning.RecordStore(tuning.cache_path(profile))
    faster = store.best(top_task.key)[0].secs < store.rule_based_secs(top_task.key)
    result = tuning.lookup(tiny_import.mod, profile, tmp_path, quiet=True)
    if faster:
        assert result is not None and result.summary["kernels"]["applied"] == 1
        assert result.summary["source"] == "cache" and result.summary["new_trials"] == 0
        assert {p.name for p in result.files} == {
            tuning.WORKLOAD_FILE,
            tuning.RECORD_FILE,
            tuning.RULE_BASED_FILE,
        }
    else:  # the rule-based schedule stays: tuning never makes a kernel slower
        assert result is None or result.summary["kernels"]["applied"] == 0


def test_export_writes_the_records_that_beat_the_rule_based_schedule(
    tuned, tiny_onnx, profile, top_task, tmp_path, monkeypatch
):
    """`tune --export` (how the shipped set is made): the best record of each kernel that beats its
    rule-based time, with that time beside it; a rerun within the budget measures nothing."""
    cache, _, _ = tuned
    monkeypatch.setenv("TVMDEPLOY_CACHE_DIR", str(cache))
    store = tuning.RecordStore(tuning.cache_path(profile))
    best = store.best(top_task.key)[0]
    faster = best.secs < store.rule_based_secs(top_task.key)
    out = tmp_path / "export"
    result = tune_model(
        TuneOptions(
            model=str(tiny_onnx),
            profile=profile.name,
            trials=8,
            buckets=BUCKETS,
            export_dir=str(out),
            progress=False,
        )
    )
    assert result.summary["new_trials"] == 0
    exported = tuning.RecordStore(out)
    assert exported.workload_keys() == ({top_task.key} if faster else set())
    if faster:
        assert exported.best(top_task.key)[0].secs == best.secs
        assert exported.rule_based_secs(top_task.key) == store.rule_based_secs(top_task.key)
    runs = json.loads((out / "meta.json").read_text())["runs"]
    assert len(runs) == 1 and runs[0]["records"] == int(faster) and runs[0]["cpu"]


def test_check_records_times_each_record_against_the_rule_based_schedule_here(
    tuned, profile, top_task, tmp_path
):
    """`tvmdeploy check-records` (how a shipped set is re-checked on another CPU): each record
    and its kernel's rule-based schedule are built and timed here; --prune keeps only the records
    that reach --min-gain here and notes the check in meta.json."""
    import shutil

    from tvmdeploy.compiler.tuning.recheck import _scheduled, prune, recheck

    cache, _, _ = tuned
    records = tmp_path / "records"
    shutil.copytree(cache / "tuning" / profile.name, records)
    store = tuning.RecordStore(records)
    target = build_stage.tvm_target(profile)
    _, record_mod, rule_mod = _scheduled(store, top_task.key, target)
    assert tuning.workload_key(record_mod) != tuning.workload_key(rule_mod)  # two schedules
    (check,) = recheck(records, profile, rounds=2)
    assert check.key == top_task.key and check.task == top_task.name
    assert check.record_ms > 0 and check.rule_based_ms > 0
    assert check.gain == pytest.approx(check.rule_based_ms / check.record_ms)
    tuned_gain = store.rule_based_secs(top_task.key) / store.best(top_task.key)[0].secs
    assert check.tuned_on_gain == pytest.approx(tuned_gain, rel=1e-2)

    assert prune(records, profile, [check], min_gain=0.0) == 0  # kept: one record, the best
    kept = tuning.RecordStore(records)
    assert kept.workload_keys() == {top_task.key} and kept.count(top_task.key) == 1
    assert kept.best(top_task.key)[0].secs == store.best(top_task.key)[0].secs
    assert prune(records, profile, [check], min_gain=1e9) == 1  # no record is that fast
    assert not tuning.RecordStore(records).workload_keys()
    checks = json.loads((records / "meta.json").read_text())["checks"]
    assert [c["kept"] for c in checks] == [1, 0] and all(c["cpu"] for c in checks)
    assert checks[1]["kernels"][0]["task"] == top_task.name


def test_gather_kernels_survive_random_indices(tiny_import, profile, tmp_path):
    """The runner feeds random int64 ids to `take` kernels; SafeTake's wrap mode keeps them in
    bounds, so measuring them neither crashes the worker nor fails."""
    target = build_stage.tvm_target(profile)
    takes = [t for t in tuning.extract_tasks(tiny_import.mod, target) if t.name.startswith("take")]
    assert takes
    store = tuning.RecordStore(tmp_path / "db")
    workers = tuning.Workers(1, build_timeout=120, run_timeout=30)
    try:
        with store.lock():
            assert tuning.measure_rule_based(
                takes, store, workers, target, tuning.TuneSettings()
            ) == len(takes)
    finally:
        workers.close()
    for task in takes:
        assert task.rule_based_secs is not None, store.rule_based_entry(task.key)


def _scheduled_kernel(mod, profile, key: str, database) -> str:
    """The TIR the CPU pipeline gives the kernel with workload `key` (tuned or rule-based)."""
    from tvm import relax, tirx
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod
    from tvmdeploy.compiler.kernels.cpu_schedule import default_schedule_pass

    target = build_stage.tvm_target(profile)
    fused = tuning.fused_module(mod, target)
    name = next(
        gv.name_hint
        for gv, f in fused.functions_items()
        if isinstance(f, tirx.PrimFunc) and tuning.workload_key(_normalize_mod(f)) == key
    )
    with target:
        if database is not None:
            with database:
                fused = relax.transform.MetaScheduleApplyDatabase()(fused)
        fused = default_schedule_pass(target)(fused)
    return fused[name].script()


def test_tuned_code_differs_and_keeps_parity(
    tuned, tiny_import, tiny_onnx, profile, top_task, tmp_path, monkeypatch
):
    cache, _, _ = tuned
    monkeypatch.setenv("TVMDEPLOY_CACHE_DIR", str(cache))
    result = tuning.lookup(
        tiny_import.mod, profile, tmp_path / "records", quiet=True, only_faster=False
    )
    assert result is not None and result.summary["kernels"]["applied"] == 1
    assert _scheduled_kernel(
        tiny_import.mod, profile, top_task.key, result.database
    ) != _scheduled_kernel(tiny_import.mod, profile, top_task.key, None)

    built = build_stage.build_artifact(tiny_import.mod, profile, tmp_path / "lib", result.database)
    config = json.loads((tiny_onnx.parent / "config.json").read_text())
    cases = verify.reference_cases(tiny_onnx, tiny_import, config)
    parity, _ = verify.verify(built, tiny_import, cases, timing_runs=0)
    assert parity.ok, parity.detail
    assert parity.max_abs_diff <= 1e-4


def test_compile_of_another_model_with_the_same_kernels_uses_the_cache(
    tuned, profile, tmp_path, monkeypatch
):
    """A second model (other weights, same architecture) compiles with zero new trials."""
    from tvmdeploy.compiler import CompileOptions, compile_model
    from tvmdeploy.runtime import Bundle

    from tests.conftest import save_tiny_bert

    cache, _, _ = tuned
    monkeypatch.setenv("TVMDEPLOY_CACHE_DIR", str(cache))
    other = save_tiny_bert(tmp_path / "other-bert", seed=1)
    bundle_dir = compile_model(
        CompileOptions(
            model=str(other),
            output=str(tmp_path / "other.tvmd"),
            profiles=[profile.name],
            buckets=BUCKETS,
        )
    )
    artifact = Bundle(bundle_dir).artifacts[0]
    assert artifact.parity["ok"] and artifact.parity["max_abs_diff"] <= 1e-4
    summary = artifact.tuning
    store = tuning.RecordStore(tuning.cache_path(profile))
    if any(
        store.best(k) and store.best(k)[0].secs < (store.rule_based_secs(k) or 1e9)
        for k in store.workload_keys()
    ):
        assert (
            summary["source"] == "cache" and summary["new_trials"] == 0 and summary["trials"] == 8
        )
        assert summary["database"] == f"tuning/{profile.name}"
        assert (bundle_dir / summary["database"] / tuning.RECORD_FILE).is_file()
        assert len(_lines(bundle_dir / summary["database"] / tuning.RECORD_FILE)) == 1
    else:
        assert summary["trials"] in (0, 8) and summary.get("new_trials", 0) == 0


#: Profiles with records shipped in the package (x86-64-v3-vnni reads x86-64-v3's).
SHIPPED = ["x86-64-v3", "x86-64-v3-vnni", "x86-64-v4", "x86-avx512-vnni", "arm64-neon"]


@pytest.mark.parametrize("profile_name", SHIPPED)
def test_shipped_records_replay_with_this_tvm(profile_name):
    """Every record shipped in the package applies to its workload (guards a TVM upgrade), and
    says where it was measured."""
    from tvm.s_tir import meta_schedule as ms
    from tvmdeploy import targets

    profile = targets.get(profile_name)
    shipped = tuning.shipped_path(profile)
    store = tuning.RecordStore(shipped)
    assert store.workload_keys(), f"no shipped records in {shipped}"
    tuning.import_tensor_intrinsics(profile.family)
    meta = json.loads((shipped / "meta.json").read_text())
    assert meta["trials"] > 0 and meta["runs"]
    assert all(run["cpu"] and run["measured_on"] for run in meta["runs"])
    for key in store.workload_keys():
        best = store.best(key)[0]
        assert best.secs < store.rule_based_secs(key), (
            "a shipped record must beat the rule-based schedule"
        )
        workload = ms.database.Workload.from_json(best.workload_json)
        assert tuning.workload_key(workload.mod) == key
        ms.database.TuningRecord.from_json(best.record_json, workload)


def test_shipped_records_cover_the_demo_model(tmp_path):
    """The shipped sets are for the demo's kernels as this compiler makes them today: a change to
    the pipeline (fusion, weight packing) that renames the workloads must come with re-tuned
    records. Every profile that ships records applies all of them to the demo model."""
    import torch
    from transformers import BertForSequenceClassification
    from tvmdeploy import targets
    from tvmdeploy.compiler.drivers.demo import DEMO_BUCKETS
    from tvmdeploy.compiler.frontend import export

    from tests.conftest import minilm_dir

    torch.manual_seed(0)
    model_dir = tmp_path / "minilm-cls"
    BertForSequenceClassification.from_pretrained(
        str(minilm_dir()), num_labels=2
    ).eval().save_pretrained(model_dir)
    onnx_path = export.export_model(model_dir, tmp_path / "onnx").onnx_path
    imported = importer.import_onnx(onnx_path, parse_buckets(DEMO_BUCKETS))
    for name in SHIPPED:
        profile = targets.get(name)
        # The kernels as compile's lookup extracts them (its target), extracted once: passed
        # to lookup, which would otherwise extract them all again.
        target = build_stage.tvm_target(profile, num_cores=tuning.num_cores())
        tasks = tuning.extract_tasks(imported.mod, target)
        task_keys = {t.key for t in tasks}
        shipped = tuning.RecordStore(tuning.shipped_path(profile)).workload_keys()
        assert shipped and set(shipped) <= task_keys, (
            f"{name}: shipped records for kernels the demo no longer has"
        )
        result = tuning.lookup(
            imported.mod, profile, tmp_path / "records" / name, tasks=tasks, quiet=True
        )
        assert result is not None and result.summary["kernels"]["applied"] == len(shipped), name


# --------------------------------------------------------------------------------------
# Interruption: a real `tvmdeploy tune` subprocess, stopped once records land
# --------------------------------------------------------------------------------------
def _start_tune(onnx: Path, cache: Path, trials: int) -> subprocess.Popen:
    """`tvmdeploy tune` in a subprocess; its output goes to a file (a full pipe would block it)."""
    env = dict(os.environ, TVMDEPLOY_CACHE_DIR=str(cache))
    cache.mkdir(parents=True, exist_ok=True)
    log = (cache / f"tune-{time.monotonic_ns()}.log").open("w")
    proc = subprocess.Popen(
        [
            *TVMDEPLOY,
            "tune",
            str(onnx),
            "-t",
            "host",
            "--trials",
            str(trials),
            "--buckets",
            BUCKETS,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log_path = Path(log.name)  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    proc.wait(timeout=timeout)
    return proc.log_path.read_text()  # type: ignore[attr-defined]


def _record_count(cache: Path, profile) -> int:
    path = cache / "tuning" / profile.name / tuning.RECORD_FILE
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait_for_records(
    proc: subprocess.Popen, cache: Path, profile, more_than: int, timeout: float = 240
) -> None:
    deadline = time.monotonic() + timeout
    while _record_count(cache, profile) <= more_than:
        if proc.poll() is not None:
            pytest.fail(f"tune exited early ({proc.returncode}):\n{_finish(proc, 10)[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no tuning record appeared in time")
        time.sleep(0.2)


def _workers(pid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:  # a child that already exited (a zombie not yet reaped) is no worker left behind
            if "tvm.exec.popen_worker" in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found


def _gone(procs: list[psutil.Process], timeout: float = 10.0) -> list[int]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_sigterm_and_kill9_lose_no_record_leave_no_worker_and_a_rerun_continues(
    tiny_onnx, profile, tmp_path
):
    cache = tmp_path / "cache"

    # SIGTERM once the first records are on disk: the tuner stops, its workers go with it.
    proc = _start_tune(tiny_onnx, cache, trials=400)
    _wait_for_records(proc, cache, profile, more_than=0)
    workers = _workers(proc.pid)
    assert workers, "expected live popen workers while tuning"
    proc.send_signal(signal.SIGTERM)
    output = _finish(proc, 120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Run the same command again" in output
    assert _gone(workers) == []
    after_term = _record_count(cache, profile)
    assert after_term >= 1
    assert all(
        isinstance(r, list) for r in _lines(cache / "tuning" / profile.name / tuning.RECORD_FILE)
    )

    # kill -9 of a rerun: nothing recorded is lost and the workers die with their parent.
    proc = _start_tune(tiny_onnx, cache, trials=400)
    _wait_for_records(proc, cache, profile, more_than=after_term)
    workers = _workers(proc.pid)
    proc.kill()
    proc.wait(timeout=60)
    assert _gone(workers) == [], "popen workers outlived a kill -9 of the tuner"
    after_kill = _record_count(cache, profile)
    assert after_kill > after_term

    # A rerun counts what is there toward the budget: 4 more trials, then done.
    store = tuning.RecordStore(cache / "tuning" / profile.name)
    target = after_kill + 4
    proc = _start_tune(tiny_onnx, cache, trials=target)
    output = _finish(proc, 240)
    assert proc.returncode == 0, output[-3000:]
    assert "4 new trial(s)" in output and f"{after_kill} were already in the cache" in output
    assert _record_count(cache, profile) == target
    assert len(store.workload_keys()) >= 1
