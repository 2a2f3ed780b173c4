"""The compile driver: export → import → (tune) → build → verify → package, in that order.

The CLI parses arguments into `CompileOptions` and calls `compile_model`; a script can do the same.
Each stage lives in its own module; this one only orders them and reports progress through
`logging` (the CLI shows those lines on stderr, with timings). `compile_model` reads as the list
of steps it runs; each step is a function below, in the order it runs.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvmdeploy.runtime.precision import DEFAULT_ACCURACY_GATE, artifact_name, canonical, short
from tvmdeploy.targets import Profile
from tvmdeploy.targets.resolve import resolve_profiles

from .. import build, evaluate, package, tuning, verify
from ..errors import OptionError, ParityError, TuningError, TvmdeployError
from ..frontend import export, importer, model_facts
from ..kernels.cpu_int8 import kernel_for
from ..options import RpcTarget, default_buckets, parse_buckets
from ..quantize import quantize_int8, to_bfloat16, to_float16
from .stages import Stages

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
    # Facts the graph may not show (a bare ONNX file without config.json): given, they win.
    vocab_size: int | None = None
    type_vocab_size: int | None = None
    max_positions: int | None = None
    # Causal LMs (drivers/compile_decoder.py): the base model folder of a LoRA adapter, and the
    # context (prompt + completion tokens) the bundle serves.
    base: str | None = None
    context: int | None = None
    # Generation bundles: carry the model's ONNX export (the ONNX Runtime engine and reference).
    onnx: bool = True

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


NO_TUNING = {"trials": 0, "source": "none (rule-based default schedules)"}


def artifact_pairs(profiles: list[Profile], precisions: list[str]) -> dict[str, list[str]]:
    """{profile: [dtype, ...]}: the artifacts to build. A precision a profile has no kernels for
    is left out with a warning; one no profile can build is an OptionError (before any work)."""
    dtypes = list(dict.fromkeys(canonical(p) for p in precisions))
    pairs: dict[str, list[str]] = {}
    for profile in profiles:
        pairs[profile.name] = []
        for dtype in dtypes:
            if dtype == "int4":
                logger.warning(
                    "int4 is for causal LMs (generation bundles): none for %s", profile.name
                )
                continue
            if dtype == "int8" and kernel_for(profile) is None:
                logger.warning("no int8 kernels for %s: no int8 artifact for it", profile.name)
                continue
            if dtype == "bfloat16" and "bf16" not in profile.precisions:
                logger.warning(
                    "no bf16 kernels for %s (x86-64-v4, x86-avx512-vnni and x86-amx have them): "
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
                "fp16: the CUDA profiles; int4: causal LMs only)"
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


def model_info(
    exported: export.ExportResult,
    imported: importer.ImportedModel,
    facts: model_facts.ModelFacts,
    name: str,
) -> dict[str, Any]:
    """The manifest's `model` section: what the runtime validates inputs and predicts with."""
    config = exported.config
    return {
        "name": name,
        "source": exported.source,
        "task": exported.task,
        "model_type": config.get("model_type"),
        "vocab_size": facts.vocab_size,
        "type_vocab_size": facts.type_vocab_size,
        "pad_token_id": int(config.get("pad_token_id") or 0),
        "max_position_embeddings": facts.max_positions,
        "id2label": config.get("id2label", {}),
        "fallback": (
            {"function": imported.fallback.function, "batch": 1, "max_seq": imported.fallback.seq}
            if imported.fallback
            else None
        ),
        "inputs": imported.inputs,
        "outputs": imported.outputs,
    }


@dataclass
class Plan:
    """What the run will build, decided before any work: a wrong option fails in seconds."""

    profiles: list[Profile]
    pairs: dict[str, list[str]]  # {profile: [dtype, ...]}
    tunable: list[Profile]
    remote_device: Any  # the RPC device's probe, or None
    stages: Stages

    def on_remote(self, profile: Profile) -> bool:
        """Whether the profile's artifact is for the remote: verified, tuned and looked up there."""
        device = self.remote_device
        return (
            device is not None
            and not profile.is_gpu
            and profile.requires.get("arch") == device.arch
        )


@dataclass
class Imported:
    """The model as the stages take it: exported, its facts read, imported per bucket."""

    exported: export.ExportResult
    facts: model_facts.ModelFacts
    buckets: list
    imported: importer.ImportedModel


def plan_compile(options: CompileOptions) -> Plan:
    """Profiles, the RPC device, what can be tuned and which artifacts to build."""
    profiles = resolve_profiles(options.profiles)
    options.display(profiles)
    remote_device = None
    if options.rpc:  # asked before the export: a wrong --rpc fails in seconds
        from tvmdeploy.runtime import remote

        remote_device = remote.probe_remote(options.rpc.tracker, options.rpc.key)
    if options.buckets:
        parse_buckets(options.buckets)  # a bad string fails before the export
    pairs = artifact_pairs(profiles, options.precisions)
    plan = Plan(profiles, pairs, [], remote_device, Stages(0))
    plan.tunable = tunable_profiles(options, plan)
    count = sum(len(v) for v in pairs.values())
    plan.stages = Stages(
        4
        + count
        + len(plan.tunable)
        + bool(options.verify) * count
        + (options.eval_data is not None)
    )
    return plan


