"""`tvmdeploy` command line: parses arguments, calls the Python API, draws tables; no work here.

Errors are caught once, in `_Commands.invoke`: a `TvmdeployError` prints its message (the
traceback too with `-v`) and exits 2. Library modules report through `logging`; this module shows
those records on stderr (`-q` keeps only warnings). The device-side commands (`inspect`, `bench`
without baselines, `targets`, `report`, `verify`, `sign`, `keygen`, `serve`) import only the
runtime: no torch, transformers, onnx nor TVM's compiler library (docs/design.md).

Why this module is long (~550 lines): it is one concern, the command line; each command is a
thin parse, one API call and its table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from tvmdeploy.runtime.errors import TvmdeployError
from tvmdeploy.runtime.precision import DEFAULT_ACCURACY_GATE
from typer.core import TyperGroup

from .help import HELP

if not sys.stdout.isatty():  # logs and pipes: keep tables whole instead of rich's 80 columns
    os.environ.setdefault("COLUMNS", "160")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)
_state = {"verbose": False}


class _Commands(TyperGroup):
    """The one place errors become messages and exit codes."""

    def invoke(self, ctx):
        from tvmdeploy.compiler.errors import TuningInterrupted

        try:
            return super().invoke(ctx)
        except TuningInterrupted as stopped:
            err.print(f"[yellow]{stopped}[/yellow]")
            raise typer.Exit(128 + stopped.signum) from None
        except TvmdeployError as error:
            if _state["verbose"]:
                err.print(traceback.format_exc(), markup=False)
            err.print(f"[bold red]error:[/bold red] {error}", markup=True)
            if not _state["verbose"]:
                err.print("(run with -v for the traceback)", style="dim")
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Commands,
    help="Compile fine-tuned transformers models with Apache TVM into one bundle; run and "
    "benchmark it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help=HELP["verbose"])] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help=HELP["quiet"])] = False,
) -> None:
    _state["verbose"] = verbose
    _configure_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def _configure_logging(level: int) -> None:
    """Show tvmdeploy's log records on stderr, plainly (the library never prints)."""
    from rich.logging import RichHandler

    logger = logging.getLogger("tvmdeploy")
    for handler in list(logger.handlers):
        if getattr(handler, "_tvmdeploy_cli", False):
            logger.removeHandler(handler)
    handler = RichHandler(
        console=err,
        show_time=False,
        show_path=False,
        show_level=False,
        markup=False,
        highlighter=None,
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._tvmdeploy_cli = True  # type: ignore[attr-defined]
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(level)


def _device_side() -> None:
    """Runtime-only TVM for a device-side command (the compiler package asks for the full one)."""
    if "tvm" not in sys.modules:
        os.environ["TVM_USE_RUNTIME_LIB"] = "1"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


Opt = typer.Option
Arg = typer.Argument


@app.command("compile")
def compile_cmd(
    model: Annotated[str, Arg(help=HELP["model"])],
    output: Annotated[Path, Opt("-o", "--output", help=HELP["output"])],
    target: Annotated[list[str], Opt("-t", "--target", help=HELP["profiles"])] = ["host"],  # noqa: B006
    task: Annotated[str | None, Opt(help=HELP["task"])] = None,
    buckets: Annotated[str | None, Opt(help=HELP["buckets"])] = None,
    opset: Annotated[int | None, Opt(help=HELP["opset"])] = None,
    tune: Annotated[int, Opt("--tune", help=HELP["tune_trials"])] = 0,
    no_verify: Annotated[bool, Opt("--no-verify", help=HELP["no_verify"])] = False,
    no_strict_parity: Annotated[
        bool, Opt("--no-strict-parity", help=HELP["no_strict_parity"])
    ] = False,
    name: Annotated[str | None, Opt(help=HELP["name"])] = None,
    rpc: Annotated[str | None, Opt("--rpc", help=HELP["compile_rpc"])] = None,
    rpc_key: Annotated[str | None, Opt("--rpc-key", help=HELP["rpc_key"])] = None,
    precision: Annotated[str, Opt("--precision", help=HELP["precision"])] = "fp32",
    eval_data: Annotated[Path | None, Opt("--eval-data", help=HELP["eval_data"])] = None,
    accuracy_gate: Annotated[
        float, Opt("--accuracy-gate", help=HELP["accuracy_gate"])
    ] = DEFAULT_ACCURACY_GATE,
    vocab_size: Annotated[int | None, Opt("--vocab-size", help=HELP["vocab_size"])] = None,
    type_vocab_size: Annotated[
        int | None, Opt("--type-vocab-size", help=HELP["type_vocab_size"])
    ] = None,
    max_positions: Annotated[int | None, Opt("--max-positions", help=HELP["max_positions"])] = None,
    base: Annotated[Path | None, Opt("--base", help=HELP["base"])] = None,
    context: Annotated[int | None, Opt("--context", help=HELP["context"])] = None,
    no_onnx: Annotated[bool, Opt("--no-onnx", help=HELP["no_onnx"])] = False,
    json_output: Annotated[bool, Opt("--json", help=HELP["compile_json"])] = False,
) -> None:
    """Export MODEL, build it for each target profile and precision, verify parity against ONNX
    Runtime, and write one bundle.

    A causal LM (HF folder, LoRA adapter with --base, or GGUF file) becomes a generation bundle:
    its own definition on TVM's paged KV cache, with its ONNX export (unless --no-onnx), gated
    against transformers' and ONNX Runtime's logits and greedy tokens; run it with
    `tvmdeploy generate` or `tvmdeploy chat`."""
    from tvmdeploy.compiler import CompileOptions, compile_model
    from tvmdeploy.compiler.options import RpcTarget

    options = CompileOptions(
        model=model,
        output=str(output),
        profiles=target,
        task=task,
        buckets=buckets,
        opset=opset,
        tune_trials=tune,
        verify=not no_verify,
        strict_parity=not no_strict_parity,
        name=name,
        rpc=RpcTarget.from_options(rpc, rpc_key),
        precisions=[p.strip() for p in precision.split(",") if p.strip()],
        eval_data=str(eval_data) if eval_data else None,
        accuracy_gate=accuracy_gate,
        vocab_size=vocab_size,
        type_vocab_size=type_vocab_size,
        max_positions=max_positions,
        base=str(base) if base else None,
        context=context,
        onnx=not no_onnx,
    )
    written = compile_model(options)
    if json_output:
        _print_json(json.loads((written / "manifest.json").read_text()))


@app.command("tune")
def tune_cmd(
    model: Annotated[str, Arg(help=HELP["model"])],
    target: Annotated[str, Opt("-t", "--target", help=HELP["tune_profile"])] = "host",
    trials: Annotated[int | None, Opt("--trials", help=HELP["trials"])] = None,
    minutes: Annotated[float | None, Opt("--minutes", help=HELP["minutes"])] = None,
    buckets: Annotated[str | None, Opt(help=HELP["tune_buckets"])] = None,
    task: Annotated[str | None, Opt(help=HELP["task"])] = None,
    opset: Annotated[int | None, Opt(help=HELP["opset"])] = None,
    export_records: Annotated[Path | None, Opt("--export", help=HELP["export_records"])] = None,
    rpc: Annotated[str | None, Opt("--rpc", help=HELP["tune_rpc"])] = None,
    rpc_key: Annotated[str | None, Opt("--rpc-key", help=HELP["tune_rpc_key"])] = None,
    json_output: Annotated[bool, Opt("--json", help=HELP["tune_json"])] = False,
) -> None:
    """Tune MODEL's matmul kernels with MetaSchedule into the per-profile cache; `compile` then
    uses the records.

    Resumable: Ctrl-C, SIGTERM or kill -9 lose no measured record, and the same command continues
    where it stopped.

    With --rpc HOST:PORT --rpc-key KEY the candidates are built here (ARM ones linked with the
    profile's cross compiler) and timed on the device behind KEY, which must be of the profile's
    arch (checked first); its records are kept apart from this machine's, in the cache's rpc-KEY
    directory, and `compile --rpc HOST:PORT --rpc-key KEY` builds with them.
    """
    from tvmdeploy.compiler import TuneOptions, tune_model
    from tvmdeploy.compiler.errors import OptionError
    from tvmdeploy.compiler.options import RpcTarget
    from tvmdeploy.compiler.tuning import RichTuneProgress, task_table

    if not trials and not minutes:
        raise OptionError("give a budget: --trials N, --minutes M, or both")
    # A bar where someone watches; log lines where stderr goes to a file (a bar shows nothing
    # there until the run ends).
    bar = RichTuneProgress(target, console=err) if err.is_terminal else None
    options = TuneOptions(
        model=model,
        profile=target,
        trials=trials,
        minutes=minutes,
        buckets=buckets,
        task=task,
        opset=opset,
        export_dir=str(export_records) if export_records else None,
        rpc=RpcTarget.from_options(rpc, rpc_key),
        progress=bar or True,
    )
    with bar or contextlib.nullcontext():
        result = tune_model(options)
    tuned = [t for t in result.tasks if t.tuned]
    if tuned:
        err.print(task_table(tuned, result.profile or target))
    if json_output:
        _print_json(
            {
                "model": model,
                "profile": result.profile,
                "cache": str(result.cache),
                **result.summary,
            }
        )


@app.command("check-records")
def check_records(
    records: Annotated[Path | None, Arg(help=HELP["records_dir"])] = None,
    target: Annotated[str, Opt("-t", "--target", help=HELP["check_profile"])] = "host",
    rounds: Annotated[int, Opt("--rounds", min=1, help=HELP["rounds"])] = 3,
    prune: Annotated[bool, Opt("--prune", help=HELP["prune"])] = False,
    min_gain: Annotated[float, Opt("--min-gain", help=HELP["min_gain"])] = 1.02,
    json_output: Annotated[bool, Opt("--json", help=HELP["check_json"])] = False,
) -> None:
    """Time each tuning record against its kernel's rule-based schedule on this machine.

    A record wins where it was tuned; a set shipped for a whole ISA profile may lose on another
    microarchitecture. With --prune, only the records that win here too are kept.
    """
    from tvmdeploy.compiler.tuning import shipped_path
    from tvmdeploy.compiler.tuning.recheck import prune as prune_records
    from tvmdeploy.compiler.tuning.recheck import recheck
    from tvmdeploy.targets.resolve import resolve_profile

    profile = resolve_profile(target)
    path = records or shipped_path(profile)
    checks = recheck(path, profile, rounds=rounds)
    table = Table(title=f"{path} on this machine ({profile.name})")
    for column in ("kernel", "record ms", "rule-based ms", "gain here", "gain where tuned", ""):
        table.add_column(column, justify="left" if column == "kernel" else "right")
    for c in checks:
        table.add_row(
            c.task,
            f"{c.record_ms:.3f}" if c.record_ms else "failed",
            f"{c.rule_based_ms:.3f}" if c.rule_based_ms else "failed",
            f"{c.gain:.3g}x" if c.gain else "-",
            f"{c.tuned_on_gain:.3g}x" if c.tuned_on_gain else "-",
            "keep" if c.keep(min_gain) else "drop",
        )
    err.print(table)
    if prune:
        dropped = prune_records(path, profile, checks, min_gain)
        err.print(f"kept {len(checks) - dropped} record(s), dropped {dropped}: {path}")
    if json_output:
        _print_json([{**vars(c), "gain": c.gain, "keep": c.keep(min_gain)} for c in checks])


@app.command()
def bench(
    bundle: Annotated[Path, Arg(help=HELP["bundle"])],
    compare: Annotated[str | None, Opt(help=HELP["compare"])] = None,
    batch: Annotated[str, Opt(help=HELP["batch"])] = "1",
    seq: Annotated[str, Opt(help=HELP["seq"])] = "32,128",
    warmup: Annotated[int, Opt(help=HELP["warmup"])] = 5,
    runs: Annotated[int, Opt(help=HELP["runs"])] = 30,
    artifact: Annotated[str | None, Opt(help=HELP["artifact"])] = None,
    torch_model: Annotated[Path | None, Opt(help=HELP["torch_model"])] = None,
    json_out: Annotated[Path | None, Opt("--json", help=HELP["bench_json"])] = None,
    rpc: Annotated[str | None, Opt("--rpc", help=HELP["bench_rpc"])] = None,
    rpc_key: Annotated[str | None, Opt("--rpc-key", help=HELP["rpc_key"])] = None,
    rpc_timeout: Annotated[float, Opt("--rpc-timeout", help=HELP["rpc_timeout"])] = 600.0,
    precision: Annotated[str, Opt("--precision", help=HELP["bench_precision"])] = "auto",
) -> None:
    """Time the bundle (and baselines) in one process: warm-up, then p50/p90/p99/mean/std and
    sequences per second.

    With --rpc HOST:PORT --rpc-key KEY the artifact runs on the remote device (the least demanding
    one of its arch unless --artifact names one), timed there by TVM's time_evaluator; baselines
    are refused, bench them locally and merge with `tvmdeploy report`.
    """
    _device_side()
    from tvmdeploy.runtime.remote import RpcTarget
    from tvmdeploy.runtime.timing import BenchConfig, run_bench

    remote = RpcTarget.from_options(rpc, rpc_key)
    compare = compare if compare is not None else ("" if remote else "onnxruntime")
    engines = ["tvmdeploy"] + [e.strip() for e in compare.split(",") if e.strip()]
    config = BenchConfig(
        str(bundle),
        engines,
        _ints(batch),
        _ints(seq),
        warmup,
        runs,
        artifact,
        str(torch_model) if torch_model else None,
        rpc,
        rpc_key,
        rpc_timeout,
        precision,
    )
    baselines = [e for e in engines if e != "tvmdeploy"]
    with err.status("benchmarking …") as status:

        def progress(msg: str) -> None:
            status.update(f"benchmarking {msg} …")

        if baselines and not remote:  # tooling: PyTorch / ONNX Runtime beside tvmdeploy
            from tvmdeploy.compiler.tooling.baselines import run_bench_with_baselines

            report = run_bench_with_baselines(config, progress=progress)
        else:
            report = run_bench(config, progress=progress)
    table = Table(title=f"{report.bundle['name']} on {report.device['description']}")
    for column in (
        "engine",
        "batch",
        "seq",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "mean ms",
        "seq/s",
        "max|Δ| vs ORT",
    ):
        table.add_column(column, justify="right" if column != "engine" else "left")
    for r in report.results:
        label = f"{r.engine} ({r.artifact})" if r.artifact else r.engine
        table.add_row(
            label,
            str(r.batch),
            str(r.seq),
            f"{r.p50_ms:.2f}",
            f"{r.p90_ms:.2f}",
            f"{r.p99_ms:.2f}",
            f"{r.mean_ms:.2f}",
            f"{r.throughput_per_s:.1f}",
            f"{r.parity['max_abs_diff']:.1e}",
        )
    out.print(table)
    out.print(f"choice: {report.bundle['choice']}")
    if json_out:
        report.write(json_out)
        out.print(f"wrote {json_out}")


def _generator(bundle: Path, artifact: str | None, prefix_cache: bool = False):
    from tvmdeploy.runtime import load
    from tvmdeploy.runtime.errors import InputError

    model = load(bundle, artifact=artifact, prefix_cache=prefix_cache)
    if model.task != "text-generation":
        raise InputError(
            f"{bundle}: a {model.task} bundle; generate and chat take a generation bundle "
            "(compile a causal LM); use `tvmdeploy predict` style calls through load() instead"
        )
    return model


# The options `generate` and `chat` share (their defaults are given where each is declared).
GenerationBundle = Annotated[Path, Arg(help=HELP["gen_bundle"])]
MaxNewTokens = Annotated[int, Opt("--max-new-tokens", help=HELP["max_new_tokens"])]
Temperature = Annotated[float, Opt(help=HELP["temperature"])]
TopK = Annotated[int, Opt("--top-k", help=HELP["top_k"])]
TopP = Annotated[float, Opt("--top-p", help=HELP["top_p"])]
RepetitionPenalty = Annotated[float, Opt("--repetition-penalty", help=HELP["repetition_penalty"])]
Seed = Annotated[int | None, Opt(help=HELP["seed"])]
System = Annotated[str | None, Opt(help=HELP["system"])]
ArtifactName = Annotated[str | None, Opt(help=HELP["artifact"])]


def _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed) -> dict:
    return {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "stop": stop or None,
        "seed": seed,
    }


