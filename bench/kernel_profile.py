"""Where one call's time goes, kernel by kernel: tvmdeploy's compiled kernels (the Relax VM's
instrument hook) beside ONNX Runtime's nodes (its own profiler), on the bundle's graph and inputs.

End-to-end ratios say whether we are behind; this says which kernel is. The same layer's nodes
are summed (`layer.3` is reported as `layer.*`), so each row is one kind of kernel per call.

    python bench/kernel_profile.py BUNDLE --shape 8x128
    python bench/kernel_profile.py BUNDLE --shape 1x32 --baselines-isa avx2   # ORT's AVX2 kernels
    python bench/kernel_profile.py BUNDLE --shape 1x128 --json profile.json

The best of `--repeat` calls is reported for each side (the machine may be shared; other load
only adds time). tvmdeploy runs the artifact `load()` picks (or `--artifact`), fp32 unless asked.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LAYER = re.compile(r"(layers?[._/])\d+")
FUSED_COPY = re.compile(r"_token_\d+$")  # ONNX Runtime's name for the n-th node its fusion made


def kernel_group(name: str) -> str:
    """A node or kernel name with its layer index replaced by `*` and ONNX Runtime's fused-node
    counter dropped (one row per kind of kernel)."""
    return FUSED_COPY.sub("", LAYER.sub(r"\1*", name))


def feeds(bundle, input_names: list[str], batch: int, seq: int) -> dict:
    """The inputs of one batch x seq call, as `tvmdeploy bench` makes them (runtime/inputs.py)."""
    from tvmdeploy.runtime.inputs import synthetic_inputs

    return synthetic_inputs(input_names, int(bundle.model["vocab_size"]), batch, seq)


def profile_tvmdeploy(bundle: Path, batch: int, seq: int, repeat: int, artifact=None) -> dict:
    """Per-kernel milliseconds of one VM call of the bundle's bucket for batch x seq."""
    import tvm
    from tvmdeploy.runtime import load

    model = load(bundle, artifact=artifact) if artifact else load(bundle, precision="fp32")
    if model.choice.artifact == "onnxruntime":  # latencies measured earlier favoured ORT; this
        # profiles the compiled kernels, so take the fp32 artifact this device runs
        from tvmdeploy.runtime.precision import canonical

        fp32 = [
            a.name
            for a in model.bundle.artifacts
            if a.name in model.choice.compatible and canonical(a.precision) == canonical("fp32")
        ]
        if not fp32:
            raise SystemExit(f"{bundle}: no compiled fp32 artifact runs on this device to profile")
        model = load(bundle, artifact=fp32[0])
    engine = model.engine
    bucket = next((b for b in model.bundle.buckets if (b.batch, b.seq) == (batch, seq)), None)
    if bucket is None:
        shapes = ", ".join(f"{b.batch}x{b.seq}" for b in model.bundle.buckets)
        raise SystemExit(f"{bundle}: no {batch}x{seq} bucket (it has {shapes})")
    vm = tvm.runtime.vm.VirtualMachine(engine.lib, engine.device)
    inputs = feeds(model.bundle, engine.input_names, batch, seq)
    args = [tvm.runtime.tensor(inputs[n]) for n in engine.input_names] + list(engine.params)
    for _ in range(3):
        vm[bucket.function](*args)
    clock = {
        "start": 0.0,
        "seconds": collections.defaultdict(float),
        "calls": collections.Counter(),
    }

    def instrument(_func, symbol, before_run, _ret, *_args):
        if before_run:
            clock["start"] = time.perf_counter()
        else:
            clock["seconds"][symbol] += time.perf_counter() - clock["start"]
            clock["calls"][symbol] += 1
        return 0

    vm.set_instrument(instrument)
    best = None
    for _ in range(repeat):
        clock["seconds"].clear()
        clock["calls"].clear()
        start = time.perf_counter()
        vm[bucket.function](*args)
        wall = time.perf_counter() - start
        if best is None or wall < best["wall"]:
            best = {"wall": wall, "seconds": dict(clock["seconds"]), "calls": dict(clock["calls"])}
    return {
        "engine": f"tvmdeploy ({model.choice.artifact})",
        "wall_ms": best["wall"] * 1e3,
        "kernels": _rows({k: (v * 1e3, best["calls"][k]) for k, v in best["seconds"].items()}),
    }


