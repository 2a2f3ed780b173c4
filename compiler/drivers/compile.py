"""The compile driver: export → import → (tune) → build → verify → package, in that order.

The CLI parses arguments into `CompileOptions` and calls `compile_model`; a script can do the same.
Each stage lives in its own module; this one only orders them and reports progress through
`logging` (the CLI shows those lines on stderr, with timings).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import onnx
from tvmdeploy.runtime.precision import DEFAULT_ACCURACY_GATE, artifact_name, canonical, short
from tvmdeploy.targets import Profile
from tvmdeploy.targets.resolve import resolve_profiles

from .. import build, evaluate, package, tuning, verify
from ..errors import (
    ModelLoadError,
    OptionError,
    ParityError,
    StageError,
    TuningError,
    TvmdeployError,
)
from ..frontend import export, importer
from ..kernels.cpu_int8 import kernel_for
from ..options import RpcTarget, default_buckets, parse_buckets
from ..quantize import quantize_int8, to_bfloat16, to_float16

logger = logging.getLogger(__name__)


@dataclass
class CompileOptions:
    """Everything `tvmdeploy compile` takes; `display()` says what will happen."""

    model: str
    output: str
    profiles: list[str] = field(
        default_factory=lambda: ["host"]
    )  # profile names; 'host' = this machine
    task: str | None = None
    buckets: str | None = None  # None: derived from the model (options.default_buckets)
    opset: int | None = None
    tune_trials: int = 0
    verify: bool = True
    strict_parity: bool = True
    name: str | None = None
    # A remote device: artifacts of its arch are verified there, and built with the tuning records
    # measured there (tuned there with tune_trials).
    rpc: RpcTarget | None = None
    # One artifact per (profile, precision): "fp32", "int8" (runtime/precision.py).
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    # Labelled examples (JSONL/CSV file, or LabelledText objects) to measure each artifact's task
    # accuracy against fp32; `auto` takes a reduced precision only within `accuracy_gate` points.
    eval_data: str | list | None = None
    accuracy_gate: float = DEFAULT_ACCURACY_GATE

    def display(self, profiles: list[Profile]) -> None:
        """Say what will happen, before it happens."""
        tuning_text = (
            f"{self.tune_trials} trials per profile"
            if self.tune_trials
            else "no new trials (tuning records from the shipped set or the cache where they exist)"
        )
        lines = [
            f"tvmdeploy compile {self.model} → {self.output}",
            f"  profiles: {', '.join(p.name for p in profiles)}",
            f"  precision: {', '.join(self.precisions)}",
            f"  buckets : {self.buckets or 'from the model (up to its longest sequence, <= 512)'}",
            f"  task    : {self.task or 'inferred from config'}",
            f"  tuning  : {tuning_text}",
        ]
        if self.rpc:
            lines.append(
                f"  verify  : artifacts of the remote's arch on RPC key {self.rpc.key!r} "
                f"(tracker {self.rpc.tracker}), built with the records measured there"
            )
        if self.eval_data is not None:
            where = self.eval_data if isinstance(self.eval_data, str) else "examples given"
            lines.append(
                f"  accuracy: measured on {where}; gate {self.accuracy_gate:g} points vs fp32"
            )
        for line in lines:
            logger.info(line)


#: What to try when a stage fails inside TVM, ONNX or optimum (not with a tvmdeploy error).
STAGE_HINTS = {
    "export": "check that the model loads with transformers, or pass an exported .onnx file",
    "import": "the ONNX graph uses something TVM's importer cannot take: try another --opset, "
    "or simplify the graph (e.g. onnxslim) and compile the .onnx file",
    "reference": "ONNX Runtime could not run the exported graph: check it with onnxruntime",
    "tune": "compile without --tune (the rule-based schedules need no tuning)",
    "build": "compile for another profile (-t), or without --tune; run with -v and report the "
    "traceback",
    "verify": "run with -v for the traceback; --no-verify skips the check (not recommended)",
    "package": "check the output path and free disk space",
}


class Stages:
    """Numbered stage lines with timings, through `logging`."""

    def __init__(self, total: int):
        self.total, self.index = total, 0

    def __call__(self, title: str) -> _Stage:
        self.index += 1
        return _Stage(f"[{self.index}/{self.total}] {title}")


class _Stage:
    """One stage: logs its start and end; an unexpected error inside it (TVM's, ONNX's) becomes
    a StageError naming the stage, with one line on what to try (traceback kept as the cause)."""

    def __init__(self, title: str):
        self.title = title
        self.name = title.split("] ", 1)[-1].split(" ", 1)[0]

    def __enter__(self) -> Self:
        self.start = time.perf_counter()
        logger.info("%s …", self.title)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        took = time.perf_counter() - self.start
        logger.info("%s %s in %.1f s", self.title, "done" if exc_type is None else "failed", took)
        if exc is not None and isinstance(exc, Exception) and not isinstance(exc, TvmdeployError):
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise StageError(
                f"{self.name} failed ({type(exc).__name__}: {first[:300]}); "
                f"{STAGE_HINTS.get(self.name, 'run with -v for the traceback')}. "
                "Nothing was written."
            ) from exc


def graph_vocab_sizes(onnx_path: Path) -> dict[str, int]:
    """Rows of the embedding tables that gather `input_ids` / `token_type_ids` (the id range)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    sizes = {}
    for node in model.graph.node:
        ids = node.input[1] if node.op_type == "Gather" and len(node.input) == 2 else None
        if ids in ("input_ids", "token_type_ids") and node.input[0] in shapes:
            sizes[ids] = shapes[node.input[0]][0]
    return sizes