@app.command()
def generate(
    bundle: GenerationBundle,
    prompt: Annotated[str, Arg(help=HELP["prompt"])],
    max_new_tokens: MaxNewTokens = 128,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    stop: Annotated[list[str] | None, Opt("--stop", help=HELP["stop"])] = None,
    seed: Seed = None,
    chat_template: Annotated[bool, Opt("--chat", help=HELP["chat_template"])] = False,
    system: System = None,
    artifact: ArtifactName = None,
    no_stream: Annotated[bool, Opt("--no-stream", help=HELP["no_stream"])] = False,
    json_output: Annotated[bool, Opt("--json", help=HELP["generate_json"])] = False,
) -> None:
    """Generate text from PROMPT with a generation bundle, streamed as it comes."""
    _device_side()
    generator = _generator(bundle, artifact)
    options = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed)
    if chat_template or system:
        messages = [{"role": "system", "content": system}] if system else []
        request = {"messages": [*messages, {"role": "user", "content": prompt}]}
    else:
        request = {"prompt": prompt}
    if json_output or no_stream:
        result = generator.generate(**request, **options)
    else:
        with generator.generate(**request, **options, stream=True) as stream:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        result = stream.result
    if json_output:
        _print_json({"artifact": generator.choice.artifact, **result.to_dict()})
        return
    if no_stream:
        out.print(result.text, markup=False, highlight=False)
    err.print(
        f"[dim]{result.prompt_tokens} prompt + {result.completion_tokens} new tokens "
        f"({result.finish_reason}); first token after {result.time_to_first_token_ms:.0f} ms "
        f"(prefill {result.prefill_tokens_per_s:.0f} tok/s), decode "
        f"{result.decode_tokens_per_s:.1f} tok/s on {generator.choice.artifact}[/dim]"
    )


