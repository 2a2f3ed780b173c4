"""Where one decode step's time goes: per-kernel time (the Relax VM's instrument hook), the raw
step split into its parts (begin_forward, the ids upload, the VM call, end_forward, the logits
copy, sampling), and the Generator's own step time, so the per-token overhead is measured on its
own (issue 28).

    python bench/decode_profile.py BUNDLE --precision int8 --context 32
    python bench/decode_profile.py BUNDLE --context 512 --json profile.json
    python bench/decode_profile.py BUNDLE --precision int8 --prefill 512

`--prefill N` profiles the prefill of an N-token prompt instead (one `prefill` call, a fresh
sequence each time; the median of `--steps` calls): wall time and tokens/s, then the same split
per kernel, and the kernels grouped into GEMMs, attention and the rest.

One sequence decodes `--steps` tokens after a `--context`-token prompt of fixed ids. The median of
the steps is reported (the machine may be shared). The instrumented pass adds a few microseconds
of Python per VM call, so its kernel times sum to more than the raw step.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PARTS = ("begin_forward", "upload", "vm_call", "end_forward", "logits_copy", "sampling")


def _engine(generator):
    """A second step engine on the generator's artifact (its own VM and cache, this thread)."""
    from tvmdeploy.runtime.decode_tvm import TvmDecoder
    from tvmdeploy.runtime.probe import probe

    return TvmDecoder(generator.bundle, generator.choice.artifact, probe(), 1)


def _prompt(context: int, vocab: int) -> list[int]:
    return [(7 * k + 3) % vocab for k in range(context)]


def raw_steps(engine, prompt: list[int], steps: int) -> dict[str, float]:
    """Median milliseconds of each part of a decode step, called as the runtime calls them."""
    import numpy as np
    from tvmdeploy.runtime.sampling import Sampler, SamplingParams

    tvm, fn, s = engine._tvm, engine._fn, engine._shape
    sampler = Sampler(SamplingParams())
    engine.open()
    engine.add_sequence(0)
    token = sampler(engine.prefill_whole(0, np.array(prompt)))
    times: dict[str, list[float]] = {p: [] for p in PARTS}
    function = engine.step_function(1)
    for _ in range(steps):
        t0 = time.perf_counter()
        fn["begin_forward"](engine._cache, s([0]), s([1]))
        t1 = time.perf_counter()
        ids = tvm.runtime.tensor(np.array([[token]], dtype=np.int32), engine.device)
        t2 = time.perf_counter()
        logits = engine.vm[function](ids, engine._cache, *engine.params)
        t3 = time.perf_counter()
        fn["end_forward"](engine._cache)
        t4 = time.perf_counter()
        row = np.from_dlpack(logits[0] if not hasattr(logits, "numpy") else logits).reshape(-1)
        t5 = time.perf_counter()
        token = sampler.pick(row, lambda: None)
        t6 = time.perf_counter()
        for part, a, b in zip(PARTS, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6)):
            times[part].append((b - a) * 1e3)
    engine.remove_sequence(0)
    out = {p: statistics.median(v) for p, v in times.items()}
    out["step"] = sum(out.values())
    return out


def recorder() -> tuple:
    """(instrument, seconds, calls): a VM instrument hook adding each called function's wall
    time and call count to the two counters."""
    seconds: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    start = [0.0]

    def instrument(_func, symbol, before_run, _ret, *_args):
        if before_run:
            start[0] = time.perf_counter()
        else:
            seconds[symbol] += time.perf_counter() - start[0]
            calls[symbol] += 1
        return 0

    return instrument, seconds, calls


def prefill_seconds(engine, prompt) -> float:
    """Wall seconds of one prefill of `prompt` into a fresh sequence (removed afterwards), in the
    engine's chunks as the Generator runs it."""
    engine.add_sequence(0)
    t0 = time.perf_counter()
    engine.prefill_whole(0, prompt)
    elapsed = time.perf_counter() - t0
    engine.remove_sequence(0)
    return elapsed


