"""The tuner: MetaSchedule for a CPU profile that is cheap, resumable, cached and reused.

One concern per module (docs/design.md): `records` (the store), `tasks` (which kernels, how much
of each bucket's time), `workers` (build pool and measuring worker, local or RPC), `search` (the
loop), `lookup` (zero-trial application for `compile`), `progress` (status events and displays).

Tuning never changes what a model computes: records only choose schedules, and every artifact is
still verified against ONNX Runtime by the verify stage.
"""

from ..kernels.tensor_intrin import import_tensor_intrinsics
from .lookup import TuneResult, describe, lookup, pick
from .progress import LoggingProgress, RichTuneProgress, TuneStatus, task_table
from .records import (
    ERROR_SECS,
    RECORD_FILE,
    RULE_BASED_FILE,
    SHIPPED_DIR,
    WORKLOAD_FILE,
    RecordStore,
    StoredRecord,
    cache_path,
    cache_root,
    rpc_dir_name,
    shipped_path,
    write_database,
)
from .search import TuneSettings, check_tunable, measure_rule_based, tune
from .tasks import (
    Task,
    extract_tasks,
    fused_module,
    select_tasks,
    workload_key,
)
from .workers import RpcMeasure, Workers, cold_evaluator_config, measure_rpc, num_cores

__all__ = [
    "ERROR_SECS",
    "RECORD_FILE",
    "RULE_BASED_FILE",
    "SHIPPED_DIR",
    "WORKLOAD_FILE",
    "LoggingProgress",
    "RecordStore",
    "RichTuneProgress",
    "RpcMeasure",
    "StoredRecord",
    "Task",
    "TuneResult",
    "TuneSettings",
    "TuneStatus",
    "Workers",
    "cache_path",
    "cache_root",
    "check_tunable",
    "cold_evaluator_config",
    "describe",
    "extract_tasks",
    "fused_module",
    "import_tensor_intrinsics",
    "lookup",
    "measure_rpc",
    "measure_rule_based",
    "num_cores",
    "pick",
    "rpc_dir_name",
    "select_tasks",
    "shipped_path",
    "task_table",
    "tune",
    "workload_key",
    "write_database",
]
