"""The search loop: MetaSchedule's evolutionary search over the kernels worth tuning, resumable.

Why this drives MetaSchedule's pieces itself instead of calling `ms.tune_tasks`:
- `tune_tasks` commits a batch's records only after the whole batch has been measured; here each
  record is appended to the cache the moment it is measured, so SIGINT, SIGTERM or kill -9 lose
  at most the one measurement in flight, and a rerun continues from the records (they count
  toward the trial budget).
- The rule-based schedule of each tuned kernel is measured first, and the next batch goes to the
  kernel with the largest share of its buckets' measured time. A record is applied only where it
  beats the rule-based schedule, so tuning never makes a kernel slower than the default.

Why this module is long (~500 lines): the loop and the per-run state it drives (signals, the
search strategy, the clock) are one piece; the other concerns live in the package's other modules.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvmdeploy.runtime import remote
from tvmdeploy.runtime.probe import missing_requirements, probe
from tvmdeploy.targets import Profile

from ..build import tvm_target
from ..errors import OptionError, TuningError, TuningInterrupted
from ..kernels.cpu_schedule import default_schedule_pass
from ..kernels.tensor_intrin import import_tensor_intrinsics
from .lookup import TuneResult, describe, lookup
from .progress import TuneStatus, progress_callback, silent
from .records import ERROR_SECS, RecordStore, cache_path
from .tasks import Task, extract_tasks, select_tasks, set_coefficients
from .workers import RpcMeasure, Workers, num_cores

logger = logging.getLogger(__name__)


@dataclass
class TuneSettings:
    """Knobs of a tuning run; the defaults fit a 2-core x86 machine."""

    batch: int = 16  # candidates per search round of one task
    build_timeout: float = 120.0  # LLVM on a big fused, unrolled matmul can take a minute
    run_timeout: float = 30.0
    repeat: int = 3  # 5x this many cold runs (at least 10); the best is recorded
    population: int = 256  # evolutionary search population (MetaSchedule's default is 512)
    min_share: float = 0.01  # tune matmul kernels taking at least this share of a bucket's FLOPs
    seed: int = 0


def check_tunable(profile: Profile, rpc: str | None = None, rpc_key: str | None = None):
    """Raise TuningError unless code for `profile` can be measured: on this host, or with `rpc`
    (tracker HOST:PORT) and `rpc_key`, on the remote device behind the key.

    Over RPC this opens one short session to learn the device's arch (runtime/remote.py; CPU
    features cannot be read over RPC, so only the arch is checked) and returns that
    `RemoteDevice`; an unreachable tracker or an unknown key raises RemoteError at once.
    Returns None for local tuning.
    """
    if profile.target.get("kind") != "llvm":
        raise TuningError(
            f"{profile.name}: tuning supports CPU (llvm) profiles; {profile.target.get('kind')} "
            "profiles use DLight's GPU schedules. Compile without --tune for this profile."
        )
    if rpc or rpc_key:
        return _check_remote(profile, rpc, rpc_key, probe().arch)
    missing = missing_requirements(profile.requires, probe())
    if missing:
        raise TuningError(
            f"{profile.name}: this machine cannot run the code it would measure "
            f"({'; '.join(missing)}). "
            "Tune on a machine of that class (the records land in its cache) or compile without "
            "--tune."
        )


def _check_remote(profile: Profile, rpc: str | None, rpc_key: str | None, local_arch: str):
    if not rpc or not rpc_key:
        raise TuningError(
            "tuning on a remote device needs both --rpc HOST:PORT (the TVM RPC tracker) and "
            "--rpc-key KEY (the key the device's rpc_server registered under)"
        )
    arch = profile.requires.get("arch")
    if arch and arch != local_arch and not profile.cross_cc:
        raise TuningError(
            f"{profile.name}: its code is for {arch} and the profile names no cross_cc to link "
            f"it on this {local_arch} machine; tune it from a {arch} machine"
        )
    if profile.cross_cc and shutil.which(profile.cross_cc.split()[0]) is None:
        raise TuningError(
            f"{profile.name}: the cross compiler {profile.cross_cc!r} that links its kernels is "
            "not on PATH; install it (e.g. Debian's gcc-aarch64-linux-gnu)"
        )
    with remote.connect(rpc, rpc_key, session_timeout=120) as session:
        device = session.device
    if arch and device.arch != arch:
        raise TuningError(
            f"{profile.name}: its code is for {arch}, but the device behind RPC key {rpc_key!r} "
            f"(tracker {device.tracker}) is {device.arch}; tune a {device.arch} profile there "
            "(`tvmdeploy targets` lists them) or use the key of a matching device"
        )
    return device


def _measured_on(device) -> dict[str, Any]:
    """Where a run's trials were timed: this machine, or the remote device (for summaries)."""
    if device is not None:
        return {
            "where": "rpc",
            "tracker": device.tracker,
            "key": device.key,
            "arch": device.arch,
            "cores": device.cores,
            "description": device.description,
        }
    local = probe()
    return {
        "where": "local",
        "arch": local.arch,
        "cores": local.cores,
        "description": local.description,
    }


