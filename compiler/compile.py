"""`compile`: the whole pipeline, export → import → (tune) → build → verify → package.

The CLI only parses arguments into CompileOptions and calls `compile_model`; a script can do the
same. Each stage lives in its own module; this one only orders them and shows progress.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from rich.console import Console
from rich.markup import escape
from tvmdeploy import targets
from tvmdeploy.runtime.probe import DeviceInfo, missing_requirements, probe
from tvmdeploy.runtime.select import rank_key

from . import build as build_stage
from . import export as export_stage
from . import importer, package, verify
from .errors import ParityError

console = Console(stderr=True, highlight=False, soft_wrap=True)


def host_profile(device: DeviceInfo | None = None, cpu_only: bool = True) -> targets.Profile:
    """The most specific profile this machine can run (CPU profiles unless cpu_only=False)."""
    device = device or probe()
    runnable = [
        p for p in targets.all()
        if not missing_requirements(p.requires, device) and (not cpu_only or not p.is_gpu)
    ]
    if not runnable:
        raise targets.UnknownTargetError(f"no target profile matches this machine ({device.description})")
    return min(runnable, key=lambda p: rank_key(p.is_gpu, p.requires, p.name))


def resolve_profiles(names: list[str]) -> list[targets.Profile]:
    """Profiles by name; 'host' is the best one for this machine. Duplicates are dropped."""
    resolved: list[targets.Profile] = []
    for name in names:
        profile = host_profile() if name == "host" else targets.get(name)
        if profile not in resolved:
            resolved.append(profile)
    return resolved


@dataclass
class CompileOptions:
    """Everything `tvmdeploy compile` takes; `display()` says what will happen."""

    model: str
    output: str
    targets: list[str] = field(default_factory=lambda: ["host"])
    task: str | None = None
    buckets: str = importer.DEFAULT_BUCKETS
    opset: int | None = None
    tune_trials: int = 0
    verify: bool = True
    strict_parity: bool = True
    name: str | None = None
    # HOST:PORT of a TVM RPC tracker: artifacts of the remote's arch are verified there, and built with
    # the tuning records measured there (tuned there with tune_trials)
    rpc: str | None = None
    rpc_key: str | None = None

    def display(self, profiles: list[targets.Profile]) -> None:
        console.print(f"[bold]tvmdeploy compile[/bold] {self.model} → {self.output}")
        console.print(f"  targets : {', '.join(p.name for p in profiles)}")
        console.print(f"  buckets : {self.buckets}  (batch x seq)")
        console.print(f"  task    : {self.task or 'inferred from config'}")
        console.print(f"  tuning  : {f'{self.tune_trials} trials per profile' if self.tune_trials else 'no new trials (tuning records from the shipped set or the cache where they exist)'}")
        if self.rpc:
            console.print(f"  verify  : artifacts of the remote's arch on RPC key {self.rpc_key!r} (tracker {self.rpc})")
            console.print(f"  records : artifacts of the remote's arch use those measured on RPC key {self.rpc_key!r}")


class Stages:
    """Numbered stage headings with timings on stderr."""

    def __init__(self, total: int):
        self.total, self.index = total, 0

    def __call__(self, title: str, spinner: bool = True):
        self.index += 1
        return _Stage(f"[{self.index}/{self.total}] {title}", spinner)


class _Stage:
    """A stage heading; `spinner=False` for stages that draw their own progress bar."""

    def __init__(self, title: str, spinner: bool = True):
        self.title, self.spinner = title, spinner

    def __enter__(self):
        self.start = time.perf_counter()
        self.status = console.status(self.title + " …") if self.spinner else None
        if self.status:
            self.status.__enter__()
        else:
            console.print(self.title + " …")
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.status:
            self.status.__exit__(exc_type, exc, tb)
        took = time.perf_counter() - self.start
        mark = "[green]done[/green]" if exc_type is None else "[red]failed[/red]"
        console.print(f"{self.title} {mark} in {took:.1f} s")


def graph_vocab_sizes(onnx_path: Path) -> dict[str, int]:
    """Rows of the embedding tables that gather `input_ids` / `token_type_ids` (the true id range)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    sizes = {}
    for node in model.graph.node:
        ids = node.input[1] if node.op_type == "Gather" and len(node.input) == 2 else None
        if ids in ("input_ids", "token_type_ids") and node.input[0] in shapes:
            sizes[ids] = shapes[node.input[0]][0]
    return sizes


def model_info(exported: export_stage.ExportResult, imported: importer.ImportedModel, name: str) -> dict[str, Any]:
    config = exported.config
    sizes = graph_vocab_sizes(exported.onnx_path)
    vocab = sizes.get("input_ids") or config.get("vocab_size")
    if not vocab:
        raise export_stage.ModelLoadError("cannot tell the vocabulary size (no embedding Gather, no config.json)")
    return {
        "name": name,
        "source": exported.source,
        "task": exported.task,
        "model_type": config.get("model_type"),
        "vocab_size": int(vocab),
        "type_vocab_size": int(sizes.get("token_type_ids") or config.get("type_vocab_size") or 1),
        "pad_token_id": int(config.get("pad_token_id") or 0),
        "max_position_embeddings": config.get("max_position_embeddings"),
        "id2label": config.get("id2label", {}),
        "inputs": imported.inputs,
        "outputs": imported.outputs,
    }


