"""The record store: MetaSchedule's JSON database format, read by numbers and appended as measured.

Records live in three places (docs/design.md): the per-profile cache (`$TVMDEPLOY_CACHE_DIR` or
`~/.cache/tvmdeploy`, under `tuning/<profile>/`, records measured on a remote device under
`tuning/<profile>/rpc-<key>/`), the records shipped with the package
(`compiler/tuning_records/<profile>/`), and each bundle (`tuning/<profile>/`, only the records its
artifact was built from). `rule_based.json` beside them holds the measured time of the rule-based
schedule per workload.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import json
import logging
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvmdeploy.runtime.atomic import write_json_atomic, write_text_atomic
from tvmdeploy.runtime.paths import cache_dir
from tvmdeploy.targets import Profile

from ..errors import TuningError

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
RULE_BASED_FILE = "rule_based.json"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "tuning_records"
logger = logging.getLogger(__name__)

#: Run time MetaSchedule's own callbacks write for a candidate that failed to build or run.
ERROR_SECS = 1e10


def cache_root() -> Path:
    """`$TVMDEPLOY_CACHE_DIR/tuning` (default `~/.cache/tvmdeploy/tuning`)."""
    return cache_dir() / "tuning"


def rpc_dir_name(rpc_key: str) -> str:
    """`rpc-<key>`, with anything but letters, digits, '.', '_' and '-' in the key made '_'."""
    return "rpc-" + (re.sub(r"[^A-Za-z0-9._-]", "_", rpc_key).lstrip(".") or "_")


def cache_path(profile: Profile | str, rpc_key: str | None = None) -> Path:
    """The per-profile tuning cache directory; with `rpc_key`, the one for records measured on
    the remote device behind that RPC key (`<profile>/rpc-<key>/`)."""
    path = cache_root() / (profile if isinstance(profile, str) else profile.name)
    return path / rpc_dir_name(rpc_key) if rpc_key else path


def shipped_path(profile: Profile | str) -> Path:
    """The records shipped inside the package for a profile (may not exist). A profile whose
    fp32 code is another's (the same `mcpu`; its extra features serve only its int8 kernels,
    which are never tuned) names that one in `[tuning] records` and reads its records."""
    name = profile if isinstance(profile, str) else profile.tuning.get("records", profile.name)
    return SHIPPED_DIR / name


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
        run_secs = (
            record_json[1] if isinstance(record_json, list) and len(record_json) > 1 else None
        )
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
        write_json_atomic(self.path / RULE_BASED_FILE, self._rule_based, sort_keys=True)


META_FILE = "meta.json"


def read_meta(dest: Path, profile_name: str) -> dict[str, Any]:
    """A record set's `meta.json` (which runs made it, which machines checked it), or a fresh one
    for `profile_name` where there is none yet or it does not parse."""
    try:
        return json.loads((Path(dest) / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {"profile": profile_name, "runs": []}


def compact_workload(workload_json: Any) -> Any:
    """The same workload JSON with its IR re-serialized without indentation (about half the size;
    TVM's JSONDatabase reads both: base64 of an 8-byte length and the IR's JSON graph)."""
    try:
        key, encoded = workload_json
        raw = base64.b64decode(encoded)
        (length,) = struct.unpack("<Q", raw[:8])
        graph = json.loads(raw[8 : 8 + length])
        text = json.dumps(graph, separators=(",", ":")).encode()
        return [key, base64.b64encode(struct.pack("<Q", len(text)) + text).decode()]
    except (ValueError, TypeError, struct.error, json.JSONDecodeError):
        return workload_json


def write_database(
    dest: Path, chosen: list[StoredRecord], rule_based: dict[str, Any], merge: bool = False
) -> list[Path]:
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
    for path, lines in zip(files, (workload_lines, record_lines), strict=True):
        write_text_atomic(path, "".join(line + "\n" for line in lines))
    rules = {k: v for k, v in rules.items() if k in records}
    write_json_atomic(dest / RULE_BASED_FILE, rules, sort_keys=True)
    return [*files, dest / RULE_BASED_FILE]