def profile_onnxruntime(bundle: Path, batch: int, seq: int, repeat: int, threads: int) -> dict:
    """Per-node milliseconds of one ONNX Runtime call of the bundle's exported graph."""
    import onnxruntime as ort
    from tvmdeploy.runtime.bundle import Bundle

    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(
            str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        names = [i.name for i in session.get_inputs()]
        inputs = {n: a for n, a in feeds(Bundle(bundle), names, batch, seq).items() if n in names}
        for _ in range(3):
            session.run(None, inputs)
        for _ in range(repeat):
            session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    best = min(runs[3:] or runs, key=lambda r: r["dur"])
    totals: dict[str, tuple[float, int]] = {}
    for node in nodes:
        if best["ts"] <= node["ts"] <= best["ts"] + best["dur"]:
            name = f"{node['args']['op_name']} {node['name'][: -len('_kernel_time')]}"
            ms, calls = totals.get(name, (0.0, 0))
            totals[name] = (ms + node["dur"] / 1e3, calls + 1)
    return {
        "engine": f"onnxruntime {ort.__version__}",
        "wall_ms": best["dur"] / 1e3,
        "kernels": _rows(totals),
    }


def _rows(totals: dict[str, tuple[float, int]]) -> list[dict]:
    """Rows grouped by kernel kind, slowest first."""
    grouped: dict[str, list] = {}
    for name, (ms, calls) in totals.items():
        row = grouped.setdefault(kernel_group(name), [0.0, 0])
        row[0] += ms
        row[1] += calls
    rows = [{"kernel": k, "ms": v[0], "calls": v[1]} for k, v in grouped.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def markdown(report: dict, top: int) -> str:
    lines = [f"{report['bundle']} at {report['shape']}, {report['threads']} threads"]
    for side in report["profiles"]:
        kernels = sum(r["ms"] for r in side["kernels"])
        lines += [
            "",
            f"{side['engine']}: {side['wall_ms']:.2f} ms per call, {kernels:.2f} ms in kernels",
            "",
            "| kernel | calls | ms | share |",
            "|---|---:|---:|---:|",
        ]
        for row in side["kernels"][:top]:
            share = row["ms"] / kernels if kernels else 0.0
            lines.append(f"| {row['kernel']} | {row['calls']} | {row['ms']:.3f} | {share:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--shape", default="1x128", help="batch x seq of a bucket (default 1x128)")
    parser.add_argument("--artifact", help="the artifact to profile (default: what load() picks)")
    parser.add_argument("--repeat", type=int, default=10, help="calls per side; the best is kept")
    parser.add_argument("--top", type=int, default=15, help="rows per table")
    parser.add_argument("--no-ort", action="store_true", help="profile tvmdeploy only")
    parser.add_argument(
        "--baselines-isa",
        choices=["avx2"],
        help="run ONNX Runtime limited to this ISA, as on a CPU without AVX-512 (isa_limit.py)",
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()

    from bench import isa_limit

    if args.baselines_isa and isa_limit.limited_isa() is None:
        with tempfile.TemporaryDirectory(prefix="isa-limit-") as tmp:
            env = {**os.environ, **isa_limit.limited_environment(args.baselines_isa, Path(tmp))}
            sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))
    isa = isa_limit.limited_isa()
    threads = int(os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1)))
    batch, seq = (int(v) for v in args.shape.lower().split("x"))
    profiles = [profile_tvmdeploy(args.bundle, batch, seq, args.repeat, args.artifact)]
    if not args.no_ort:
        profiles.append(profile_onnxruntime(args.bundle, batch, seq, args.repeat, threads))
        if isa:
            profiles[-1]["engine"] += f" (limited to {isa})"
    report = {
        "bundle": args.bundle.name,
        "shape": f"{batch}x{seq}",
        "threads": threads,
        "profiles": profiles,
    }
    print(markdown(report, args.top))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