def compile_model(options: CompileOptions) -> Path:
    """Run the pipeline; returns the bundle path. Raises ParityError if an artifact is wrong."""
    import tvm

    profiles = resolve_profiles(options.targets)
    options.display(profiles)
    remote_device = None
    if options.rpc:  # asked before the export: a wrong --rpc fails in seconds
        from tvmdeploy.runtime import remote

        if not options.rpc_key:
            raise remote.RemoteError("--rpc needs --rpc-key KEY: the key the device's rpc_server registered under")
        remote_device = remote.probe_remote(options.rpc, options.rpc_key)

    def on_remote(profile: targets.Profile) -> bool:
        """Whether the profile's artifact is for the remote: verified, tuned and looked up there."""
        return (remote_device is not None and not profile.is_gpu
                and profile.requires.get("arch") == remote_device.arch)

    buckets = importer.parse_buckets(options.buckets)
    from . import tune

    tunable = []
    if options.tune_trials:
        for profile in profiles:
            try:
                if on_remote(profile):
                    tune.check_tunable(profile, options.rpc, options.rpc_key)
                else:
                    tune.check_tunable(profile)
                tunable.append(profile)
            except tune.TuningError as why:
                console.print(f"  [yellow]not tuning[/yellow] {why}")
    stages = Stages(4 + len(profiles) + len(tunable) + bool(options.verify) * len(profiles))
    with tempfile.TemporaryDirectory(prefix="tvmdeploy-") as work:
        work_dir = Path(work)
        with stages("export (optimum, onnx checker, parity vs PyTorch)"):
            exported = export_stage.export(options.model, work_dir / "onnx", task=options.task, opset=options.opset)
        if exported.parity:
            p = exported.parity
            console.print(f"  ONNX Runtime vs PyTorch: max abs diff {p['max_abs_diff']:.2e} (tolerance {p['tolerance']:.0e})")
        with stages(f"import to Relax ({len(buckets)} shape buckets)"):
            imported = importer.import_onnx(
                exported.onnx_path, buckets, exported.config.get("max_position_embeddings")
            )
        with stages("reference outputs from ONNX Runtime"):
            cases = verify.reference_cases(exported.onnx_path, imported, exported.config) if options.verify else []

        entries: list[package.ArtifactEntry] = []
        for profile in profiles:
            database, tuning_summary, tuning_files = None, {"trials": 0, "source": "none (rule-based default schedules)"}, []
            tuning_dir = work_dir / "tuning" / profile.name
            rpc, rpc_key = (options.rpc, options.rpc_key) if on_remote(profile) else (None, None)
            if profile in tunable:
                with stages(f"tune {profile.name} ({options.tune_trials} trials"
                            + (f" on RPC key {rpc_key!r}" if rpc_key else "")
                            + f", cache {tune.cache_path(profile, rpc_key)})", spinner=False):
                    tuned = tune.tune(imported.mod, profile, options.tune_trials, tuning_dir, rpc=rpc,
                                      rpc_key=rpc_key)
            else:  # records from the shipped set and the cache, zero new trials
                tuned = tune.lookup(imported.mod, profile, tuning_dir, rpc_key=rpc_key)
            if tuned is not None:
                database, tuning_summary, tuning_files = tuned.database, tuned.summary, tuned.files
            with stages(f"build {profile.name}"):
                built = build_stage.build(imported.mod, profile, work_dir / "artifacts" / profile.name, database)
            parity, latency = {"where": "not-run", "detail": "verification disabled"}, []
            if options.verify:
                with stages(f"verify {profile.name} against ONNX Runtime" + (" via RPC" if rpc else "")):
                    if rpc:
                        record, latency = verify.verify_rpc(built, imported, cases, options.rpc, options.rpc_key), []
                    else:
                        record, latency = verify.verify(built, imported, cases)
                parity = record.to_dict()
                console.print(f"  parity {profile.name}: {escape(record.summary())}")  # "[ok]" is not markup
                if record.ok is False and options.strict_parity:
                    raise ParityError(
                        f"{profile.name}: verification against ONNX Runtime failed: {record.summary()} "
                        f"(tolerance {record.tolerance}); no bundle written"
                    )
            entries.append(
                package.ArtifactEntry(
                    profile=profile.name, family=profile.family, target=built.target, requires=profile.requires,
                    lib_path=built.lib_path, code_form=built.code_form, tuning=tuning_summary,
                    parity=parity, latency=latency, tuning_files=tuning_files,
                )
            )

        with stages("package bundle"):
            name = options.name or Path(options.model).stem
            blob = tvm.runtime.save_param_dict(dict(zip(imported.param_names, imported.params)))
            out = package.write_bundle(
                options.output,
                exported.onnx_path,
                {"float32": (imported.param_names, blob)},
                entries,
                model_info(exported, imported, name),
                [{"function": b.function, "batch": b.batch, "seq": b.seq} for b in buckets],
                exported.tokenizer_dir,
                exported.parity,
            )
    console.print(f"[bold green]bundle written:[/bold green] {out}")
    return out