class _Signals:
    """Turn SIGTERM into an exception (SIGINT already is one) and remember which arrived."""

    def __init__(self):
        self.received: int | None = None
        self._previous: Any = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, _frame):
        self.received = signum
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _estimate(tasks: list[Task]) -> tuple[str | None, float | None, float | None]:
    """(bucket, now ms, rule-based ms) over the tuned kernels of the most expensive bucket."""
    now: dict[str, float] = {}
    base: dict[str, float] = {}
    for task in tasks:
        if task.rule_based_secs is None:
            continue
        for bucket, n in task.calls.items():
            now[bucket] = now.get(bucket, 0.0) + n * task.current_secs * 1e3
            base[bucket] = base.get(bucket, 0.0) + n * task.rule_based_secs * 1e3
    if not base:
        return None, None, None
    bucket = max(base, key=base.get)
    return bucket, now[bucket], base[bucket]


def rule_based_mod(mod, target):
    """A kernel's module as the rule-based default schedule leaves it (what tuning must beat)."""
    with target:  # on a copy: the pass updates the module it is given in place
        return default_schedule_pass(target)(tvm.IRModule({"main": mod["main"]}))


def measure_rule_based(
    tasks: list[Task],
    store: RecordStore,
    workers: Workers,
    target,
    settings: TuneSettings,
    display: Callable[[TuneStatus], None] | None = None,
    again: bool = False,
) -> int:
    """Time the rule-based schedule of every task the store has no time for (kept in the
    store's rule_based.json, so each workload is measured once per cache).

    With `again`, the given tasks are timed once more and the faster time is kept: a baseline
    measured while the machine was busy would otherwise make a tuned record look better than
    it is (load only ever adds time, so the minimum is the better estimate).
    """
    display = display or silent
    phase = "rule-based check" if again else "rule-based"
    todo = list(tasks) if again else [t for t in tasks if store.rule_based_entry(t.key) is None]
    for task in tasks:
        task.rule_based_secs = store.rule_based_secs(task.key)
    if not todo:
        return 0
    display(TuneStatus(phase, 0, len(todo), "building", None, None))
    mods = [rule_based_mod(t.mod, target) for t in todo]
    built = workers.build(mods, target)
    for i, (task, mod, (artifact, error)) in enumerate(zip(todo, mods, built)):
        display(TuneStatus(phase, i, len(todo), task.name, None, None))
        secs = None
        if artifact:
            args_info = [a.as_json() for a in ArgInfo.from_entry_func(mod, remove_preproc=True)]
            run_secs, error = workers.measure(artifact, args_info, settings.repeat)
            secs = run_secs[0] if run_secs else None
        previous = store.rule_based_secs(task.key)
        if previous is not None and (secs is None or previous <= secs):
            secs, error = previous, None
        store.set_rule_based(task.key, task.name, secs, error or "")
        task.rule_based_secs = secs
    display(TuneStatus(phase, len(todo), len(todo), "done", None, None))
    return len(todo)


def _quiet_ms_logger() -> logging.Logger:
    ms_logger = logging.getLogger("tvmdeploy.tune.metaschedule")
    ms_logger.setLevel(logging.ERROR)
    ms_logger.propagate = False
    return ms_logger