def kernel_times(engine, prompt: list[int], steps: int) -> tuple[dict, dict]:
    """Milliseconds per step and calls per step of each VM-called function (instrumented)."""
    import numpy as np

    instrument, seconds, calls = recorder()
    engine.open()
    engine.add_sequence(0)
    engine.prefill_whole(0, np.array(prompt))
    engine.vm.set_instrument(instrument)
    for _ in range(steps):
        engine.decode([0], np.array([1]))
    engine.vm.set_instrument(lambda *_a: 0)
    engine.remove_sequence(0)
    ms = {k: v * 1e3 / steps for k, v in seconds.most_common()}
    return ms, {k: calls[k] // steps for k in ms}


def generator_step(generator, prompt: list[int], steps: int) -> dict[str, float]:
    """Milliseconds per decoded token through `Generator.generate` (greedy, batch 1): the step
    (decode time over the tokens), the engine's `decode` call within it (median), and the
    stepping thread's own time between two calls (median: sampling, the token's queue, the
    loop). Measured in the same run, so a shared machine's drift between runs does not show up
    as overhead."""
    engine = generator._stepper.engine
    calls: list[tuple[float, float]] = []
    decode = engine.decode

    def timed(*args, **kwargs):
        start = time.perf_counter()
        rows = decode(*args, **kwargs)
        calls.append((start, time.perf_counter()))
        return rows

    engine.decode = timed
    try:
        result = generator.generate(prompt, max_new_tokens=steps + 1, ignore_eos=True)
    finally:
        del engine.decode  # the bound method again
    return {
        "step": result.decode_ms / max(1, result.completion_tokens - 1),
        "decode_call": statistics.median(b - a for a, b in calls) * 1e3,
        "between_calls": statistics.median(
            later[0] - earlier[1] for earlier, later in itertools.pairwise(calls)
        )
        * 1e3,
    }


def profile(bundle: Path, precision: str, context: int, steps: int) -> dict:
    from tvmdeploy.runtime import load

    generator = load(bundle, precision=precision)
    prompt = _prompt(context, generator.vocab_size)
    engine = _engine(generator)
    raw_steps(engine, prompt, 3)  # warm-up
    raw = raw_steps(engine, prompt, steps)
    kernels, calls = kernel_times(engine, prompt, min(steps, 8))
    generator_step(generator, prompt, 3)  # warm-up
    gen = generator_step(generator, prompt, steps)
    return {
        "bundle": str(bundle),
        "artifact": generator.choice.artifact,
        "context": context,
        "steps": steps,
        "step_function": engine.step_function(1),
        "raw_step_ms": raw,
        "generator_step_ms": gen["step"],
        "generator_decode_call_ms": gen["decode_call"],
        "stepping_thread_ms": gen["between_calls"],
        "raw_tokens_per_s": 1e3 / raw["step"],
        "generator_tokens_per_s": 1e3 / gen["step"],
        "vm_calls_per_step": sum(calls.values()),
        "kernels_ms": kernels,
        "kernel_calls": calls,
    }


#: Kernel-name fragments of each group in a prefill profile (the first that matches wins).
GROUPS = (
    ("attention", ("attention", "attn", "tree_", "rope", "kv_cache", "append", "copy_single")),
    ("gemm", ("matmul", "gemm", "dequantize", "quantize", "pack")),
)


def _group(name: str) -> str:
    lowered = name.lower()
    for group, parts in GROUPS:
        if any(part in lowered for part in parts):
            return group
    return "rest"


def prefill_profile(bundle: Path, precision: str, tokens: int, calls: int) -> dict:
    """Wall time of a `tokens`-token prefill (median of `calls`) and its per-kernel split."""
    import numpy as np
    from tvmdeploy.runtime import load

    generator = load(bundle, precision=precision)
    engine = _engine(generator)
    prompt = np.array(_prompt(tokens, generator.vocab_size))
    engine.open()

    prefill_seconds(engine, prompt)  # warm-up
    wall = statistics.median(prefill_seconds(engine, prompt) for _ in range(calls))
    instrument, seconds, counts = recorder()
    engine.vm.set_instrument(instrument)
    for _ in range(calls):
        prefill_seconds(engine, prompt)
    engine.vm.set_instrument(lambda *_a: 0)
    kernels = {k: v * 1e3 / calls for k, v in seconds.most_common()}
    groups: collections.Counter = collections.Counter()
    for name, ms in kernels.items():
        groups[_group(name)] += ms
    return {
        "bundle": str(bundle),
        "artifact": generator.choice.artifact,
        "prefill_tokens": tokens,
        "calls": calls,
        "prefill_ms": wall * 1e3,
        "prefill_tokens_per_s": tokens / wall,
        "groups_ms": dict(groups.most_common()),
        "kernels_ms": kernels,
        "kernel_calls": {k: counts[k] // calls for k in kernels},
    }


def _print_prefill(report: dict, top: int) -> None:
    print(f"{report['bundle']} [{report['artifact']}] prefill {report['prefill_tokens']} tokens")
    print(f"  {report['prefill_ms']:.1f} ms ({report['prefill_tokens_per_s']:.1f} tok/s)")
    total = sum(report["groups_ms"].values())
    print(
        "  instrumented, ms/prefill: "
        + "  ".join(
            f"{g} {ms:.1f} ({100 * ms / total:.0f}%)" for g, ms in report["groups_ms"].items()
        )
    )
    for name, ms in list(report["kernels_ms"].items())[:top]:
        print(f"    {ms:8.3f}  x{report['kernel_calls'][name]:<5d} {name}")


def _print(report: dict, top: int) -> None:
    raw = report["raw_step_ms"]
    print(f"{report['bundle']} [{report['artifact']}] context {report['context']}")
    print(f"  raw step {raw['step']:.3f} ms ({report['raw_tokens_per_s']:.1f} tok/s)  ", end="")
    print(f"generator step {report['generator_step_ms']:.3f} ms", end="")
    print(f" ({report['generator_tokens_per_s']:.1f} tok/s)")
    print("  " + "  ".join(f"{p} {raw[p]:.3f}" for p in PARTS))
    print(f"  in the Generator: decode call {report['generator_decode_call_ms']:.3f} ms, ", end="")
    print(f"stepping thread between calls {report['stepping_thread_ms']:.3f} ms; ", end="")
    print(f"{report['vm_calls_per_step']} VM calls/step (instrumented, ms/step):")
    for name, ms in list(report["kernels_ms"].items())[:top]:
        print(f"    {ms:8.3f}  x{report['kernel_calls'][name]:<5d} {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="a generation bundle (.tvmd)")
    parser.add_argument("--precision", default="fp32", help="fp32, int8 or int4 (default fp32)")
    parser.add_argument("--context", type=int, default=32, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=32, help="decode steps measured")
    parser.add_argument("--top", type=int, default=15, help="kernels printed")
    parser.add_argument(
        "--prefill", type=int, metavar="N", help="profile the prefill of an N-token prompt"
    )
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    if args.prefill:
        report = prefill_profile(args.bundle, args.precision, args.prefill, min(args.steps, 5))
        _print_prefill(report, args.top)
    else:
        report = profile(args.bundle, args.precision, args.context, args.steps)
        _print(report, args.top)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