def tunable_profiles(options: CompileOptions, plan: Plan) -> list[Profile]:
    """The profiles `--tune` can tune here (or on the RPC device); the rest get a warning."""
    if not options.tune_trials:
        return []
    rpc, tunable = options.rpc, []
    for profile in plan.profiles:
        try:
            if plan.on_remote(profile):
                tuning.check_tunable(profile, rpc.tracker, rpc.key)
            else:
                tuning.check_tunable(profile)
            tunable.append(profile)
        except TuningError as why:
            logger.warning("not tuning %s", why)
    return tunable


def export_and_import(options: CompileOptions, plan: Plan, work_dir: Path) -> Imported:
    """Stages 1–2: export (with parity vs PyTorch), the model's facts, import per bucket."""
    stages = plan.stages
    with stages("export (optimum, onnx checker, parity vs PyTorch)"):
        exported = export.export_model(
            options.model, work_dir / "onnx", task=options.task, opset=options.opset
        )
    if exported.parity:
        p = exported.parity
        logger.info(
            "  ONNX Runtime vs PyTorch: max abs diff %.2e (tolerance %.0e)",
            p["max_abs_diff"],
            p["tolerance"],
        )
    facts = model_facts.read_facts(
        exported.onnx_path,
        exported.config,
        vocab_size=options.vocab_size,
        type_vocab_size=options.type_vocab_size,
        max_positions=options.max_positions,
    )
    logger.info("  model: %s", facts.describe())
    # The stages after this one read the facts from the config (verification's token ids).
    exported.config.setdefault("vocab_size", facts.vocab_size)
    buckets = parse_buckets(options.buckets or default_buckets(facts.max_positions))
    if not options.buckets:
        logger.info("  buckets from the model: %s", default_buckets(facts.max_positions))
    with stages(f"import to Relax ({len(buckets)} shape buckets)"):
        imported = importer.import_onnx(
            exported.onnx_path, buckets, facts.max_positions, source=exported.source, fallback=True
        )
    building_int8 = any("int8" in dtypes for dtypes in plan.pairs.values())
    if imported.source_precision == "int8" and not building_int8:
        logger.warning(
            "  this ONNX file is quantized: its int8 weights run as fp32 here; add "
            "--precision fp32,int8 for tvmdeploy's int8 kernels (and --eval-data so that "
            "load() takes them by default)"
        )
    return Imported(exported, facts, buckets, imported)


def reference_cases(options: CompileOptions, plan: Plan, model: Imported) -> list:
    """ONNX Runtime's outputs on the exported graph, what every artifact is verified against."""
    with plan.stages("reference outputs from ONNX Runtime"):
        if not options.verify:
            return []
        return verify.reference_cases(
            model.exported.onnx_path, model.imported, model.exported.config
        )


def eval_examples(options: CompileOptions, model: Imported) -> list | None:
    """The labelled examples of `--eval-data`, read before the first build."""
    if options.eval_data is None:
        return None
    if not isinstance(options.eval_data, str):
        return list(options.eval_data)
    return evaluate.read_examples(options.eval_data, model.exported.config.get("id2label") or {})


def tune_profile(options: CompileOptions, plan: Plan, profile: Profile, model: Imported, work_dir):
    """Stage 3 for one profile (only with --tune): new trials into the cache; else None."""
    if profile not in plan.tunable:
        return None
    profile_rpc = options.rpc if plan.on_remote(profile) else None
    rpc_key = profile_rpc.key if profile_rpc else None
    where = f" on RPC key {rpc_key!r}" if rpc_key else ""
    cache = tuning.cache_path(profile, rpc_key)
    with plan.stages(f"tune {profile.name} ({options.tune_trials} trials{where}, cache {cache})"):
        return tuning.tune(
            importer.without_fallback(model.imported.mod),
            profile,
            options.tune_trials,
            work_dir / "tuning" / profile.name,
            rpc=profile_rpc.tracker if profile_rpc else None,
            rpc_key=rpc_key,
        )


def lower_precision(mod, profile: Profile, dtype: str):
    """The imported module with its matmuls in `dtype` (quantize.py), logged."""
    if dtype == "int8":
        kernel = kernel_for(profile)
        mod, count = quantize_int8(mod, kernel)
        logger.info("  int8: %d matmuls on the %s kernel", count, kernel.name)
    elif dtype == "bfloat16":
        amx = "amx_bf16" in profile.requires.get("cpu_features", [])
        mod, count = to_bfloat16(mod, amx=amx)
        logger.info(
            "  bf16: %d matmuls on the %s kernel", count, "amx-bf16" if amx else "avx512-bf16"
        )
    elif dtype == "float16":
        mod = to_float16(mod)
    return mod