class _Search:
    """MetaSchedule's evolutionary search + XGBoost cost model, shared by all tasks."""

    def __init__(self, target, settings: TuneSettings, num_cores: int):
        self.ms, self.target, self.settings, self.num_cores = ms, target, settings, num_cores
        self.database = ms.database.MemoryDatabase(module_equality="structural")
        self.cost_model = ms.cost_model.XGBModel(num_tuning_cores=num_cores, adaptive_training=True)
        self.logger = _quiet_ms_logger()

    def start(self, task: Task, store: RecordStore) -> None:
        """Create the task's TuneContext, seeded with the best records the cache has."""
        ms = self.ms
        context = ms.TuneContext(
            mod=task.mod,
            target=self.target,
            space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=self.settings.population
            ),
            task_name=task.name,
            rand_state=self.settings.seed + int(task.key) % 10007,
            num_threads=self.num_cores,
            logger=self.logger,
        )
        workload = self.database.commit_workload(task.mod)
        seeds, results = [], []
        for stored in store.best(task.key, k=32):
            with contextlib.suppress(Exception):  # a record this TVM cannot replay is skipped
                record = ms.database.TuningRecord.from_json(stored.record_json, workload)
                self.database.commit_tuning_record(record)
                candidate = record.as_measure_candidate()
                task.measured.add(_schedule_hash(candidate.sch.mod))
                seeds.append(candidate)
                results.append(
                    ms.runner.RunnerResult([float(s) for s in stored.record_json[1]], None)
                )
        if seeds:  # warm the cost model with what earlier runs measured
            self.cost_model.update(context, seeds, results)
        context.pre_tuning(
            max_trials=1 << 30,
            num_trials_per_iter=self.settings.batch,
            design_spaces=context.generate_design_space(),
            database=self.database,
            cost_model=self.cost_model,
        )
        task.context = context

    def candidates(self, task: Task) -> list | None:
        return task.context.generate_measure_candidates()

    def record(self, task: Task, candidate, run_secs: list[float]):
        ms = self.ms
        workload = self.database.commit_workload(task.mod)
        record = ms.database.TuningRecord(
            candidate.sch.trace, workload, run_secs, self.target, candidate.args_info
        )
        self.database.commit_tuning_record(record)
        return record

    def notify(self, task: Task, candidates: list, results: list) -> None:
        if candidates:
            task.context.notify_runner_results(candidates, results)
            self.cost_model.update(task.context, candidates, results)


def _schedule_hash(mod) -> int:
    return tvm_ffi.structural_hash(mod)


