"""The tune driver: export + import a model, tune its kernels into the cache, export records.

The CLI parses arguments into `TuneOptions` and calls `tune_model`; a script can do the same.
"""

from __future__ import annotations

import datetime
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
from tvmdeploy.runtime.atomic import write_json_atomic
from tvmdeploy.runtime.probe import probe
from tvmdeploy.targets import Profile
from tvmdeploy.targets.resolve import resolve_profile

from ..frontend import export, importer
from ..frontend.model_facts import max_positions_of
from ..options import RpcTarget, default_buckets, parse_buckets
from ..tuning import (
    RecordStore,
    TuneResult,
    TuneStatus,
    cache_path,
    check_tunable,
    pick,
    tune,
    write_database,
)
from ..tuning.records import META_FILE, read_meta
from ..tuning.workers import num_cores, scratch_dir

logger = logging.getLogger(__name__)


@dataclass
class TuneOptions:
    """Everything `tvmdeploy tune` takes; `display()` says what will happen."""

    model: str
    profile: str = "host"  # a profile name; 'host' = this machine's
    trials: int | None = None
    minutes: float | None = None
    buckets: str | None = None
    task: str | None = None
    opset: int | None = None
    export_dir: str | None = None  # also write this model's best records here (e.g. to ship)
    rpc: RpcTarget | None = None  # a remote device: every candidate is timed there
    progress: bool | Callable[[TuneStatus], None] = True  # see `tuning.tune`

    def display(self, profile: Profile, device: Any = None) -> None:
        """Say what will happen, before it happens."""
        budget = " and ".join(
            ([f"{self.trials} trials"] if self.trials else [])
            + ([f"{self.minutes:g} min"] if self.minutes else [])
        )
        key = self.rpc.key if self.rpc and device is not None else None
        logger.info("tvmdeploy tune %s for %s: budget %s", self.model, profile.name, budget)
        logger.info("  measure : %s", device.description if device is not None else "this machine")
        logger.info("  cache   : %s", cache_path(profile, key))
        if self.export_dir:
            logger.info("  export  : %s", self.export_dir)


def tune_model(options: TuneOptions) -> TuneResult:
    """Export and import `options.model`, tune it into the cache; optionally export records."""
    from ..tvmscript_stack import install

    install()  # TVMScript parsing without a source lookup per stack frame (tvmscript_stack.py)
    profile = resolve_profile(options.profile)
    tracker, key = (options.rpc.tracker, options.rpc.key) if options.rpc else (None, None)
    device = check_tunable(profile, tracker, key)  # a wrong --rpc fails before the export
    options.display(profile, device)
    cache_key = key if device is not None else None
    if options.buckets:
        parse_buckets(options.buckets)  # a bad string fails before the export
    work = scratch_dir("tvmdeploy-tune")
    try:
        work_dir = Path(work)
        logger.info("export + import …")
        exported = export.export_model(
            options.model, work_dir / "onnx", task=options.task, opset=options.opset
        )
        max_positions = max_positions_of(exported.onnx_path, exported.config)
        buckets = parse_buckets(options.buckets or default_buckets(max_positions))
        imported = importer.import_onnx(
            exported.onnx_path, buckets, max_positions, source=exported.source
        )
        result = tune(
            imported.mod,
            profile,
            options.trials,
            work_dir / "tuning",
            minutes=options.minutes,
            progress=options.progress,
            rpc=tracker,
            rpc_key=key,
        )
        if options.export_dir:
            store = RecordStore(cache_path(profile, cache_key))
            picked = [pick(task, {"cache": store}, {}) for task in result.tasks]
            chosen = [record for _, record in filter(None, picked)]
            rules = {
                r.key: store.rule_based_entry(r.key)
                for r in chosen
                if store.rule_based_entry(r.key)
            }
            write_database(Path(options.export_dir), chosen, rules, merge=True)
            _append_meta(Path(options.export_dir), options, profile, result, len(chosen))
            logger.info("exported %d record(s) to %s", len(chosen), options.export_dir)
        result.files = []  # they lived in the temporary directory
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _append_meta(
    dest: Path, options: TuneOptions, profile: Profile, result: TuneResult, exported: int
) -> None:
    """`meta.json` beside exported records: which run produced them, on what, in how long."""
    meta = read_meta(dest, profile.name)
    measured_on = result.summary.get("measured_on", {})
    if measured_on.get("where") == "rpc":  # no CPU model over RPC: the device as RPC describes it
        cpu, cores = measured_on.get("description"), measured_on.get("cores")
    else:
        cpu, cores = probe().cpu_model, num_cores()
    meta["runs"].append(
        {
            "model": Path(options.model).name,
            "buckets": options.buckets,
            "records": exported,
            "trials": result.summary.get("trials"),
            "new_trials": result.summary.get("new_trials"),
            "minutes": round(result.summary.get("seconds", 0) / 60, 1),
            "cpu": cpu,
            "cores": cores,
            "measured_on": measured_on.get("where", "local"),
            "tvm": tvm.__version__,
            "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
    )
    meta["trials"] = sum(run.get("trials") or 0 for run in meta["runs"])
    meta["minutes"] = round(sum(run.get("minutes") or 0 for run in meta["runs"]), 1)
    write_json_atomic(dest / META_FILE, meta, sort_keys=True)
