"""Emulated verification of an aarch64 decoder (text generation): its gate prompts run in the
arm64 Python under qemu-user (qemu.py), one process for all prompts.

The worker (qemu_decoder_worker.py) follows the entry protocol of compiler/decoder/entry.py as the
runtime's Generator does and writes each prompt's prefill logits, greedy tokens and step logits;
the gate compares them with transformers' as it does a native run (decoder/parity.py `compare`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .qemu import EM_AARCH64, ArmPython, elf_machine, find_arm64_python, run_worker

WORKER = Path(__file__).with_name("qemu_decoder_worker.py")


@dataclass
class DecodedPrompt:
    """One prompt as the emulated decoder ran it: what the parity gate compares."""

    prefill_logits: np.ndarray  # [vocab]
    tokens: list[int]  # greedy
    step_logits: np.ndarray  # [len(tokens), vocab]: the logits each token was chosen from


@dataclass
class DecoderRun:
    """Every prompt of one emulated decoder process, or why there are none."""

    cpu: str
    prompts: list[DecodedPrompt] | None  # None when the run failed
    returncode: int
    detail: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.prompts is not None


def run_decoder(
    lib_path: str | Path,
    weights_file: str | Path,
    weight_names: list[str],
    prompts: list[list[int]],
    greedy_tokens: int,
    cpu: str,
    *,
    context_length: int,
    prefill_chunk: int,
    page_size: int = 16,
    arm: ArmPython | None = None,
    timeout: float = 1800,
) -> DecoderRun:
    """Prefill each prompt (token ids) of an aarch64 decoder `lib_path`, then `greedy_tokens`
    greedy tokens, in one emulated process (qemu_decoder_worker.py; the entry protocol of
    compiler/decoder/entry.py). The weights are read from the bundle's param file as they are;
    a crash (SIGILL …) or a timeout comes back as a failed run, not an error."""
    arm = arm or find_arm64_python()
    machine = elf_machine(lib_path)
    if machine != EM_AARCH64:
        return DecoderRun(
            cpu, None, 0, f"{lib_path} is not an aarch64 library (ELF machine {machine})", 0.0
        )
    with tempfile.TemporaryDirectory(prefix="tvmdeploy-qemu-") as tmp:
        work = Path(tmp)
        spec = {
            "weights_file": str(Path(weights_file).resolve()),
            "weight_names": list(weight_names),
            "context_length": int(context_length),
            "prefill_chunk": int(prefill_chunk),
            "page_size": int(page_size),
            "cases": [
                {"prompt": [int(t) for t in p], "greedy_tokens": int(greedy_tokens)}
                for p in prompts
            ],
        }
        (work / "spec.json").write_text(json.dumps(spec))
        done = run_worker(arm, WORKER, lib_path, work, cpu, timeout)
        if done.detail:
            return DecoderRun(cpu, None, done.returncode, done.detail, done.seconds)
        with np.load(work / "outputs.npz") as saved:
            decoded = [
                DecodedPrompt(
                    saved[f"c{k}.prefill"],
                    [int(t) for t in saved[f"c{k}.tokens"]],
                    saved[f"c{k}.steps"],
                )
                for k in range(len(prompts))
            ]
    return DecoderRun(cpu, decoded, 0, "", done.seconds)