def max_positions_of(exported: export.ExportResult) -> int | None:
    """The longest sequence the model takes: its position table's rows (config.json's
    `max_position_embeddings`, else the rows of the graph's `*position*embed*` initializer),
    less the rows RoBERTa-style models (positions counted from the padding id with CumSum, so
    starting at pad_token_id + 1) never reach: a longer input would read past the table."""
    model = onnx.load(str(exported.onnx_path), load_external_data=False)
    rows = exported.config.get("max_position_embeddings")
    if not rows:
        tables = [
            i
            for i in model.graph.initializer
            if len(i.dims) == 2 and "position" in i.name.lower() and "embed" in i.name.lower()
        ]
        rows = int(tables[0].dims[0]) if len(tables) == 1 else None
    if not rows:
        return None
    offset = 0
    if any(n.op_type == "CumSum" for n in model.graph.node):
        pad = exported.config.get("pad_token_id")
        offset = (1 if pad is None else int(pad)) + 1
    return int(rows) - offset if rows > offset else None


def model_info(
    exported: export.ExportResult, imported: importer.ImportedModel, name: str
) -> dict[str, Any]:
    config = exported.config
    sizes = graph_vocab_sizes(exported.onnx_path)
    vocab = sizes.get("input_ids") or config.get("vocab_size")
    if not vocab:
        raise ModelLoadError(
            "cannot tell the vocabulary size (no embedding Gather, no config.json)"
        )
    return {
        "name": name,
        "source": exported.source,
        "task": exported.task,
        "model_type": config.get("model_type"),
        "vocab_size": int(vocab),
        "type_vocab_size": int(sizes.get("token_type_ids") or config.get("type_vocab_size") or 1),
        "pad_token_id": int(config.get("pad_token_id") or 0),
        "max_position_embeddings": max_positions_of(exported),
        "id2label": config.get("id2label", {}),
        "fallback": (
            {"function": imported.fallback.function, "batch": 1, "max_seq": imported.fallback.seq}
            if imported.fallback
            else None
        ),
        "inputs": imported.inputs,
        "outputs": imported.outputs,
    }


NO_TUNING = {"trials": 0, "source": "none (rule-based default schedules)"}


def artifact_pairs(profiles: list[Profile], precisions: list[str]) -> dict[str, list[str]]:
    """{profile: [dtype, ...]}: the artifacts to build. A precision a profile has no kernels for
    is left out with a warning; one no profile can build is an OptionError (before any work)."""
    dtypes = list(dict.fromkeys(canonical(p) for p in precisions))
    pairs: dict[str, list[str]] = {}
    for profile in profiles:
        pairs[profile.name] = []
        for dtype in dtypes:
            if dtype == "int8" and kernel_for(profile) is None:
                logger.warning("no int8 kernels for %s: no int8 artifact for it", profile.name)
                continue
            if dtype == "bfloat16" and "bf16" not in profile.precisions:
                logger.warning(
                    "no bf16 kernels for %s (they need AVX512-BF16: x86-64-v4, x86-avx512-vnni): "
                    "no bf16 artifact for it",
                    profile.name,
                )
                continue
            if dtype == "float16" and not profile.is_gpu:
                logger.warning("fp16 is for CUDA profiles: no fp16 artifact for %s", profile.name)
                continue
            pairs[profile.name].append(dtype)
    for dtype in dtypes:
        if not any(dtype in v for v in pairs.values()):
            raise OptionError(
                f"no profile among {', '.join(pairs)} has {short(dtype)} kernels "
                "(int8: the x86 and ARM CPU profiles; bf16: the AVX-512 x86 profiles; "
                "fp16: the CUDA profiles)"
            )
    return pairs