def build_one(options, plan: Plan, profile: Profile, dtype: str, model: Imported, tuned, work_dir):
    """Stage 4 for one artifact: lower its precision, look up records, build `lib.so`.

    Returns (BuildResult, whether it has the fallback, the tuning summary, the record files)."""
    name = artifact_name(profile.name, dtype)
    built_for = profile.for_precision(short(dtype))  # bf16 adds AVX512-BF16
    rpc_key = options.rpc.key if plan.on_remote(profile) else None
    tuning_dir = work_dir / "tuning" / profile.name
    with plan.stages(f"build {name}"):
        mod = lower_precision(model.imported.mod, profile, dtype)
        found = tuned
        if found is None or dtype != "float32":  # shipped/cached records, no trials
            found = tuning.lookup(
                importer.without_fallback(mod), built_for, tuning_dir / dtype, rpc_key=rpc_key
            )
        database, summary, files = None, NO_TUNING, []
        if found is not None:
            database, summary, files = found.database, found.summary, found.files
        built, has_fallback = _build(
            mod, built_for, work_dir / "artifacts" / name, database, dtype, model.imported
        )
    return built, has_fallback, summary, files


def verify_one(options, plan: Plan, profile: Profile, built, has_fallback, model, cases):
    """Stage 5 for one artifact: parity against ONNX Runtime where it can run (native, QEMU,
    RPC); a failure is a ParityError under --strict-parity. Returns (parity record, latency)."""
    if not options.verify:
        return {"where": "not-run", "detail": "verification disabled"}, []
    name = artifact_name(profile.name, built.precision)
    checked = cases if has_fallback else verify.without_fallback_case(cases)
    profile_rpc = options.rpc if plan.on_remote(profile) else None
    via = " via RPC" if profile_rpc else ""
    with plan.stages(f"verify {name} against ONNX Runtime{via}"):
        if profile_rpc:
            record = verify.verify_rpc(
                built, model.imported, checked, profile_rpc.tracker, profile_rpc.key
            )
            latency = []
        else:
            record, latency = verify.verify(built, model.imported, checked)
    logger.info("  parity %s: %s", name, record.summary())
    if record.ok is False and options.strict_parity:
        raise ParityError(
            f"{name}: verification against ONNX Runtime failed: {record.summary()} "
            f"(tolerance {record.tolerance}); no bundle written"
        )
    return record.to_dict(), latency


def build_artifacts(options, plan: Plan, model: Imported, cases, work_dir: Path) -> list:
    """Stages 3–5 per profile: tune, then build and verify each of its precisions."""
    entries: list[package.ArtifactEntry] = []
    for profile in plan.profiles:
        tuned = tune_profile(options, plan, profile, model, work_dir)
        for dtype in plan.pairs[profile.name]:
            built, has_fallback, summary, files = build_one(
                options, plan, profile, dtype, model, tuned, work_dir
            )
            parity, latency = verify_one(options, plan, profile, built, has_fallback, model, cases)
            entries.append(
                package.ArtifactEntry(
                    profile=profile.name,
                    family=profile.family,
                    target=built.target,
                    requires=profile.for_precision(short(dtype)).requires,
                    lib_path=built.lib_path,
                    precision=dtype,
                    code_form=built.code_form,
                    tuning=summary,
                    parity=parity,
                    latency=latency,
                    tuning_files=files,
                    fallback=has_fallback,
                )
            )
    return entries


def write_bundle(options, plan: Plan, model: Imported, entries, examples) -> Path:
    """Stage 6: the bundle, atomically (with the accuracy of each artifact if asked)."""
    imported = model.imported
    with plan.stages("package bundle"):
        name = options.name or Path(options.model).stem
        return package.write_bundle(
            options.output,
            model.exported.onnx_path,
            {
                "float32": (
                    imported.param_names,
                    package.weights_blob(imported.param_names, imported.params),
                )
            },
            entries,
            model_info(model.exported, imported, model.facts, name),
            [{"function": b.function, "batch": b.batch, "seq": b.seq} for b in model.buckets],
            model.exported.tokenizer_dir,
            model.exported.parity,
            accuracy_gate=options.accuracy_gate,
            evaluate=_evaluator(examples, plan.stages) if examples else None,
        )


def compile_model(options: CompileOptions) -> Path:
    """Run the pipeline; returns the bundle path. Raises ParityError if an artifact is wrong.
    A causal LM (HF folder, LoRA adapter, GGUF file) goes to the decoder driver."""
    from ..decoder.sources import is_decoder_source
    from ..tvmscript_stack import install

    install()  # TVMScript parsing without a source lookup per stack frame (tvmscript_stack.py)
    if is_decoder_source(options.model):
        from .compile_decoder import compile_decoder

        return compile_decoder(options)
    if options.base is not None or options.context is not None or not options.onnx:
        raise OptionError("--base, --context and --no-onnx are for causal LMs (text generation)")
    plan = plan_compile(options)
    with tempfile.TemporaryDirectory(prefix="tvmdeploy-") as work:
        work_dir = Path(work)
        model = export_and_import(options, plan, work_dir)
        cases = reference_cases(options, plan, model)
        examples = eval_examples(options, model)
        entries = build_artifacts(options, plan, model, cases, work_dir)
        out = write_bundle(options, plan, model, entries, examples)
    logger.info("bundle written: %s", out)
    return out
