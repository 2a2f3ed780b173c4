"""Re-check a set of tuning records on this machine, each against its kernel's rule-based schedule.

A record is kept at tuning time only where it beat the rule-based schedule on the machine that
tuned it. A shipped set serves a whole ISA profile, though, and records tuned on one
microarchitecture lost on another: x86-64-v3 records tuned on an Intel Xeon made the demo MiniLM
up to 10% slower on an AMD Zen 5, and the Zen 5 set did the same on the Intel (docs/benchmarks.md).
This times both schedules of every workload in a set here, cold (`cold_evaluator_config`, as
tuning times them) and alternately; `prune` keeps only the records that win here too, and
`meta.json` lists the machines that checked the set and what each dropped.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvmdeploy.runtime.atomic import write_json_atomic
from tvmdeploy.runtime.probe import probe
from tvmdeploy.targets import Profile

from ..build import tvm_target
from ..errors import TuningError
from ..kernels.tensor_intrin import import_tensor_intrinsics
from .records import META_FILE, RecordStore, read_meta, write_database
from .search import TuneSettings, check_tunable, rule_based_mod
from .workers import Workers, num_cores

logger = logging.getLogger(__name__)

#: A record is kept only if the rule-based schedule takes at least this much longer here:
#: cold single-kernel times move by a few percent from one measurement to the next.
MIN_GAIN = 1.02


@dataclass
class RecordCheck:
    """One workload's record against its rule-based schedule, both timed on this machine."""

    key: str
    task: str
    record_ms: float | None  # the best of the rounds' best cold runs; None if it failed here
    rule_based_ms: float | None
    tuned_on_gain: float | None  # rule-based / record time where the record was tuned

    @property
    def gain(self) -> float | None:
        """Rule-based time / record time here (above 1: the record is faster)."""
        if not self.record_ms or not self.rule_based_ms:
            return None
        return self.rule_based_ms / self.record_ms

    def keep(self, min_gain: float = MIN_GAIN) -> bool:
        return self.gain is not None and self.gain >= min_gain


def _scheduled(store: RecordStore, key: str, target) -> tuple[str, object | None, object]:
    """(task name, the record's scheduled module, the rule-based one) of one workload; the
    record's module is None where its trace does not replay (a record of another TVM)."""
    best = store.best(key)[0]
    name = (store.rule_based_entry(key) or {}).get("task") or key
    workload = ms.database.Workload.from_json(best.workload_json)
    rule_based = rule_based_mod(workload.mod, target)
    try:
        record = ms.database.TuningRecord.from_json(best.record_json, workload)
        sch = tvm.s_tir.Schedule(workload.mod)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception as err:  # noqa: BLE001 - the record is then dropped, not the whole check
        logger.warning("%s: its record does not replay (%s)", name, str(err).splitlines()[0])
        return name, None, rule_based
    return name, sch.mod, rule_based


def recheck(
    path: Path,
    profile: Profile,
    rounds: int = 3,
    settings: TuneSettings | None = None,
    display: Callable[[str], None] = logger.info,
) -> list[RecordCheck]:
    """Time every record of the set in `path` and its kernel's rule-based schedule on this
    machine, `rounds` times each, alternately; the best round is reported (other load on the
    machine only ever adds time)."""
    check_tunable(profile)
    store = RecordStore(path)
    keys = sorted(store.workload_keys())
    if not keys:
        raise TuningError(
            f"{path}: no tuning records to check; give a directory holding "
            "database_workload.json and database_tuning_record.json (`tvmdeploy tune --export "
            "DIR` writes one), or leave it out to check the profile's shipped set"
        )
    settings = settings or TuneSettings()
    import_tensor_intrinsics(profile.family)
    target = tvm_target(profile, num_cores=num_cores())
    checks = []
    workers = Workers(max(1, num_cores()), settings.build_timeout, settings.run_timeout)
    try:
        for index, key in enumerate(keys, 1):
            name, record_mod, rule_mod = _scheduled(store, key, target)
            display(f"[{index}/{len(keys)}] {name}")
            args = [a.as_json() for a in ArgInfo.from_entry_func(rule_mod, remove_preproc=True)]
            times: dict[str, list[float]] = {"record": [], "rule-based": []}
            runs = [("record", record_mod), ("rule-based", rule_mod)] * rounds
            runs = [(which, mod) for which, mod in runs if mod is not None]
            built = workers.build([mod for _, mod in runs], target)
            for (which, _), (artifact, error) in zip(runs, built, strict=True):
                if artifact:
                    secs, error = workers.measure(artifact, args, settings.repeat)
                    if secs:
                        times[which].append(secs[0] * 1e3)
                        continue
                logger.warning("%s (%s): %s", name, which, error)
            rule_secs, best = store.rule_based_secs(key), store.best(key)[0]
            checks.append(
                RecordCheck(
                    key,
                    name,
                    min(times["record"]) if len(times["record"]) == rounds else None,
                    min(times["rule-based"]) if len(times["rule-based"]) == rounds else None,
                    rule_secs / best.secs if rule_secs else None,
                )
            )
    finally:
        workers.close()
    return checks


def _rounded(check: dict) -> dict:
    """A check as meta.json keeps it: gains and times to 4 significant digits (a gain of a
    thousandth still reads as one)."""
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in check.items()}


def prune(
    path: Path, profile: Profile, checks: list[RecordCheck], min_gain: float = MIN_GAIN
) -> int:
    """Rewrite the set in `path` with only the records that won here, and note the check in its
    `meta.json` (this machine, the gains, what was dropped). Returns the records dropped."""
    store = RecordStore(path)
    kept = [c for c in checks if c.keep(min_gain)]
    chosen = [store.best(c.key)[0] for c in kept]
    rules = {c.key: store.rule_based_entry(c.key) for c in kept if store.rule_based_entry(c.key)}
    write_database(path, chosen, rules)
    meta = read_meta(path, profile.name)
    meta.setdefault("checks", []).append(
        {
            "cpu": probe().cpu_model,
            "cores": num_cores(),
            "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "min_gain": min_gain,
            "kept": len(kept),
            "dropped": len(checks) - len(kept),
            "kernels": [_rounded({**asdict(c), "gain": c.gain}) for c in checks],
        }
    )
    write_json_atomic(path / META_FILE, meta, sort_keys=True)
    return len(checks) - len(kept)