class _Clock:
    """Seconds spent per phase, for the summary (what limits tuning throughput)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self.seconds.items()}


def tune(
    mod,
    profile: Profile,
    trials: int | None,
    work_dir: str | Path,
    minutes: float | None = None,
    progress: bool | Callable[[TuneStatus], None] = True,
    settings: TuneSettings | None = None,
    task_filter: Callable[[Task], bool] | None = None,
    rpc: str | None = None,
    rpc_key: str | None = None,
) -> TuneResult:
    """Tune `mod`'s matmul-class kernels for `profile` into the per-profile cache, then return
    the records to build with (shipped, cached and fresh, the best per workload).

    `trials` is the budget for this model's kernels counting records already in the cache, so a
    rerun after an interruption continues and a rerun after completion measures nothing.
    `minutes` caps this run's wall time (either limit may be None, not both). `progress` is True
    for progress lines through `logging`, False for silence, or a callable that gets a TuneStatus
    (the CLI passes a progress bar: tuning/progress.py). Raises TuningInterrupted on SIGINT/SIGTERM
    once the workers are gone; every
    record measured until then is in the cache.

    With `rpc` (a TVM RPC tracker, HOST:PORT) and `rpc_key`, every candidate is timed on the
    device behind the key, its records go to `cache_path(profile, rpc_key)`, and the summary's
    `measured_on` says so; the device must be of the profile's arch (checked first).
    """
    if not trials and not minutes:
        raise OptionError("give a trial budget (--trials N) or a time budget (--minutes M)")
    device = check_tunable(profile, rpc, rpc_key)
    settings = settings or TuneSettings()
    import_tensor_intrinsics(profile.family)
    clock = _Clock()
    started = time.perf_counter()
    deadline = started + minutes * 60 if minutes else None
    cores = num_cores()  # this machine's: build workers and the search
    # What the schedules assume (parallel loops): the cores of the device that runs the code.
    target = tvm_target(profile, num_cores=(device.cores if device and device.cores else cores))
    cache_key = rpc_key if device is not None else None
    rpc_measure = (
        RpcMeasure(device.tracker, device.key, profile.cross_cc) if device is not None else None
    )
    with clock("extract"):
        tasks = extract_tasks(mod, target)
    tuned = select_tasks(tasks, settings.min_share)
    if task_filter is not None:  # an explicit task set (benchmarks, tests) replaces the selection
        for t in tasks:
            t.tuned = bool(task_filter(t))
        tuned = [t for t in tasks if t.tuned]
    store = RecordStore(cache_path(profile, cache_key))
    new_total, measured_rule_based, done_before = 0, 0, 0
    interrupted: int | None = None
    display = progress_callback(progress, profile.name)
    with store.lock(), _Signals() as signals:
        for task in tuned:
            task.trials = store.count(task.key)
            best = store.best(task.key)
            task.best_secs = best[0].secs if best else None
        done_before = sum(t.trials for t in tuned)
        remaining = None if not trials else max(0, trials - done_before)

        def show(label: str) -> None:
            shown = (done_before if trials else 0) + new_total
            display(TuneStatus("search", shown, trials or None, label, *_estimate(tuned)[1:]))

        workers = None
        try:
            workers = Workers(
                max(1, cores), settings.build_timeout, settings.run_timeout, rpc_measure
            )
            if tuned and remaining != 0:
                with clock("rule-based"):
                    measured_rule_based = measure_rule_based(
                        tuned, store, workers, target, settings, display
                    )
            for task in tuned:
                task.rule_based_secs = store.rule_based_secs(task.key)
            set_coefficients(tuned)
            search = _Search(target, settings, cores)
            show("")
            while tuned and (remaining is None or remaining > 0):
                if deadline and time.perf_counter() >= deadline:
                    break
                active = [t for t in tuned if not t.exhausted]
                if not active:
                    break
                task = max(active, key=Task.priority)
                if task.context is None:
                    show(f"{task.name} (design space)")
                    with clock("design space"):
                        search.start(task, store)
                show(f"{task.name} (searching)")
                with clock("search"):
                    candidates = list(search.candidates(task) or [])
                if not candidates:
                    task.exhausted = True
                    continue
                candidates = candidates[:remaining] if remaining is not None else candidates
                fresh = [c for c in candidates if _schedule_hash(c.sch.mod) not in task.measured]
                if not fresh:  # the search keeps proposing what was measured: move on
                    task.stale += 1
                    task.exhausted = task.stale > 3
                    continue
                before = task.current_secs
                show(f"{task.name} (building {len(fresh)})")
                with clock("build"):
                    built = workers.build([c.sch.mod for c in fresh], target)
                measured, results = [], []
                for candidate, (artifact, error) in zip(fresh, built):
                    if deadline and time.perf_counter() >= deadline:
                        if artifact:
                            shutil.rmtree(os.path.dirname(artifact), ignore_errors=True)
                        continue
                    run_secs = None
                    if artifact:
                        with clock("measure"):
                            args_info = [a.as_json() for a in candidate.args_info]
                            run_secs, error = workers.measure(artifact, args_info, settings.repeat)
                    with clock("record"):  # on disk before the next candidate runs
                        record = search.record(task, candidate, run_secs or [ERROR_SECS])
                        store.append(task.key, record.workload.as_json(), record.as_json())
                    task.measured.add(_schedule_hash(candidate.sch.mod))
                    task.trials += 1
                    task.new_trials += 1
                    new_total += 1
                    if remaining is not None:
                        remaining -= 1
                    if run_secs and (task.best_secs is None or run_secs[0] < task.best_secs):
                        task.best_secs = run_secs[0]
                    measured.append(candidate)
                    results.append(
                        search.ms.runner.RunnerResult(run_secs, None if run_secs else error)
                    )
                    show(task.name)
                with clock("cost model"):
                    search.notify(task, measured, results)
                task.stale = 0 if task.current_secs < before * 0.99 else task.stale + 1
            winners = [
                t
                for t in tuned
                if t.new_trials
                and t.best_secs is not None
                and t.rule_based_secs is not None
                and t.best_secs < t.rule_based_secs
            ]
            if winners:  # a tuned record replaces a rule-based schedule only on a fair comparison
                with clock("rule-based"):
                    measure_rule_based(
                        winners, store, workers, target, settings, display, again=True
                    )
        except KeyboardInterrupt:
            interrupted = signals.received or signal.SIGINT
        except BaseException:
            if signals.received is None:
                raise
            interrupted = signals.received  # SIGTERM surfaced through a TVM callback
        finally:
            if workers is not None:
                with clock("shutdown"):
                    workers.close()
    if interrupted is not None:
        raise TuningInterrupted(interrupted, new_total, store.path)
    seconds = time.perf_counter() - started
    result = lookup(
        mod, profile, work_dir, tasks=tasks, fresh_store=store, quiet=True, rpc_key=cache_key
    )
    assert result is not None
    result.summary.update(
        {
            "new_trials": new_total,
            "seconds": round(seconds, 1),
            "budget": {"trials": trials, "minutes": minutes},
            "tuned_kernels": len(tuned),
            "rule_based_measured": measured_rule_based,
            "phase_seconds": clock.rounded(),
            "measured_on": _measured_on(device),
        }
    )
    if progress is not False:
        where = f" on RPC key {device.key!r} ({device.arch})" if device is not None else ""
        logger.info(
            "tuning %s%s: %d new trial(s) in %.0f s (%d were already in the cache); %s",
            profile.name,
            where,
            new_total,
            seconds,
            done_before,
            describe(result.summary),
        )
    return result