def _evaluator(examples, stages: Stages):
    def run(staging: Path) -> dict:
        with stages(f"accuracy on {len(examples)} labelled examples vs fp32"):
            records = evaluate.accuracy_records(staging, examples)
        for name, record in records.items():
            logger.info(
                "  %s: accuracy %.2f%% (fp32 %.2f%%), agrees with fp32 on %.2f%%",
                name,
                record["value"],
                record["fp32"],
                record["agreement"],
            )
        return records

    return run


def _build(mod, profile: Profile, out_dir: Path, database, dtype: str, imported):
    """Build the artifact with the symbolic-length fallback function where it builds for this
    profile; else without it (with a warning): (BuildResult, whether it has the fallback)."""
    if imported.fallback is None:
        return build.build_artifact(mod, profile, out_dir, database, dtype), False
    try:
        return build.build_artifact(mod, profile, out_dir, database, dtype), True
    except TvmdeployError:
        raise
    except Exception as err:  # noqa: BLE001 - TVM's; the buckets alone may still build
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        logger.warning(
            "  %s: the symbolic-length fallback does not build (%s); built without it",
            profile.name,
            first,
        )
    mod = importer.without_fallback(mod)
    return build.build_artifact(mod, profile, out_dir, database, dtype), False


def compile_model(options: CompileOptions) -> Path:
    """Run the pipeline; returns the bundle path. Raises ParityError if an artifact is wrong."""
    profiles = resolve_profiles(options.profiles)
    options.display(profiles)
    rpc = options.rpc
    remote_device = None
    if rpc:  # asked before the export: a wrong --rpc fails in seconds
        from tvmdeploy.runtime import remote

        remote_device = remote.probe_remote(rpc.tracker, rpc.key)

    def on_remote(profile: Profile) -> bool:
        """Whether the profile's artifact is for the remote: verified, tuned and looked up there."""
        return (
            remote_device is not None
            and not profile.is_gpu
            and profile.requires.get("arch") == remote_device.arch
        )

    if options.buckets:
        parse_buckets(options.buckets)  # a bad string fails before the export
    tunable = []
    if options.tune_trials:
        for profile in profiles:
            try:
                if on_remote(profile):
                    tuning.check_tunable(profile, rpc.tracker, rpc.key)
                else:
                    tuning.check_tunable(profile)
                tunable.append(profile)
            except TuningError as why:
                logger.warning("not tuning %s", why)
    pairs = artifact_pairs(profiles, options.precisions)
    count = sum(len(v) for v in pairs.values())
    stages = Stages(
        4 + count + len(tunable) + bool(options.verify) * count + (options.eval_data is not None)
    )
    with tempfile.TemporaryDirectory(prefix="tvmdeploy-") as work:
        work_dir = Path(work)
        with stages("export (optimum, onnx checker, parity vs PyTorch)"):
            exported = export.export_model(
                options.model, work_dir / "onnx", task=options.task, opset=options.opset
            )
        max_positions = max_positions_of(exported)
        buckets = parse_buckets(options.buckets or default_buckets(max_positions))
        if not options.buckets:
            logger.info("  buckets from the model: %s", default_buckets(max_positions))
        if exported.parity:
            p = exported.parity
            logger.info(
                "  ONNX Runtime vs PyTorch: max abs diff %.2e (tolerance %.0e)",
                p["max_abs_diff"],
                p["tolerance"],
            )
        with stages(f"import to Relax ({len(buckets)} shape buckets)"):
            imported = importer.import_onnx(
                exported.onnx_path, buckets, max_positions, source=exported.source, fallback=True
            )
        building_int8 = any("int8" in dtypes for dtypes in pairs.values())
        if imported.source_precision == "int8" and not building_int8:
            logger.warning(
                "  this ONNX file is quantized: its int8 weights run as fp32 here; add "
                "--precision fp32,int8 for tvmdeploy's int8 kernels (and --eval-data so that "
                "load() takes them by default)"
            )
        with stages("reference outputs from ONNX Runtime"):
            cases = (
                verify.reference_cases(exported.onnx_path, imported, exported.config)
                if options.verify
                else []
            )

        examples = None
        if options.eval_data is not None:
            examples = (
                evaluate.read_examples(options.eval_data, exported.config.get("id2label") or {})
                if isinstance(options.eval_data, str)
                else list(options.eval_data)
            )
        entries: list[package.ArtifactEntry] = []
        for profile in profiles:
            tuned = None
            tuning_dir = work_dir / "tuning" / profile.name
            profile_rpc = rpc if on_remote(profile) else None
            rpc_key = profile_rpc.key if profile_rpc else None
            if profile in tunable:
                where = f" on RPC key {rpc_key!r}" if rpc_key else ""
                cache = tuning.cache_path(profile, rpc_key)
                with stages(
                    f"tune {profile.name} ({options.tune_trials} trials{where}, cache {cache})"
                ):
                    tuned = tuning.tune(
                        importer.without_fallback(imported.mod),
                        profile,
                        options.tune_trials,
                        tuning_dir,
                        rpc=profile_rpc.tracker if profile_rpc else None,
                        rpc_key=rpc_key,
                    )
            for dtype in pairs[profile.name]:
                name = artifact_name(profile.name, dtype)
                built_for = profile.for_precision(short(dtype))  # bf16 adds AVX512-BF16
                with stages(f"build {name}"):
                    mod = imported.mod
                    if dtype == "int8":
                        kernel = kernel_for(profile)
                        mod, count = quantize_int8(mod, kernel)
                        logger.info("  int8: %d matmuls on the %s kernel", count, kernel.name)
                    elif dtype == "bfloat16":
                        mod, count = to_bfloat16(mod)
                        logger.info("  bf16: %d matmuls on the avx512-bf16 kernel", count)
                    elif dtype == "float16":
                        mod = to_float16(mod)
                    found = tuned
                    if found is None or dtype != "float32":  # shipped/cached records, no trials
                        found = tuning.lookup(
                            importer.without_fallback(mod),
                            built_for,
                            tuning_dir / dtype,
                            rpc_key=rpc_key,
                        )
                    database, tuning_summary, tuning_files = None, NO_TUNING, []
                    if found is not None:
                        database, tuning_summary, tuning_files = (
                            found.database,
                            found.summary,
                            found.files,
                        )
                    built, has_fallback = _build(
                        mod, built_for, work_dir / "artifacts" / name, database, dtype, imported
                    )
                checked = cases if has_fallback else verify.without_fallback_case(cases)
                parity, latency = {"where": "not-run", "detail": "verification disabled"}, []
                if options.verify:
                    via = " via RPC" if profile_rpc else ""
                    with stages(f"verify {name} against ONNX Runtime{via}"):
                        if profile_rpc:
                            record = verify.verify_rpc(
                                built, imported, checked, profile_rpc.tracker, profile_rpc.key
                            )
                            latency = []
                        else:
                            record, latency = verify.verify(built, imported, checked)
                    parity = record.to_dict()
                    logger.info("  parity %s: %s", name, record.summary())
                    if record.ok is False and options.strict_parity:
                        raise ParityError(
                            f"{name}: verification against ONNX Runtime failed: "
                            f"{record.summary()} "
                            f"(tolerance {record.tolerance}); no bundle written"
                        )
                entries.append(
                    package.ArtifactEntry(
                        profile=profile.name,
                        family=profile.family,
                        target=built.target,
                        requires=built_for.requires,
                        lib_path=built.lib_path,
                        precision=dtype,
                        code_form=built.code_form,
                        tuning=tuning_summary,
                        parity=parity,
                        latency=latency,
                        tuning_files=tuning_files,
                        fallback=has_fallback,
                    )
                )

        with stages("package bundle"):
            name = options.name or Path(options.model).stem
            out = package.write_bundle(
                options.output,
                exported.onnx_path,
                {
                    "float32": (
                        imported.param_names,
                        package.weights_blob(imported.param_names, imported.params),
                    )
                },
                entries,
                model_info(exported, imported, name),
                [{"function": b.function, "batch": b.batch, "seq": b.seq} for b in buckets],
                exported.tokenizer_dir,
                exported.parity,
                accuracy_gate=options.accuracy_gate,
                evaluate=_evaluator(examples, stages) if examples else None,
            )
    logger.info("bundle written: %s", out)
    return out