def _fit_context(generator, messages: list[dict]) -> list[dict]:
    """The history with its oldest turns dropped until the prompt fits the context with room to
    answer (the system message stays); a turn too long on its own is dropped, with a message."""
    from tvmdeploy.runtime.errors import InputError

    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    while turns:
        try:
            if len(generator.prompt_ids(None, system + turns)) < generator.context_length - 1:
                break
        except InputError:
            pass
        turns = turns[1:]
    if not turns:
        err.print(
            f"[yellow]that message does not fit the context of {generator.context_length} "
            "tokens; shorten it[/yellow]"
        )
    return system + turns


@app.command()
def chat(
    bundle: GenerationBundle,
    system: System = None,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    artifact: ArtifactName = None,
) -> None:
    """Chat with a generation bundle on the terminal: one line per turn, the history kept in the
    model's chat template (oldest turns dropped when it outgrows the context); Ctrl-C stops the
    current answer and keeps the session; an empty line or Ctrl-D ends it. Each turn prefills
    only what the KV cache lacks of the history (the prefix cache)."""
    _device_side()
    generator = _generator(bundle, artifact, prefix_cache=True)
    options = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, None, seed)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        messages = _fit_context(generator, messages)
        if not messages or messages[-1]["role"] != "user":  # even this turn alone does not fit
            continue
        with generator.chat(messages, **options, stream=True) as stream:
            try:
                for piece in stream:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:  # Ctrl-C ends this answer, not the session
                err.print("[dim](stopped)[/dim]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        answer = stream.result.text if stream.result else stream.text_so_far
        messages.append({"role": "assistant", "content": answer})


@app.command()
def inspect(
    bundle: Annotated[Path, Arg(help=HELP["bundle"])],
    json_output: Annotated[bool, Opt("--json", help=HELP["inspect_json"])] = False,
    check: Annotated[bool, Opt("--check", help=HELP["check"])] = False,
) -> None:
    """Show a bundle's manifest: model, buckets, artifacts with parity, tuning and latency."""
    _device_side()
    from tvmdeploy.runtime import Bundle, probe
    from tvmdeploy.runtime.parity import parity_summary
    from tvmdeploy.runtime.probe import missing_requirements

    b = Bundle(bundle)
    if check:
        b.verify()
    if json_output:
        out.print_json(json.dumps(b.manifest))
        return
    m = b.manifest
    model = m["model"]
    out.print(
        f"[bold]{b.name}[/bold]  ({b.path})  format v{m['format_version']}, created "
        f"{m.get('created')}"
    )
    out.print(
        f"  task {model.get('task')}, {model.get('model_type')}, vocab {model['vocab_size']}, "
        f"labels {model.get('id2label') or '-'}"
    )
    out.print(
        f"  inputs {[i['name'] for i in b.inputs]} → outputs {[o['name'] for o in b.outputs]}"
    )
    out.print(f"  buckets (batch x seq): {', '.join(f'{x.batch}x{x.seq}' for x in b.buckets)}")
    out.print("  tools: " + ", ".join(f"{k} {v}" for k, v in m.get("tools", {}).items()))
    if m.get("export_parity"):
        p = m["export_parity"]
        tolerance = p["tolerance"]  # a number, or the generation gate's {logits_atol, ...}
        tolerance = tolerance.get("logits_atol") if isinstance(tolerance, dict) else tolerance
        out.print(
            f"  export parity: ONNX Runtime vs PyTorch max abs diff {p['max_abs_diff']:.2e} (tol "
            f"{tolerance})" + ("" if p.get("ok", True) else " FAILED: export left out")
        )
    if check:
        out.print(f"  checksums: all {len(m['files'])} files ok")
    out.print(f"  signature: {b.signature.describe()}")
    device = probe()
    table = Table(title="artifacts")
    for column in (
        "profile",
        "target",
        "code",
        "tuning",
        "parity",
        "latency p50 (build host)",
        "runs here",
    ):
        table.add_column(column)
    entries = {e.get("name"): e for e in m["artifacts"]}
    for a in b.artifacts:
        ptext = parity_summary(a.parity)
        against_ort = entries.get(a.name, {}).get("parity_onnxruntime")  # generation bundles
        if against_ort:
            ptext += f"; vs ONNX Runtime: {parity_summary(against_ort)}"
        lat = (
            ", ".join(f"{e['batch']}x{e['seq']}: {e['p50_ms']:.1f} ms" for e in a.latency[:4])
            or "-"
        )
        missing = missing_requirements(a.requires, device)
        table.add_row(
            a.name,
            json.dumps(a.target),
            a.code_form,
            str(a.tuning.get("trials", 0)) + " trials",
            ptext,
            lat,
            "yes" if not missing else "no: " + "; ".join(missing),
        )
    out.print(table)


@app.command()
def targets(
    json_output: Annotated[bool, Opt("--json", help=HELP["targets_json"])] = False,
) -> None:
    """List the target profiles (targets/*.toml) and whether this machine can run each."""
    _device_side()
    from tvmdeploy import targets as target_profiles
    from tvmdeploy.runtime import probe
    from tvmdeploy.runtime.probe import missing_requirements

    device = probe()
    profiles = target_profiles.all_profiles()
    if json_output:
        _print_json(
            [
                p.to_dict() | {"runs_here": not missing_requirements(p.requires, device)}
                for p in profiles
            ]
        )
        return
    table = Table(title=f"target profiles (this machine: {device.description})")
    for column in ("name", "description", "TVM target", "requires", "runs here"):
        table.add_column(column)
    for p in profiles:
        missing = missing_requirements(p.requires, device)
        req = ", ".join(p.requires.get("cpu_features", [])) or f"sm_{p.requires.get('cuda_arch')}"
        runs = "yes" if not missing else "no: " + "; ".join(missing)
        table.add_row(p.name, p.description, json.dumps(p.target), req, runs)
    out.print(table)


@app.command()
def demo(
    work_dir: Annotated[Path, Opt(help=HELP["work_dir"])] = Path("build/demo"),
    target: Annotated[str, Opt("-t", "--target", help=HELP["demo_profile"])] = "host",
    epochs: Annotated[float, Opt(help=HELP["epochs"])] = 1.0,
    json_output: Annotated[bool, Opt("--json", help=HELP["demo_json"])] = False,
    generation: Annotated[bool, Opt("--generation/--no-generation", help=HELP["demo_gen"])] = True,
) -> None:
    """Fine-tune the packaged all-MiniLM-L6-v2 on VADER movie reviews, compile, verify, classify
    and compare; then compile SmolLM2-135M-Instruct and stream two answers."""
    from tvmdeploy.compiler.drivers.demo import run_demo

    summary = run_demo(work_dir, target, epochs, generation)
    if json_output:
        _print_json(summary)
        return
    seqs = list(summary["rows"][0]["latency_ms"])
    table = Table(title=f"minilm-sentiment on {summary['device']} (batch 1)")
    table.add_column("engine")
    table.add_column(f"accuracy (n={summary['held_out']})", justify="right")
    table.add_column("agrees with fp32", justify="right")
    for seq in seqs:
        table.add_column(f"seq {seq} p50 ms", justify="right")
        table.add_column(f"seq {seq} p90 ms", justify="right")
    table.add_column("vs ORT (seq 128 p50)", justify="right")
    for row in summary["rows"]:
        cells = [f"{row['accuracy']:.2%}", f"{row['agreement']:.2%}"]
        for seq in seqs:
            cells += [
                f"{row['latency_ms'][seq]['p50']:.2f}",
                f"{row['latency_ms'][seq]['p90']:.2f}",
            ]
        table.add_row(row["engine"], *cells, f"{row['vs_onnxruntime_seq128']:.2f}x")
    out.print(table)
    if summary.get("generation"):
        generated = summary["generation"]
        table = Table(title=f"{generated['model']}, greedy, batch 1 ({generated['choice']})")
        for column in ("engine", "time to first token ms", "decode tokens/s", "vs tvmdeploy"):
            table.add_column(column, justify="left" if column == "engine" else "right")
        for row in generated["rows"]:
            table.add_row(
                row["engine"],
                f"{row['ttft_ms']:.1f}",
                f"{row['decode_tokens_per_s']:.2f}",
                f"{row['decode_vs_tvmdeploy']:.2f}x",
            )
        out.print(table)


@app.command()
def report(
    files: Annotated[list[Path], Arg(help=HELP["bench_files"])],
    output: Annotated[Path | None, Opt("-o", "--output", help=HELP["html"])] = None,
    md: Annotated[Path | None, Opt("--md", help=HELP["md"])] = None,
    json_output: Annotated[bool, Opt("--json", help=HELP["report_json"])] = False,
) -> None:
    """Merge bench JSONs from any number of devices into Markdown tables and one HTML page with
    plots.

    Tables per device × engine × batch × seq give p50/p90/p99, throughput, and the speed-up over
    ONNX Runtime and over PyTorch on the same device (baseline p50 ÷ engine p50, where that
    baseline was measured). The HTML page is self-contained and plots latency by device and
    engine, the speed-ups, and latency against sequence length. With neither -o, --md nor --json,
    the Markdown is printed.

    Example: tvmdeploy report x86.json arm.json -o report.html --md report.md
    """
    _device_side()
    from tvmdeploy.compiler.tooling.report import build_report

    written = []
    merged = build_report(files)
    if output:
        written.append(merged.write_html(output))
    if md:
        written.append(merged.write_markdown(md))
    if json_output:
        _print_json(merged.to_rows())
    elif not written:
        sys.stdout.write(merged.markdown())
    for path in written:
        (err if json_output else out).print(f"wrote {path}")


@app.command()
def keygen(
    private_key: Annotated[Path, Arg(help=HELP["private_key"])],
    public_key: Annotated[Path | None, Opt("--public", help=HELP["public_key_out"])] = None,
) -> None:
    """Make an Ed25519 key pair for signing bundles; devices trust the public key."""
    _device_side()
    from tvmdeploy.runtime.signing import generate_keypair

    private, public, key = generate_keypair(private_key, public_key)
    out.print(
        f"key {key}: private {private} (keep it secret), public {public} (give it to devices)"
    )


@app.command()
def sign(
    bundle: Annotated[Path, Arg(help=HELP["bundle"])],
    key: Annotated[Path, Opt("--key", help=HELP["sign_key"])],
) -> None:
    """Sign BUNDLE's manifest (which holds every file's sha256) with an Ed25519 private key."""
    _device_side()
    from tvmdeploy.runtime import Bundle
    from tvmdeploy.runtime.signing import sign_bundle

    Bundle(bundle).verify()  # sign only what is whole
    record = sign_bundle(bundle, key)
    out.print(f"signed {bundle} with key {record['key_id']}")


@app.command("verify")
def verify_cmd(
    bundle: Annotated[Path, Arg(help=HELP["bundle"])],
    key: Annotated[list[str] | None, Opt("--key", help=HELP["verify_keys"])] = None,
    json_output: Annotated[bool, Opt("--json", help=HELP["verify_json"])] = False,
) -> None:
    """Check BUNDLE here: its signature, every file's checksum, and the parity of every artifact
    this device can run against ONNX Runtime. Exits 1 when any check fails."""
    _device_side()
    from tvmdeploy.runtime.check import all_ok, check_bundle

    rows = check_bundle(bundle, key or [])
    if json_output:
        _print_json([row.to_dict() for row in rows])
    else:
        table = Table(title=f"verify {bundle}")
        for column in ("check", "status", "detail"):
            table.add_column(column)
        style = {"ok": "green", "failed": "bold red", "not-run": "yellow"}
        for row in rows:
            table.add_row(row.what, f"[{style[row.status]}]{row.status}[/]", row.detail)
        out.print(table)
    if not all_ok(rows):
        raise typer.Exit(1)


@app.command()
def serve(
    bundles: Annotated[list[str], Arg(help=HELP["serve_bundles"])],
    host: Annotated[str, Opt("--host", help=HELP["host"])] = "127.0.0.1",
    port: Annotated[int, Opt("--port", help=HELP["port"])] = 8000,
    precision: Annotated[str, Opt("--precision", help=HELP["serve_precision"])] = "auto",
    max_batch_delay_ms: Annotated[
        float, Opt("--max-batch-delay-ms", help=HELP["max_batch_delay_ms"])
    ] = 2.0,
    max_queue: Annotated[int, Opt("--max-queue", help=HELP["max_queue"])] = 256,
    api_key: Annotated[
        str | None, Opt("--api-key", envvar="TVMDEPLOY_API_KEY", help=HELP["api_key"])
    ] = None,
    trusted_key: Annotated[list[str] | None, Opt("--trusted-key", help=HELP["trusted_key"])] = None,
    ray_address: Annotated[str | None, Opt("--ray", help=HELP["serve_ray"])] = None,
    replicas: Annotated[int, Opt("--replicas", help=HELP["replicas"])] = 2,
    replica_cpus: Annotated[float, Opt("--replica-cpus", help=HELP["replica_cpus"])] = 1.0,
    prefix_cache: Annotated[
        bool, Opt("--prefix-cache/--no-prefix-cache", help=HELP["prefix_cache"])
    ] = True,
) -> None:
    """Serve bundles over HTTP: KServe v2 (JSON and binary tensors), /v2/models/NAME/predict with
    texts, OpenAI /v1/embeddings, Prometheus /metrics. SIGTERM drains requests in flight. With
    --ray, N replicas on a Ray cluster behind Ray Serve's proxy, on the same routes."""
    _device_side()
    options = {
        "host": host,
        "port": port,
        "precision": precision,
        "max_batch_delay_ms": max_batch_delay_ms,
        "max_queue": max_queue,
        "api_key": api_key,
        "trusted_keys": trusted_key,
        "prefix_cache": prefix_cache,
    }
    if ray_address is None:
        from tvmdeploy.runtime.serve import serve as serve_bundles

        serve_bundles(bundles, **options)
        return
    from tvmdeploy.runtime.errors import OptionError

    try:
        from tvmdeploy.runtime.serve.ray import serve_on_ray
    except ImportError as error:
        raise OptionError(
            f"--ray needs Ray Serve ({error}): pip install 'tvmdeploy[serve-ray]'"
        ) from error
    serve_on_ray(
        bundles, address=ray_address, replicas=replicas, replica_cpus=replica_cpus, **options
    )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
