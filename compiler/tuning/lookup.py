"""Lookup: the records `compile` builds with, from the shipped set and the cache, with no measuring.

For each kernel the best record of each source is applied only where it beats that source's
measured rule-based time; the bundle gets a pruned database with exactly the applied records.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvm.s_tir import meta_schedule as ms
from tvmdeploy.targets import Profile

from ..build import tvm_target
from ..kernels.tensor_intrin import import_tensor_intrinsics
from .records import RecordStore, StoredRecord, cache_path, shipped_path, write_database
from .tasks import Task, extract_tasks
from .workers import num_cores

logger = logging.getLogger(__name__)


@dataclass
class TuneResult:
    """What the compile driver needs: the database to build with, the summary, files to ship."""

    database: Any  # ms.Database with one record per applied workload, or None
    summary: dict[str, Any]
    files: list[Path]
    tasks: list[Task] = field(default_factory=list)
    cache: Path | None = None  # the cache directory the records were read from / measured into
    profile: str | None = None


def pick(
    task: Task, stores: dict[str, RecordStore], fresh_keys: dict[str, int], only_faster: bool = True
) -> tuple[str, StoredRecord] | None:
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
            if best[0] in records[fresh_keys[task.key] :]:
                label = "fresh"
        options.append((best[0].secs, label, best[0]))
    if not options:
        return None
    _, label, record = min(options, key=lambda o: o[0])
    return label, record


def lookup(
    mod,
    profile: Profile,
    work_dir: str | Path,
    tasks: list[Task] | None = None,
    fresh_store: RecordStore | None = None,
    quiet: bool = False,
    only_faster: bool = True,
    rpc_key: str | None = None,
) -> TuneResult | None:
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
    cache = cache_path(profile, rpc_key)
    stores = {"shipped": RecordStore(shipped_path(profile)), "cache": RecordStore(cache)}
    for_whom = f"{profile.name} (RPC key {rpc_key!r})" if rpc_key else profile.name
    how = f"`tvmdeploy tune MODEL -t {profile.name} --trials N" + (
        " --rpc HOST:PORT --rpc-key KEY" if rpc_key else ""
    )
    how += "` tunes into the cache"
    if tasks is None and not any(store.workload_keys() for store in stores.values()):
        if not quiet:
            logger.info(
                "  tuning records for %s: none yet; rule-based default schedules (%s)",
                for_whom,
                how,
            )
        return None
    target = tvm_target(profile, num_cores=num_cores())
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
        picked = pick(task, stores, fresh_keys, only_faster)
        if picked is None:
            continue
        label, stored = picked
        try:
            workload = database.commit_workload(task.mod)
            record = ms.database.TuningRecord.from_json(stored.record_json, workload)
        except Exception as err:  # noqa: BLE001 - e.g. a record from another TVM version
            logger.warning(
                "%s: cannot replay its %s record (%s); using the rule-based schedule",
                task.name,
                label,
                str(err).splitlines()[0],
            )
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
            logger.info(
                "  tuning records for %s: none for these kernels; "
                "rule-based default schedules (%s)",
                for_whom,
                how,
            )
        if fresh_store is None:
            return None
    files = write_database(Path(work_dir), chosen, rule_based) if chosen else []
    summary = {
        "trials": trials,
        "new_trials": 0,
        "seconds": 0.0,
        "source": "+".join(s for s in ("shipped", "cache", "fresh") if sources.get(s)) or "none",
        "records": sources,
        "kernels": {
            "applied": len(chosen),
            "total": len(tasks),
            "matmul": sum(t.kind == "matmul" for t in tasks),
        },
        "kernel_speedup_vs_rule_based": _geomean(speedups),
    }
    if rpc_key:  # the cache's records were timed on that device (tune() says more when it measures)
        summary["measured_on"] = {"where": "rpc", "key": rpc_key}
    if not quiet:
        logger.info("  tuning records for %s: %s (0 new trials)", for_whom, describe(summary))
    return TuneResult(database if chosen else None, summary, files, tasks, cache, profile.name)


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v > 0]
    if not values:
        return None
    return round(math.exp(sum(math.log(v) for v in values) / len(values)), 3)


def describe(summary: dict[str, Any]) -> str:
    """One line: how many kernels got records, from where."""
    kernels = summary.get("kernels", {})
    parts = [
        f"{n} from the "
        f"{'shipped set' if s == 'shipped' else 'cache' if s == 'cache' else 'fresh run'}"
        for s, n in summary.get("records", {}).items()
    ]
    speed = summary.get("kernel_speedup_vs_rule_based")
    text = f"{kernels.get('applied', 0)} of {kernels.get('total', 0)} kernels use tuned schedules"
    if parts:
        text += " (" + ", ".join(parts) + ")"
    if speed:
        text += f", {speed:.2f}x faster than rule-based (geomean)"
    return text
