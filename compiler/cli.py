"""`tvmdeploy` command line: parses arguments and calls the Python API; no work happens here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from tvmdeploy import targets as target_profiles
from tvmdeploy.runtime.errors import TvmdeployError

if not sys.stdout.isatty():  # logs and pipes: keep tables whole instead of rich's 80 columns
    os.environ.setdefault("COLUMNS", "160")

app = typer.Typer(
    help="Compile fine-tuned transformers models with Apache TVM into one bundle; run and benchmark it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(error: Exception) -> None:
    err.print(f"[bold red]error:[/bold red] {error}")
    raise typer.Exit(2)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@app.command("compile")
def compile_cmd(
    model: Annotated[str, typer.Argument(help="A local Hugging Face model directory, or an .onnx file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Bundle directory to write (NAME.tvmd).")],
    target: Annotated[list[str], typer.Option("-t", "--target", help="Target profile; repeat for several. 'host' = best for this machine. See `tvmdeploy targets`.")] = ["host"],  # noqa: B006
    task: Annotated[str | None, typer.Option(help="Optimum task (e.g. text-classification); inferred from config.json by default.")] = None,
    buckets: Annotated[str, typer.Option(help="Shape buckets as BATCHES x SEQS, e.g. '1,4x32,64,128,256'; join groups with ';'.")] = "1,4x32,64,128,256",
    opset: Annotated[int | None, typer.Option(help="ONNX opset for the export.")] = None,
    tune: Annotated[int, typer.Option("--tune", help="MetaSchedule trials per profile (0 = rule-based default schedules).")] = 0,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the parity check against ONNX Runtime.")] = False,
    name: Annotated[str | None, typer.Option(help="Model name recorded in the manifest.")] = None,
    rpc: Annotated[str | None, typer.Option("--rpc", help="TVM RPC tracker HOST:PORT: verify the artifacts of the remote device's arch on it.")] = None,
    rpc_key: Annotated[str | None, typer.Option("--rpc-key", help="Key of the device's rpc_server at the tracker.")] = None,
) -> None:
    """Export MODEL, build it for each target profile, verify parity against ONNX Runtime, and write one bundle."""
    from .compile import CompileOptions, compile_model

    options = CompileOptions(model=model, output=str(output), targets=target, task=task, buckets=buckets,
                             opset=opset, tune_trials=tune, verify=not no_verify, name=name, rpc=rpc,
                             rpc_key=rpc_key)
    try:
        compile_model(options)
    except (TvmdeployError, ValueError, FileExistsError, target_profiles.UnknownTargetError) as error:
        _fail(error)


@app.command("tune")
def tune_cmd(
    model: Annotated[str, typer.Argument(help="A local Hugging Face model directory, or an .onnx file.")],
    target: Annotated[str, typer.Option("-t", "--target", help="CPU target profile this machine (or the --rpc device) can run; 'host' = best for this machine.")] = "host",
    trials: Annotated[int | None, typer.Option("--trials", help="Trial budget for this model's kernels, counting records already in the cache (a rerun continues).")] = None,
    minutes: Annotated[float | None, typer.Option("--minutes", help="Wall-time budget for this run, in minutes.")] = None,
    buckets: Annotated[str, typer.Option(help="Shape buckets as BATCHES x SEQS (the same as you will compile).")] = "1,4x32,64,128,256",
    task: Annotated[str | None, typer.Option(help="Optimum task; inferred from config.json by default.")] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset for the export.")] = None,
    export_records: Annotated[Path | None, typer.Option("--export", help="Also write this model's best records (one per kernel) to this directory, e.g. to ship them.")] = None,
    rpc: Annotated[str | None, typer.Option("--rpc", help="TVM RPC tracker HOST:PORT: time every candidate on the remote device instead (timed there; network excluded).")] = None,
    rpc_key: Annotated[str | None, typer.Option("--rpc-key", help="Key of the device's rpc_server at the tracker; its records go to a cache of their own (rpc-KEY), which `compile --rpc` reads.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the run's summary as JSON on stdout (trials, records, cache, and where the trials were measured).")] = False,
) -> None:
    """Tune MODEL's matmul kernels with MetaSchedule into the per-profile cache; `compile` then uses the records.

    Resumable: Ctrl-C, SIGTERM or kill -9 lose no measured record, and the same command continues where it stopped.

    With --rpc HOST:PORT --rpc-key KEY the candidates are built here (ARM ones linked with the profile's cross compiler) and timed on the device behind KEY, which must be of the profile's arch (checked first); its records are kept apart from this machine's, in the cache's rpc-KEY directory, and `compile --rpc HOST:PORT --rpc-key KEY` builds with them.
    """
    from .tune import TuneOptions, TuningInterrupted, tune_model

    if not trials and not minutes:
        _fail(ValueError("give a budget: --trials N, --minutes M, or both"))
    if bool(rpc) != bool(rpc_key):
        _fail(ValueError("tuning on a remote device needs both --rpc HOST:PORT and --rpc-key KEY"))
    options = TuneOptions(model=model, target=target, trials=trials, minutes=minutes, buckets=buckets,
                          task=task, opset=opset, export_dir=str(export_records) if export_records else None,
                          rpc=rpc, rpc_key=rpc_key)
    try:
        result = tune_model(options)
    except TuningInterrupted as stopped:
        err.print(f"[yellow]{stopped}[/yellow]")
        raise typer.Exit(128 + stopped.signum) from None
    except (TvmdeployError, ValueError, target_profiles.UnknownTargetError) as error:
        _fail(error)
    if json_output:
        summary = {"model": model, "profile": result.profile, "cache": str(result.cache), **result.summary}
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")


@app.command()
def bench(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    compare: Annotated[str | None, typer.Option(help="Baselines to time beside tvmdeploy: onnxruntime, torch (comma-separated, or ''). Default onnxruntime; none with --rpc (baselines run only locally).")] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1",
    seq: Annotated[str, typer.Option(help="Sequence lengths, comma-separated.")] = "32,128",
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs per case.")] = 5,
    runs: Annotated[int, typer.Option(help="Timed runs per case.")] = 30,
    artifact: Annotated[str | None, typer.Option(help="Force a tvmdeploy artifact (profile name).")] = None,
    torch_model: Annotated[Path | None, typer.Option(help="HF model directory for the PyTorch baseline (default: the manifest's source).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the versioned JSON report here.")] = None,
    rpc: Annotated[str | None, typer.Option("--rpc", help="TVM RPC tracker HOST:PORT: time tvmdeploy on the remote device instead (timed there; network excluded).")] = None,
    rpc_key: Annotated[str | None, typer.Option("--rpc-key", help="Key of the device's rpc_server at the tracker.")] = None,
    rpc_timeout: Annotated[float, typer.Option("--rpc-timeout", help="Seconds the remote session may last.")] = 600.0,
) -> None:
    """Time the bundle (and baselines) in one process: warm-up, then p50/p90/p99/mean/std and throughput.

    With --rpc HOST:PORT --rpc-key KEY the artifact runs on the remote device (the least demanding one of its arch unless --artifact names one), timed there by TVM's time_evaluator; baselines are refused, bench them locally and merge with `tvmdeploy report`.
    """
    from tvmdeploy.runtime.bench import BenchConfig, run_bench

    compare = compare if compare is not None else ("" if rpc else "onnxruntime")
    engines = ["tvmdeploy"] + [e.strip() for e in compare.split(",") if e.strip()]
    config = BenchConfig(str(bundle), engines, _ints(batch), _ints(seq), warmup, runs, artifact,
                         str(torch_model) if torch_model else None, rpc, rpc_key, rpc_timeout)
    try:
        with err.status("benchmarking …") as status:
            report = run_bench(config, progress=lambda msg: status.update(f"benchmarking {msg} …"))
    except (TvmdeployError, ValueError) as error:
        _fail(error)
    table = Table(title=f"{report.bundle['name']} on {report.device['description']}")
    for column in ("engine", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "mean ms", "seq/s", "max|Δ| vs ORT"):
        table.add_column(column, justify="right" if column != "engine" else "left")
    for r in report.results:
        label = f"{r.engine} ({r.artifact})" if r.artifact else r.engine
        table.add_row(label, str(r.batch), str(r.seq), f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}",
                      f"{r.mean_ms:.2f}", f"{r.throughput_per_s:.1f}", f"{r.parity['max_abs_diff']:.1e}")
    out.print(table)
    out.print(f"choice: {report.bundle['choice']}")
    if json_out:
        report.write(json_out)
        out.print(f"wrote {json_out}")


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the raw manifest as JSON.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Verify every file's sha256.")] = False,
) -> None:
    """Show a bundle's manifest: model, buckets, artifacts with parity, tuning and latency."""
    from tvmdeploy.runtime import Bundle, probe
    from tvmdeploy.runtime.probe import missing_requirements

    from .verify import parity_summary

    try:
        b = Bundle(bundle)
        if check:
            b.verify()
    except TvmdeployError as error:
        _fail(error)
    if json_output:
        out.print_json(json.dumps(b.manifest))
        return
    m = b.manifest
    model = m["model"]
    out.print(f"[bold]{b.name}[/bold]  ({b.path})  format v{m['format_version']}, created {m.get('created')}")
    out.print(f"  task {model.get('task')}, {model.get('model_type')}, vocab {model['vocab_size']}, labels {model.get('id2label') or '-'}")
    out.print(f"  inputs {[i['name'] for i in b.inputs]} → outputs {[o['name'] for o in b.outputs]}")
    out.print(f"  buckets (batch x seq): {', '.join(f'{x.batch}x{x.seq}' for x in b.buckets)}")
    out.print("  tools: " + ", ".join(f"{k} {v}" for k, v in m.get("tools", {}).items()))
    if m.get("export_parity"):
        p = m["export_parity"]
        out.print(f"  export parity: ONNX Runtime vs PyTorch max abs diff {p['max_abs_diff']:.2e} (tol {p['tolerance']})")
    if check:
        out.print(f"  checksums: all {len(m['files'])} files ok")
    device = probe()
    table = Table(title="artifacts")
    for column in ("profile", "target", "code", "tuning", "parity", "latency p50 (build host)", "runs here"):
        table.add_column(column)
    for a in b.artifacts:
        ptext = parity_summary(a.parity)
        lat = ", ".join(f"{e['batch']}x{e['seq']}: {e['p50_ms']:.1f} ms" for e in a.latency[:4]) or "-"
        missing = missing_requirements(a.requires, device)
        table.add_row(a.profile, json.dumps(a.target), a.code_form, str(a.tuning.get("trials", 0)) + " trials",
                      ptext, lat, "yes" if not missing else "no: " + "; ".join(missing))
    out.print(table)


@app.command()
def targets(
    json_output: Annotated[bool, typer.Option("--json", help="Print the profiles as JSON.")] = False,
) -> None:
    """List the target profiles (targets/*.toml) and whether this machine can run each."""
    from tvmdeploy.runtime import probe
    from tvmdeploy.runtime.probe import missing_requirements

    device = probe()
    profiles = target_profiles.all()
    if json_output:
        rows = [p.to_dict() | {"runs_here": not missing_requirements(p.requires, device)} for p in profiles]
        out.print_json(json.dumps(rows))
        return
    table = Table(title=f"target profiles (this machine: {device.description})")
    for column in ("name", "description", "TVM target", "requires", "runs here"):
        table.add_column(column)
    for p in profiles:
        missing = missing_requirements(p.requires, device)
        req = ", ".join(p.requires.get("cpu_features", [])) or f"sm_{p.requires.get('cuda_arch')}"
        table.add_row(p.name, p.description, json.dumps(p.target), req, "yes" if not missing else "no")
    out.print(table)


@app.command()
def demo(
    work_dir: Annotated[Path, typer.Option(help="Where the fine-tuned model, bundle and results are cached.")] = Path("build/demo"),
    target: Annotated[str, typer.Option("-t", "--target", help="Target profile for the demo bundle.")] = "host",
    epochs: Annotated[float, typer.Option(help="Fine-tuning epochs (first run only; the model is cached).")] = 1.0,
) -> None:
    """Fine-tune the packaged all-MiniLM-L6-v2 on VADER movie reviews, compile, verify, classify and compare."""
    from .demo import run_demo

    try:
        run_demo(work_dir, target, epochs)
    except TvmdeployError as error:
        _fail(error)


@app.command()
def report(
    files: Annotated[list[Path], typer.Argument(help="Bench JSONs written by `tvmdeploy bench --json`, e.g. one per device.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Self-contained HTML page to write (plots inline, no external URLs).")] = None,
    md: Annotated[Path | None, typer.Option("--md", help="Markdown tables to write.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the merged rows (with speed-ups) as JSON on stdout.")] = False,
) -> None:
    """Merge bench JSONs from any number of devices into Markdown tables and one HTML page with plots.

    Tables per device × engine × batch × seq give p50/p90/p99, throughput, and the speed-up over ONNX Runtime and over PyTorch on the same device (baseline p50 ÷ engine p50, where that baseline was measured). The HTML page is self-contained and plots latency by device and engine, the speed-ups, and latency against sequence length. With neither -o, --md nor --json, the Markdown is printed.

    Example: tvmdeploy report x86.json arm.json -o report.html --md report.md
    """
    from tvmdeploy.runtime.report import build_report

    written = []
    try:
        merged = build_report(files)
        if output:
            written.append(merged.write_html(output))
        if md:
            written.append(merged.write_markdown(md))
    except TvmdeployError as error:
        _fail(error)
    if json_output:
        sys.stdout.write(json.dumps(merged.to_rows(), indent=2) + "\n")
    elif not written:
        sys.stdout.write(merged.markdown())
    for path in written:
        (err if json_output else out).print(f"wrote {path}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
