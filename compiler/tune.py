"""Stage 3, tune: MetaSchedule for a CPU profile that is cheap, resumable, cached and reused.

Why this module drives MetaSchedule's pieces itself instead of calling `ms.tune_tasks`:
- `LocalBuilder` starts a fresh process pool for every batch and each worker re-imports TVM
  (~6 s on two cores); here one build pool and one measuring worker live for the whole run.
- `tune_tasks` commits a batch's records only after the whole batch has been measured; here each
  record is appended to the cache the moment it is measured, so SIGINT, SIGTERM or kill -9 lose
  at most the one measurement in flight, and a rerun continues from the records (they count
  toward the trial budget).
- Trials go where the time goes: only matmul-class kernels are tuned (injective, gather, softmax
  and layer-norm kernels keep the rule-based schedules of cpu_schedule.py), the rule-based
  schedule of each tuned kernel is measured first, and the next batch goes to the kernel with
  the largest share of its buckets' measured time. A record is applied only where it beats the
  rule-based schedule, so tuning never makes a kernel slower than the default.

Records live in MetaSchedule's JSONDatabase format (`database_workload.json`,
`database_tuning_record.json`, keyed by the workload's structural hash) in three places: the
per-profile cache (`$TVMDEPLOY_CACHE_DIR` or `~/.cache/tvmdeploy`, under `tuning/<profile>/`),
the records shipped with the package (`compiler/tuning_records/<profile>/`), and each bundle
(`tuning/<profile>/`, only the records its artifact was built from). `rule_based.json` beside
them holds the measured time of the rule-based schedule per workload.

Remote devices (`rpc=HOST:PORT, rpc_key=KEY`, TVM's tracker and `rpc_server`): candidates are
built here as shared libraries (ARM ones linked with the profile's `cross_cc`) and timed on the
device behind the key (compiler/rpc_tuning.py), one short RPC session per candidate. Their records
go to `tuning/<profile>/rpc-<key>/`, never mixed with this machine's timings, and `lookup(...,
rpc_key=KEY)` reads that directory instead of the local cache. Only the device's arch can be
checked over RPC (not its CPU features): tune a key with the profile its device really is.

This module never changes what a model computes: records only choose schedules, and every
artifact is still verified against ONNX Runtime by the verify stage.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from tvmdeploy.runtime.errors import TvmdeployError
from tvmdeploy.targets import Profile

console = Console(stderr=True, highlight=False, soft_wrap=True)
logger = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
RULE_BASED_FILE = "rule_based.json"
SHIPPED_DIR = Path(__file__).parent / "tuning_records"
#: Run time MetaSchedule's own callbacks write for a candidate that failed to build or run.
ERROR_SECS = 1e10


class TuningError(TvmdeployError):
    """Tuning cannot run as asked (wrong kind of profile, a device this host cannot run, a busy
    cache); the message says what to do instead."""


class TuningInterrupted(TvmdeployError):
    """SIGINT or SIGTERM stopped tuning. Every measured record is saved; rerun to continue."""

    def __init__(self, signum: int, saved: int, cache: Path):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(
            f"tuning stopped by {name}; {saved} new record(s) are saved in {cache}. "
            "Run the same command again to continue where it stopped."
        )


# --------------------------------------------------------------------------------------
# Where records live
# --------------------------------------------------------------------------------------
def cache_root() -> Path:
    """`$TVMDEPLOY_CACHE_DIR/tuning` (default `~/.cache/tvmdeploy/tuning`)."""
    from tvmdeploy.runtime.select import cache_dir

    return cache_dir() / "tuning"


def rpc_dir_name(rpc_key: str) -> str:
    """`rpc-<key>`, with anything but letters, digits, '.', '_' and '-' in the key made '_'."""
    import re

    return "rpc-" + (re.sub(r"[^A-Za-z0-9._-]", "_", rpc_key).lstrip(".") or "_")


def cache_path(profile: Profile | str, rpc_key: str | None = None) -> Path:
    """The per-profile tuning cache directory; with `rpc_key`, the one for records measured on
    the remote device behind that RPC key (`<profile>/rpc-<key>/`)."""
    path = cache_root() / (profile if isinstance(profile, str) else profile.name)
    return path / rpc_dir_name(rpc_key) if rpc_key else path


def shipped_path(profile: Profile | str) -> Path:
    """The records shipped inside the package for a profile (may not exist)."""
    return SHIPPED_DIR / (profile if isinstance(profile, str) else profile.name)


def _mean(run_secs: list[float] | None) -> float:
    if not run_secs:
        return ERROR_SECS
    return sum(float(s) for s in run_secs) / len(run_secs)


@dataclass
class StoredRecord:
    """One tuning-record line, parsed only as far as choosing needs (no trace replay)."""

    key: str  # workload structural hash, as MetaSchedule writes it
    secs: float  # mean run time (ERROR_SECS for a failed candidate)
    record_json: Any  # MetaSchedule's TuningRecord JSON
    workload_json: Any  # MetaSchedule's Workload JSON


class RecordStore:
    """A MetaSchedule JSON database directory, read and appended to line by line.

    TVM's own `JSONDatabase` replays the trace of every record when it opens (minutes for a
    big cache) and appends without locking; this reads only the numbers it needs, replays just
    the records that get used, takes an exclusive lock while a tuning run appends, and skips a
    torn last line (kill -9 in the middle of a write) instead of failing.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._records: dict[str, list[StoredRecord]] = {}
        self._workload_index: dict[str, int] = {}
        self._num_workloads = 0
        self._rule_based: dict[str, dict[str, Any]] = {}
        self._lock_fd: int | None = None
        self.scan()

    # reading -------------------------------------------------------------------------
    @staticmethod
    def _lines(path: Path) -> Iterator[Any]:
        try:
            text = path.read_text()
        except OSError:
            return
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # a torn write from a killed run: skip it
                logger.debug("%s: skipping an unreadable line", path)
                yield None

    def scan(self) -> None:
        """(Re)read the directory."""
        self._records, self._workload_index = {}, {}
        workloads: list[tuple[str, Any] | None] = []
        for obj in self._lines(self.path / WORKLOAD_FILE):
            entry = (str(obj[0]), obj) if isinstance(obj, list) and len(obj) == 2 else None
            workloads.append(entry)
            if entry is not None:
                self._workload_index.setdefault(entry[0], len(workloads) - 1)
        self._num_workloads = len(workloads)
        for obj in self._lines(self.path / RECORD_FILE):
            if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int)):
                continue
            index, record = obj
            if not 0 <= index < len(workloads) or workloads[index] is None:
                continue
            key, workload_json = workloads[index]
            run_secs = record[1] if isinstance(record, list) and len(record) > 1 else None
            self._records.setdefault(key, []).append(
                StoredRecord(key, _mean(run_secs), record, workload_json)
            )
        try:
            self._rule_based = json.loads((self.path / RULE_BASED_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            self._rule_based = {}

    def count(self, key: str) -> int:
        """Measured candidates (failed ones included) for a workload."""
        return len(self._records.get(key, ()))

    def best(self, key: str, k: int = 1) -> list[StoredRecord]:
        """The k fastest valid records of a workload."""
        valid = [r for r in self._records.get(key, ()) if r.secs < ERROR_SECS / 10]
        return sorted(valid, key=lambda r: r.secs)[:k]

    def records(self, key: str) -> list[StoredRecord]:
        return list(self._records.get(key, ()))

    def workload_keys(self) -> set[str]:
        return set(self._records)

    def rule_based_secs(self, key: str) -> float | None:
        entry = self._rule_based.get(key)
        return float(entry["secs"]) if entry and entry.get("secs") is not None else None

    def rule_based_entry(self, key: str) -> dict[str, Any] | None:
        return self._rule_based.get(key)

    # writing (only under lock()) -------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory's exclusive lock (one tuning run per cache at a time)."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TuningError(
                f"another tvmdeploy tuning run is writing to {self.path}; wait for it to finish, "
                "or point TVMDEPLOY_CACHE_DIR at another directory"
            ) from None
        self._lock_fd = fd
        try:
            self.scan()  # what a previous (perhaps killed) run left
            yield
        finally:
            self._lock_fd = None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _append(path: Path, line: str) -> None:
        # One write() of a whole line with O_APPEND, then fsync-free flush: a killed process
        # leaves either the whole line or (at worst) a torn last line that scan() skips.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def _workload_line(self, key: str, workload_json: Any) -> int:
        if key not in self._workload_index:
            self._append(self.path / WORKLOAD_FILE, json.dumps(workload_json))
            self._workload_index[key] = self._num_workloads
            self._num_workloads += 1
        return self._workload_index[key]

    def append(self, key: str, workload_json: Any, record_json: Any) -> StoredRecord:
        """Append one record (and its workload the first time) to the files right away."""
        assert self._lock_fd is not None, "append() needs lock()"
        index = self._workload_line(key, workload_json)
        self._append(self.path / RECORD_FILE, json.dumps([index, record_json]))
        run_secs = record_json[1] if isinstance(record_json, list) and len(record_json) > 1 else None
        stored = StoredRecord(key, _mean(run_secs), record_json, workload_json)
        self._records.setdefault(key, []).append(stored)
        return stored

    def set_rule_based(self, key: str, task: str, secs: float | None, detail: str = "") -> None:
        """Remember the rule-based schedule's time for a workload (atomic rewrite)."""
        self._rule_based[key] = {
            "task": task,
            "secs": secs,
            "detail": detail,
            "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        _write_json_atomic(self.path / RULE_BASED_FILE, self._rule_based)


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; records are shared data
    os.replace(tmp, path)


def compact_workload(workload_json: Any) -> Any:
    """The same workload JSON with its IR re-serialized without indentation (about half the size;
    TVM's JSONDatabase reads both: base64 of an 8-byte length and the IR's JSON graph)."""
    import base64
    import struct

    try:
        key, encoded = workload_json
        raw = base64.b64decode(encoded)
        (length,) = struct.unpack("<Q", raw[:8])
        graph = json.loads(raw[8 : 8 + length])
        text = json.dumps(graph, separators=(",", ":")).encode()
        return [key, base64.b64encode(struct.pack("<Q", len(text)) + text).decode()]
    except (ValueError, TypeError, struct.error, json.JSONDecodeError):
        return workload_json


def write_database(dest: Path, chosen: list[StoredRecord], rule_based: dict[str, Any],
                   merge: bool = False) -> list[Path]:
    """Write `chosen` (one record per workload) as a MetaSchedule JSON database in `dest`.

    With `merge`, records already in `dest` for other workloads are kept (how the shipped set
    grows by model). Returns the files written.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    records = {r.key: r for r in chosen}
    rules = dict(rule_based)
    if merge:
        existing = RecordStore(dest)
        for key in existing.workload_keys() - set(records):
            best = existing.best(key)
            if best:
                records[key] = best[0]
        rules = {**existing._rule_based, **rules}
    workload_lines, record_lines = [], []
    for index, key in enumerate(sorted(records)):
        record = records[key]
        workload_lines.append(json.dumps(compact_workload(record.workload_json)))
        record_lines.append(json.dumps([index, record.record_json]))
    files = [dest / WORKLOAD_FILE, dest / RECORD_FILE]
    for path, lines in zip(files, (workload_lines, record_lines)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    rules = {k: v for k, v in rules.items() if k in records}
    _write_json_atomic(dest / RULE_BASED_FILE, rules)
    return [*files, dest / RULE_BASED_FILE]


# --------------------------------------------------------------------------------------
# Tasks: the fused kernels of a module, with how much of each bucket's time they take
# --------------------------------------------------------------------------------------
@dataclass
class Task:
    """One distinct fused kernel (a MetaSchedule workload) and where it is called."""

    name: str
    mod: Any  # IRModule {"main": PrimFunc}, normalized as MetaSchedule keys it
    key: str
    flop: float
    kind: str  # "matmul", "reduction" or "injective"
    calls: dict[str, int]  # bucket function -> call count
    tuned: bool = False
    coefficient: float = 0.0  # Σ_b calls_b / T_b: weight of this kernel's time in the objective
    rule_based_secs: float | None = None
    best_secs: float | None = None  # best tuned record (any source) measured here
    trials: int = 0
    new_trials: int = 0
    stale: int = 0
    exhausted: bool = False
    context: Any = None  # ms.TuneContext, created when the task is first picked
    measured: set[int] = field(default_factory=set)  # structural hashes of measured schedules

    @property
    def weight(self) -> int:
        return sum(self.calls.values())

    @property
    def current_secs(self) -> float:
        """The time this kernel has now: the better of the rule-based and the tuned schedule."""
        options = [s for s in (self.rule_based_secs, self.best_secs) if s is not None]
        return min(options) if options else self.flop / 20e9

    def priority(self) -> float:
        return self.coefficient * self.current_secs * (0.75 ** max(0, self.stale - 1))


def workload_key(mod) -> str:
    """MetaSchedule's key for a workload: the structural hash, as JSONDatabase writes it."""
    import tvm_ffi

    return str(tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF)


def fused_module(mod, target):
    """`mod` after the CPU pipeline's fusion passes: the PrimFuncs that get scheduled."""
    import tvm

    from .cpu_schedule import fusion_passes

    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(fusion_passes(target))(mod)


def extract_tasks(mod, target) -> list[Task]:
    """Distinct fused kernels of `mod` (all bucket functions), with calls per bucket.

    Uses `ms.relax_integration.extract_tasks` per bucket function so the workloads are exactly
    MetaSchedule's (normalized and keyed by structural hash), then merges equal workloads.
    """
    import tvm
    from tvm import relax, tirx
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    from .cpu_schedule import is_matmul_like

    fused = fused_module(mod, target)
    prim_funcs = {gv: f for gv, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)}
    tasks: dict[str, Task] = {}
    for gv, func in fused.functions_items():
        if not isinstance(func, relax.Function):
            continue
        one = tvm.IRModule({gv: func, **prim_funcs})
        for extracted in ms.relax_integration.extract_tasks(one, target):
            task_mod = extracted.dispatched[0]
            key = workload_key(task_mod)
            if key not in tasks:
                prim = task_mod["main"]
                has_reduction = any(
                    iv.iter_type == tirx.IterVar.CommReduce
                    for block in _blocks(prim)
                    for iv in block.iter_vars
                )
                kind = "matmul" if is_matmul_like(prim) else "reduction" if has_reduction else "injective"
                tasks[key] = Task(
                    name=extracted.task_name, mod=task_mod, key=key,
                    flop=float(estimate_tir_flops(task_mod)), kind=kind, calls={},
                )
            calls = tasks[key].calls
            calls[gv.name_hint] = calls.get(gv.name_hint, 0) + int(extracted.weight)
    return sorted(tasks.values(), key=lambda t: -t.flop * t.weight)


def _blocks(func) -> list:
    """The blocks under the root of a (legalized, unscheduled) PrimFunc."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import get_root_block

    try:
        sch = s_tir.Schedule(func)
        return [sch.get(b) for b in sch.get_child_blocks(get_root_block(sch))]
    except Exception:  # noqa: BLE001 - classification is a hint
        return []


def select_tasks(tasks: list[Task], min_share: float = 0.01) -> list[Task]:
    """Mark the tasks worth trials: matmul-class kernels taking at least `min_share` of some
    bucket's FLOPs. Everything else keeps its rule-based schedule."""
    bucket_flop: dict[str, float] = {}
    for task in tasks:
        for bucket, n in task.calls.items():
            bucket_flop[bucket] = bucket_flop.get(bucket, 0.0) + n * task.flop
    for task in tasks:
        shares = [n * task.flop / bucket_flop[b] for b, n in task.calls.items() if bucket_flop[b] > 0]
        task.tuned = task.kind == "matmul" and bool(shares) and max(shares) >= min_share
    return [t for t in tasks if t.tuned]


def set_coefficients(tasks: list[Task]) -> None:
    """Objective: every bucket's latency counts relative to its rule-based latency, so a
    kernel's coefficient is Σ_b calls_b / T_b (T_b: the tuned kernels' rule-based time in b)."""
    bucket_secs: dict[str, float] = {}
    for task in tasks:
        for bucket, n in task.calls.items():
            bucket_secs[bucket] = bucket_secs.get(bucket, 0.0) + n * task.current_secs
    for task in tasks:
        task.coefficient = sum(n / bucket_secs[b] for b, n in task.calls.items() if bucket_secs[b] > 0)


def import_tensor_intrinsics(family: str = "x86") -> None:
    """Register the tensor intrinsics of one CPU family only.

    `import tvm.s_tir.tensor_intrin` (which MetaSchedule's TuneContext and LocalBuilder do in
    every process) registers every intrinsic TVM has, CUDA's hundreds included, by parsing
    TVMScript: 30-90 s on two shared cores, most of what a tuning process spent before its
    first trial. The package is entered without running its `__init__`, and only the submodule
    the profile's schedule rules use is imported; code that needs another family's intrinsics
    imports that submodule itself (as DLight's GPU rules do), which still works.
    """
    import importlib
    import importlib.util
    import sys

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        import tvm.s_tir

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return
        package = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run
        sys.modules[name] = package
        tvm.s_tir.tensor_intrin = package
    submodule = {"x86": "x86", "arm": "arm_cpu"}.get(family)
    if submodule:
        importlib.import_module(f"{name}.{submodule}")


# --------------------------------------------------------------------------------------
# Workers: one build pool and one measuring process for the whole run
# --------------------------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1


def _worker_init() -> None:
    """Runs first in every worker: die with the tuner, even when it is killed with -9."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent or parent == 1:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:  # belt and braces: PDEATHSIG follows the spawning thread, not process
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="tvmdeploy-parent-watch").start()
    import tvm.s_tir.meta_schedule  # noqa: F401 - pay the import once, at start


def _build_candidate(mod, target, scratch: str, shared: bool = False, cross_cc: str | None = None) -> str:
    """Build one scheduled kernel to an artifact under `scratch` (runs in a build worker).

    A .tar of object files for the local runner (it links them itself), or with `shared` a linked
    `.so` for a remote device, which may have no C compiler (with `cross_cc`, linked by that
    cross compiler, e.g. aarch64-linux-gnu-gcc for ARM profiles, as compiler/build.py links).
    """
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support.tar import tar

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    from tvm.driver import build as tvm_build

    rt_mod = tvm_build(mod, target=target)
    folder = tempfile.mkdtemp(prefix="cand-", dir=scratch)
    if shared:
        from tvm.support import cc

        path = os.path.join(folder, "kernel.so")
        rt_mod.export_library(path, fcompile=cc.cross_compiler(cross_cc) if cross_cc else None)
        return path
    path = os.path.join(folder, "kernel." + tar.output_format)
    rt_mod.export_library(path, fcompile=tar)
    return path


def cold_evaluator_config(repeat: int):
    """How every candidate (and every rule-based baseline) is timed: cold, as inside the model.

    Each of `5 * repeat` (at least 10) single runs starts with every argument but the first flushed
    from the CPU caches: the activation the previous kernel just wrote stays, the weights do not
    (in a forward pass a layer's weights were last touched a whole pass ago). Timed hot, with
    the weights left in cache by the previous run, schedules that stream weights badly win in
    isolation and lose in the model: tuned DistilBERT 1x32 and MiniLM 1x128 ran 10% slower than
    the rule-based build with hot-timed records. The best run is kept: other load only adds time.
    """
    from tvm.s_tir.meta_schedule.runner.config import EvaluatorConfig

    return EvaluatorConfig(number=1, repeat=max(10, 5 * repeat), min_repeat_ms=0, enable_cpu_cache_flush=True)


def _measure_candidate(artifact: str, args_info: list, repeat: int) -> list[float]:
    """Time one built kernel on random inputs (runs in the measuring worker), cold: see
    `cold_evaluator_config`."""
    from tvm.s_tir.meta_schedule.runner.local_runner import _worker_func

    costs = _worker_func(None, None, None, cold_evaluator_config(repeat), 1, artifact, "cpu", args_info)
    return [min(costs)]


@dataclass(frozen=True)
class RpcMeasure:
    """Where `Workers` measures when tuning over RPC: the tracker, the key, how to link."""

    tracker: str  # HOST:PORT
    key: str
    cross_cc: str | None = None  # the profile's cross compiler, for the shared libraries
    request_timeout: float = 60.0  # how long a candidate waits for a free server of the key


class Workers:
    """A persistent build pool and a single measuring worker (`tvm.exec.popen_worker`s).

    With `rpc`, candidates are built as shared libraries and the measuring worker times them on
    the remote device (`rpc_tuning.measure_rpc`) instead of here.
    """

    def __init__(self, build_workers: int, build_timeout: float, run_timeout: float,
                 rpc: RpcMeasure | None = None):
        from tvm.support.popen_pool import PopenPoolExecutor

        self.build_timeout, self.run_timeout, self.rpc = build_timeout, run_timeout, rpc
        # Every artifact lives under one directory per run, removed on close (interrupted runs
        # leave built-but-unmeasured candidates behind otherwise).
        self.scratch = scratch_dir("tvmdeploy-scratch")
        self.builders = PopenPoolExecutor(max_workers=build_workers, timeout=build_timeout,
                                          initializer=_worker_init, maximum_process_uses=256)
        # Over RPC a measurement may first wait (bounded) for a free server of the key.
        runner_timeout = run_timeout + (rpc.request_timeout + 10 if rpc else 0)
        self.runner = PopenPoolExecutor(max_workers=1, timeout=runner_timeout, initializer=_worker_init,
                                        maximum_process_uses=2048)

    def build(self, mods: list, target) -> list[tuple[str | None, str | None]]:
        """(artifact, None) or (None, error) per module, built in parallel."""
        from tvm.support.popen_pool import StatusKind

        results = []
        scratch = self.scratch
        shared = self.rpc is not None
        cross_cc = self.rpc.cross_cc if self.rpc else None
        for result in self.builders.map_with_error_catching(
                lambda m: _build_candidate(m, target, scratch, shared, cross_cc), mods):
            if result.status == StatusKind.COMPLETE:
                results.append((result.value, None))
            elif result.status == StatusKind.TIMEOUT:
                results.append((None, f"build timed out after {self.build_timeout:.0f} s"))
            else:
                results.append((None, f"build failed: {_last_line(result.value)}"))
        return results

    def measure(self, artifact: str, args_info: list, repeat: int) -> tuple[list[float] | None, str | None]:
        """([seconds], None) or (None, error) for one built kernel; the artifact is removed.

        Over RPC, a device that cannot be reached (tracker gone, key no longer registered, its
        servers busy past the request timeout) is no verdict on the kernel: that raises
        TuningError, so no failed record is written for it and the run stops.
        """
        from tvmdeploy.runtime.errors import RemoteError

        try:
            if self.rpc is None:
                future = self.runner.submit(_measure_candidate, artifact, args_info, repeat)
            else:
                from .rpc_tuning import measure_rpc

                future = self.runner.submit(measure_rpc, artifact, args_info, repeat,
                                            self.rpc.tracker, self.rpc.key, max(self.run_timeout, 10.0),
                                            self.rpc.request_timeout)
            return future.result(), None
        except TimeoutError:
            return None, f"run timed out after {self.run_timeout:.0f} s"
        except RemoteError as err:  # from the worker, its message is the worker's traceback
            why = _last_line(err).removeprefix(f"{RemoteError.__module__}.{RemoteError.__name__}: ")
            raise TuningError(
                f"measuring on the remote device stopped: {why.rstrip('.')}. Every record measured until "
                "now is saved; run the same command again to continue once the device is back"
            ) from None
        except Exception as err:  # noqa: BLE001 - a candidate that crashes is a failed trial
            return None, f"run failed: {_last_line(err)}"
        finally:
            shutil.rmtree(os.path.dirname(artifact), ignore_errors=True)

    def pids(self) -> list[int]:
        """Process ids of the live workers of both pools."""
        pids = []
        for pool in (self.builders, self.runner):
            for worker in list(getattr(pool, "_worker_map", {}).values()):
                proc = getattr(worker, "_proc", None)
                if proc is not None and proc.poll() is None:
                    pids.append(proc.pid)
        return pids

    def close(self) -> None:
        """Stop both pools and make sure none of their workers (or their children) lives on."""
        pids = self.pids()
        for pool in (self.builders, self.runner):
            with contextlib.suppress(Exception):
                pool.shutdown(wait=False)
        kill_processes(pids)
        shutil.rmtree(self.scratch, ignore_errors=True)


def scratch_dir(prefix: str) -> str:
    """A temporary directory named after this process; ones left by dead processes (kill -9
    gives no chance to clean up) are removed first."""
    import psutil

    for stale in Path(tempfile.gettempdir()).glob(f"{prefix}-*-*"):
        pid = stale.name[len(prefix) + 1 :].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-")


def _last_line(error: object) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def kill_processes(pids: list[int]) -> int:
    """SIGKILL these processes and their descendants; returns how many were still alive."""
    import psutil

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            procs += [*proc.children(recursive=True), proc]
    alive = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
            alive += 1
    psutil.wait_procs(procs, timeout=3)
    return alive


# --------------------------------------------------------------------------------------
# Tuning
# --------------------------------------------------------------------------------------
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


@dataclass
class TuneResult:
    """What compile.py needs: the database to build with, the manifest summary, files to ship."""

    database: Any  # ms.Database with one record per applied workload, or None
    summary: dict[str, Any]
    files: list[Path]
    tasks: list[Task] = field(default_factory=list)
    cache: Path | None = None  # the cache directory the records were read from / measured into
    profile: str | None = None


@dataclass
class TuneStatus:
    """Progress of a tuning run, as given to a `progress` callback."""

    phase: str  # "rule-based" or "search"
    done: int
    total: int | None
    task: str
    estimate_ms: float | None  # tuned kernels of the largest bucket, best schedules now
    rule_based_ms: float | None  # the same kernels with the rule-based schedules


def check_tunable(profile: Profile, rpc: str | None = None, rpc_key: str | None = None):
    """Raise TuningError unless code for `profile` can be measured: on this host, or with `rpc`
    (tracker HOST:PORT) and `rpc_key`, on the remote device behind the key.

    Over RPC this opens one short session to learn the device's arch (runtime/remote.py; CPU
    features cannot be read over RPC, so only the arch is checked) and returns that
    `RemoteDevice`; an unreachable tracker or an unknown key raises RemoteError at once.
    Returns None for local tuning.
    """
    from tvmdeploy.runtime.probe import missing_requirements, probe

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
            f"{profile.name}: this machine cannot run the code it would measure ({'; '.join(missing)}). "
            "Tune on a machine of that class (the records land in its cache) or compile without --tune."
        )


def _check_remote(profile: Profile, rpc: str | None, rpc_key: str | None, local_arch: str):
    from tvmdeploy.runtime import remote

    if not rpc or not rpc_key:
        raise TuningError("tuning on a remote device needs both --rpc HOST:PORT (the TVM RPC tracker) and "
                          "--rpc-key KEY (the key the device's rpc_server registered under)")
    arch = profile.requires.get("arch")
    if arch and arch != local_arch and not profile.cross_cc:
        raise TuningError(f"{profile.name}: its code is for {arch} and the profile names no cross_cc to link "
                          f"it on this {local_arch} machine; tune it from a {arch} machine")
    if profile.cross_cc and shutil.which(profile.cross_cc.split()[0]) is None:
        raise TuningError(f"{profile.name}: the cross compiler {profile.cross_cc!r} that links its kernels is "
                          "not on PATH; install it (e.g. Debian's gcc-aarch64-linux-gnu)")
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
        return {"where": "rpc", "tracker": device.tracker, "key": device.key, "arch": device.arch,
                "cores": device.cores, "description": device.description}
    from tvmdeploy.runtime.probe import probe

    local = probe()
    return {"where": "local", "arch": local.arch, "cores": local.cores, "description": local.description}


def _num_cores() -> int:
    from tvmdeploy.runtime._tvm import default_num_threads

    return int(os.environ.get("TVM_NUM_THREADS") or default_num_threads())


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


class _Display:
    """The rich progress bar (or a callback) for a tuning run."""

    def __init__(self, progress: bool | Callable[[TuneStatus], None], profile: str):
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=False,
            )
        self.profile = profile
        self._ids: dict[str, Any] = {}

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)
        return False

    def update(self, status: TuneStatus) -> None:
        if self.callback:
            self.callback(status)
        if not self.bar:
            return
        label = {"rule-based": "rule-based timings", "rule-based check": "rule-based re-check"}.get(
            status.phase, f"tune {self.profile}")
        if status.phase not in self._ids:
            self._ids[status.phase] = self.bar.add_task(label, total=status.total, info="")
        estimate = ""
        if status.estimate_ms is not None and status.rule_based_ms:
            estimate = f" · est. {status.estimate_ms:.2f} ms (rule-based {status.rule_based_ms:.2f} ms)"
        self.bar.update(self._ids[status.phase], completed=status.done, total=status.total,
                        info=f"{status.task}{estimate}")


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


def _rule_based_mod(task: Task, target):
    """The kernel as the rule-based default schedule leaves it (what tuning must beat)."""
    import tvm

    from .cpu_schedule import default_schedule_pass

    with target:  # on a copy: the pass updates the module it is given in place
        return default_schedule_pass(target)(tvm.IRModule({"main": task.mod["main"]}))


def measure_rule_based(tasks: list[Task], store: RecordStore, workers: Workers, target,
                       settings: TuneSettings, display: _Display | None = None, again: bool = False) -> int:
    """Time the rule-based schedule of every task the store has no time for (kept in the
    store's rule_based.json, so each workload is measured once per cache).

    With `again`, the given tasks are timed once more and the faster time is kept: a baseline
    measured while the machine was busy would otherwise make a tuned record look better than
    it is (load only ever adds time, so the minimum is the better estimate).
    """
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    display = display or _Display(False, "")
    phase = "rule-based check" if again else "rule-based"
    todo = list(tasks) if again else [t for t in tasks if store.rule_based_entry(t.key) is None]
    for task in tasks:
        task.rule_based_secs = store.rule_based_secs(task.key)
    if not todo:
        return 0
    display.update(TuneStatus(phase, 0, len(todo), "building", None, None))
    mods = [_rule_based_mod(t, target) for t in todo]
    built = workers.build(mods, target)
    for i, (task, mod, (artifact, error)) in enumerate(zip(todo, mods, built)):
        display.update(TuneStatus(phase, i, len(todo), task.name, None, None))
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
    display.update(TuneStatus(phase, len(todo), len(todo), "done", None, None))
    return len(todo)


def _quiet_ms_logger() -> logging.Logger:
    ms_logger = logging.getLogger("tvmdeploy.tune.metaschedule")
    ms_logger.setLevel(logging.ERROR)
    ms_logger.propagate = False
    return ms_logger


class _Search:
    """MetaSchedule's evolutionary search + XGBoost cost model, shared by all tasks."""

    def __init__(self, target, settings: TuneSettings, num_cores: int):
        from tvm.s_tir import meta_schedule as ms

        self.ms, self.target, self.settings, self.num_cores = ms, target, settings, num_cores
        self.database = ms.database.MemoryDatabase(module_equality="structural")
        self.cost_model = ms.cost_model.XGBModel(num_tuning_cores=num_cores, adaptive_training=True)
        self.logger = _quiet_ms_logger()

    def start(self, task: Task, store: RecordStore) -> None:
        """Create the task's TuneContext, seeded with the best records the cache has."""
        ms = self.ms
        context = ms.TuneContext(
            mod=task.mod, target=self.target, space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(population_size=self.settings.population),
            task_name=task.name, rand_state=self.settings.seed + int(task.key) % 10007,
            num_threads=self.num_cores, logger=self.logger,
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
                results.append(ms.runner.RunnerResult([float(s) for s in stored.record_json[1]], None))
        if seeds:  # warm the cost model with what earlier runs measured
            self.cost_model.update(context, seeds, results)
        context.pre_tuning(max_trials=1 << 30, num_trials_per_iter=self.settings.batch,
                           design_spaces=context.generate_design_space(), database=self.database,
                           cost_model=self.cost_model)
        task.context = context

    def candidates(self, task: Task) -> list | None:
        return task.context.generate_measure_candidates()

    def record(self, task: Task, candidate, run_secs: list[float]):
        ms = self.ms
        workload = self.database.commit_workload(task.mod)
        record = ms.database.TuningRecord(candidate.sch.trace, workload, run_secs, self.target,
                                          candidate.args_info)
        self.database.commit_tuning_record(record)
        return record

    def notify(self, task: Task, candidates: list, results: list) -> None:
        if candidates:
            task.context.notify_runner_results(candidates, results)
            self.cost_model.update(task.context, candidates, results)


def _schedule_hash(mod) -> int:
    import tvm_ffi

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


def tune(mod, profile: Profile, trials: int | None, work_dir: str | Path, minutes: float | None = None,
         progress: bool | Callable[[TuneStatus], None] = True, settings: TuneSettings | None = None,
         task_filter: Callable[[Task], bool] | None = None, rpc: str | None = None,
         rpc_key: str | None = None) -> TuneResult:
    """Tune `mod`'s matmul-class kernels for `profile` into the per-profile cache, then return
    the records to build with (shipped, cached and fresh, the best per workload).

    `trials` is the budget for this model's kernels counting records already in the cache, so a
    rerun after an interruption continues and a rerun after completion measures nothing.
    `minutes` caps this run's wall time (either limit may be None, not both). `progress` is True
    for a progress bar and closing table on stderr, False for silence, or a callable that gets
    a TuneStatus. Raises TuningInterrupted on SIGINT/SIGTERM once the workers are gone; every
    record measured until then is in the cache.

    With `rpc` (a TVM RPC tracker, HOST:PORT) and `rpc_key`, every candidate is timed on the
    device behind the key, its records go to `cache_path(profile, rpc_key)`, and the summary's
    `measured_on` says so; the device must be of the profile's arch (checked first).
    """
    if not trials and not minutes:
        raise ValueError("give a trial budget (--trials N) or a time budget (--minutes M)")
    device = check_tunable(profile, rpc, rpc_key)
    from . import build as build_stage

    settings = settings or TuneSettings()
    import_tensor_intrinsics(profile.family)
    clock = _Clock()
    started = time.perf_counter()
    deadline = started + minutes * 60 if minutes else None
    num_cores = _num_cores()  # this machine's: build workers and the search
    # What the schedules assume (parallel loops): the cores of the device that runs the code.
    target = build_stage.tvm_target(profile, num_cores=(device.cores if device and device.cores else num_cores))
    cache_key = rpc_key if device is not None else None
    rpc_measure = (RpcMeasure(device.tracker, device.key, profile.cross_cc)
                   if device is not None else None)
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
    with store.lock(), _Signals() as signals, _Display(progress, profile.name) as display:
        for task in tuned:
            task.trials = store.count(task.key)
            best = store.best(task.key)
            task.best_secs = best[0].secs if best else None
        done_before = sum(t.trials for t in tuned)
        remaining = None if not trials else max(0, trials - done_before)

        def show(label: str) -> None:
            shown = (done_before if trials else 0) + new_total
            display.update(TuneStatus("search", shown, trials or None, label, *_estimate(tuned)[1:]))

        workers = None
        try:
            workers = Workers(max(1, num_cores), settings.build_timeout, settings.run_timeout, rpc_measure)
            if tuned and remaining != 0:
                with clock("rule-based"):
                    measured_rule_based = measure_rule_based(tuned, store, workers, target, settings, display)
            for task in tuned:
                task.rule_based_secs = store.rule_based_secs(task.key)
            set_coefficients(tuned)
            search = _Search(target, settings, num_cores)
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
                    results.append(search.ms.runner.RunnerResult(run_secs, None if run_secs else error))
                    show(task.name)
                with clock("cost model"):
                    search.notify(task, measured, results)
                task.stale = 0 if task.current_secs < before * 0.99 else task.stale + 1
            winners = [t for t in tuned if t.new_trials and t.best_secs is not None
                       and t.rule_based_secs is not None and t.best_secs < t.rule_based_secs]
            if winners:  # a tuned record replaces a rule-based schedule only on a fair comparison
                with clock("rule-based"):
                    measure_rule_based(winners, store, workers, target, settings, display, again=True)
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
    result = lookup(mod, profile, work_dir, tasks=tasks, fresh_store=store, quiet=True, rpc_key=cache_key)
    assert result is not None
    result.summary.update({
        "new_trials": new_total,
        "seconds": round(seconds, 1),
        "budget": {"trials": trials, "minutes": minutes},
        "tuned_kernels": len(tuned),
        "rule_based_measured": measured_rule_based,
        "phase_seconds": clock.rounded(),
        "measured_on": _measured_on(device),
    })
    if progress is True:
        where = f" on RPC key {device.key!r} ({device.arch})" if device is not None else ""
        print_table(tuned, profile.name + where)
        console.print(
            f"tuning {profile.name}{where}: {new_total} new trial(s) in {seconds:.0f} s "
            f"({done_before} were already in the cache); {describe(result.summary)}"
        )
    return result


def print_table(tasks: list[Task], profile: str) -> None:
    """Per-task table: name, weight, trials, best latency, FLOP/s, against rule-based."""
    table = Table(title=f"tuned kernels ({profile})", title_justify="left")
    for column in ("task", "weight", "trials", "best µs", "GFLOP/s", "rule-based µs", "speed-up"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task in sorted(tasks, key=lambda t: -t.coefficient * t.current_secs):
        best = task.current_secs if (task.best_secs or task.rule_based_secs) else None
        table.add_row(
            task.name, str(task.weight), f"{task.trials} (+{task.new_trials})",
            f"{best * 1e6:.1f}" if best else "-",
            f"{task.flop / best / 1e9:.1f}" if best else "-",
            f"{task.rule_based_secs * 1e6:.1f}" if task.rule_based_secs else "-",
            f"{task.rule_based_secs / best:.2f}x" if best and task.rule_based_secs else "-",
        )
    console.print(table)


# --------------------------------------------------------------------------------------
# Applying records (zero new trials)
# --------------------------------------------------------------------------------------
def _pick(task: Task, stores: dict[str, RecordStore], fresh_keys: dict[str, int],
          only_faster: bool = True) -> tuple[str, StoredRecord] | None:
    """The best record for a task across sources that beats that source's rule-based time."""
    options = []
    for source, store in stores.items():
        best = store.best(task.key)
        if not best:
            continue
        baseline = store.rule_based_secs(task.key)
        if only_faster and baseline is not None and best[0].secs >= baseline:
            continue  # the rule-based schedule is at least as fast: keep it
        label = source
        if source == "cache" and task.key in fresh_keys:
            records = store.records(task.key)
            if best[0] in records[fresh_keys[task.key]:]:
                label = "fresh"
        options.append((best[0].secs, label, best[0]))
    if not options:
        return None
    _, label, record = min(options, key=lambda o: o[0])
    return label, record


def lookup(mod, profile: Profile, work_dir: str | Path, tasks: list[Task] | None = None,
           fresh_store: RecordStore | None = None, quiet: bool = False,
           only_faster: bool = True, rpc_key: str | None = None) -> TuneResult | None:
    """Records for `mod`'s kernels from the shipped set and the cache, with no measuring.

    Returns None for profiles tuning does not cover (CUDA) or when no kernel has a record that
    beats its rule-based schedule (`only_faster=False` applies the best record regardless, to
    inspect what tuning found). The result's files (a pruned JSON database with exactly the
    applied records) go to `work_dir` for the bundle. With `rpc_key`, the cache read is the one
    of records measured on the device behind that key (`cache_path(profile, rpc_key)`), instead
    of this machine's.
    """
    if profile.target.get("kind") != "llvm":
        return None
    import_tensor_intrinsics(profile.family)  # records may replay tensorize instructions
    from tvm.s_tir import meta_schedule as ms

    from . import build as build_stage

    cache = cache_path(profile, rpc_key)
    stores = {"shipped": RecordStore(shipped_path(profile)), "cache": RecordStore(cache)}
    for_whom = f"{profile.name} (RPC key {rpc_key!r})" if rpc_key else profile.name
    how = f"`tvmdeploy tune MODEL -t {profile.name} --trials N" + (" --rpc HOST:PORT --rpc-key KEY" if rpc_key else "")
    how += "` tunes into the cache"
    if tasks is None and not any(store.workload_keys() for store in stores.values()):
        if not quiet:
            console.print(f"  tuning records for {for_whom}: none yet; rule-based default schedules ({how})")
        return None
    target = build_stage.tvm_target(profile, num_cores=_num_cores())
    if tasks is None:
        tasks = extract_tasks(mod, target)
    fresh_keys: dict[str, int] = {}
    if fresh_store is not None:  # records this run appended are "fresh"; find where they start
        for task in tasks:
            total = fresh_store.count(task.key)
            if task.new_trials:
                fresh_keys[task.key] = total - task.new_trials
    database = ms.database.MemoryDatabase(module_equality="structural")
    chosen: list[StoredRecord] = []
    rule_based: dict[str, Any] = {}
    sources: dict[str, int] = {}
    speedups = []
    for task in tasks:
        picked = _pick(task, stores, fresh_keys, only_faster)
        if picked is None:
            continue
        label, stored = picked
        try:
            workload = database.commit_workload(task.mod)
            record = ms.database.TuningRecord.from_json(stored.record_json, workload)
        except Exception as err:  # noqa: BLE001 - e.g. a record from another TVM version
            logger.warning("%s: cannot replay its %s record (%s); using the rule-based schedule",
                           task.name, label, str(err).splitlines()[0])
            continue
        database.commit_tuning_record(record)
        chosen.append(stored)
        sources[label] = sources.get(label, 0) + 1
        source_store = stores["shipped" if label == "shipped" else "cache"]
        entry = source_store.rule_based_entry(task.key)
        if entry:
            rule_based[task.key] = entry
            if entry.get("secs"):
                speedups.append(entry["secs"] / stored.secs)
    trials = sum(stores["cache"].count(t.key) for t in tasks)
    if not chosen:
        if not quiet:
            console.print(f"  tuning records for {for_whom}: none for these kernels; rule-based default "
                          f"schedules ({how})")
        if fresh_store is None:
            return None
    files = write_database(Path(work_dir), chosen, rule_based) if chosen else []
    summary = {
        "trials": trials,
        "new_trials": 0,
        "seconds": 0.0,
        "source": "+".join(s for s in ("shipped", "cache", "fresh") if sources.get(s)) or "none",
        "records": sources,
        "kernels": {"applied": len(chosen), "total": len(tasks),
                    "matmul": sum(t.kind == "matmul" for t in tasks)},
        "kernel_speedup_vs_rule_based": _geomean(speedups),
    }
    if rpc_key:  # the cache's records were timed on that device (tune() says more when it measures)
        summary["measured_on"] = {"where": "rpc", "key": rpc_key}
    if not quiet:
        console.print(f"  tuning records for {for_whom}: {describe(summary)} (0 new trials)")
    return TuneResult(database if chosen else None, summary, files, tasks, cache, profile.name)


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v > 0]
    if not values:
        return None
    return round(math.exp(sum(math.log(v) for v in values) / len(values)), 3)


def describe(summary: dict[str, Any]) -> str:
    """One line: how many kernels got records, from where."""
    kernels = summary.get("kernels", {})
    parts = [f"{n} from the {'shipped set' if s == 'shipped' else 'cache' if s == 'cache' else 'fresh run'}"
             for s, n in summary.get("records", {}).items()]
    speed = summary.get("kernel_speedup_vs_rule_based")
    text = f"{kernels.get('applied', 0)} of {kernels.get('total', 0)} kernels use tuned schedules"
    if parts:
        text += " (" + ", ".join(parts) + ")"
    if speed:
        text += f", {speed:.2f}x faster than rule-based (geomean)"
    return text


# --------------------------------------------------------------------------------------
# `tvmdeploy tune`: export + import + tune into the cache
# --------------------------------------------------------------------------------------
@dataclass
class TuneOptions:
    """Everything `tvmdeploy tune` takes; `display()` says what will happen."""

    model: str
    target: str = "host"
    trials: int | None = None
    minutes: float | None = None
    buckets: str | None = None
    task: str | None = None
    opset: int | None = None
    export_dir: str | None = None  # also write this model's best records here (e.g. to ship)
    rpc: str | None = None  # HOST:PORT of a TVM RPC tracker: measure on the device behind rpc_key
    rpc_key: str | None = None

    def display(self, profile: Profile, device=None) -> None:
        budget = " and ".join(
            [f"{self.trials} trials" for _ in [0] if self.trials] + [f"{self.minutes:g} min" for _ in [0] if self.minutes]
        )
        console.print(f"[bold]tvmdeploy tune[/bold] {self.model} for {profile.name}: budget {budget}")
        console.print(f"  measure : {device.description if device is not None else 'this machine'}")
        console.print(f"  cache   : {cache_path(profile, self.rpc_key if device is not None else None)}")
        if self.export_dir:
            console.print(f"  export  : {self.export_dir}")


def tune_model(options: TuneOptions) -> TuneResult:
    """Export and import `options.model`, tune it into the cache; optionally export records."""
    from . import export as export_stage
    from . import importer
    from .compile import resolve_profiles

    profile = resolve_profiles([options.target])[0]
    device = check_tunable(profile, options.rpc, options.rpc_key)  # a wrong --rpc fails before the export
    options.display(profile, device)
    cache_key = options.rpc_key if device is not None else None
    buckets = importer.parse_buckets(options.buckets or importer.DEFAULT_BUCKETS)
    work = scratch_dir("tvmdeploy-tune")
    try:
        work_dir = Path(work)
        with console.status("export + import …"):
            exported = export_stage.export(options.model, work_dir / "onnx", task=options.task, opset=options.opset)
            imported = importer.import_onnx(exported.onnx_path, buckets, exported.config.get("max_position_embeddings"))
        result = tune(imported.mod, profile, options.trials, work_dir / "tuning", minutes=options.minutes,
                      rpc=options.rpc, rpc_key=options.rpc_key)
        if options.export_dir:
            store = RecordStore(cache_path(profile, cache_key))
            picked = [_pick(task, {"cache": store}, {}) for task in result.tasks]
            chosen = [record for _, record in filter(None, picked)]
            rules = {r.key: store.rule_based_entry(r.key) for r in chosen if store.rule_based_entry(r.key)}
            write_database(Path(options.export_dir), chosen, rules, merge=True)
            _append_meta(Path(options.export_dir), options, profile, result, len(chosen))
            console.print(f"exported {len(chosen)} record(s) to {options.export_dir}")
        result.files = []  # they lived in the temporary directory
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _append_meta(dest: Path, options: TuneOptions, profile: Profile, result: TuneResult, exported: int) -> None:
    """`meta.json` beside exported records: which run produced them, on what, in how long."""
    import tvm

    path = dest / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        meta = {"profile": profile.name, "runs": []}
    measured_on = result.summary.get("measured_on", {})
    if measured_on.get("where") == "rpc":  # no CPU model over RPC: the device as RPC describes it
        cpu, cores = measured_on.get("description"), measured_on.get("cores")
    else:
        from tvmdeploy.runtime.probe import probe

        cpu, cores = probe().cpu_model, _num_cores()
    meta["runs"].append({
        "model": Path(options.model).name, "buckets": options.buckets, "records": exported,
        "trials": result.summary.get("trials"), "new_trials": result.summary.get("new_trials"),
        "minutes": round(result.summary.get("seconds", 0) / 60, 1), "cpu": cpu, "cores": cores,
        "measured_on": measured_on.get("where", "local"),
        "tvm": tvm.__version__, "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    })
    meta["trials"] = sum(run.get("trials") or 0 for run in meta["runs"])
    meta["minutes"] = round(sum(run.get("minutes") or 0 for run in meta["runs"]), 1)
    _write_json_atomic(path, meta)
