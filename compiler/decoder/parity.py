"""The parity gate of a generation artifact: its logits and greedy tokens against two references.

The references, each computed once per prompt: the PyTorch model transformers loads from the
folder (fp32), and the bundle's ONNX export on ONNX Runtime (the runtime's own ORT engine,
runtime/decode_onnx.py), on a fixed set of prompts. The export is itself first compared with
transformers the same way (`export_parity`). Two checks per artifact and reference, on the
artifact's one run through the runtime's own `Generator` on the staged bundle:
- prefill logits after each prompt, max abs diff within the tolerance;
- GREEDY_TOKENS greedy tokens after each prompt, identical. Where they part, the step counts as a
  tie (and the comparison of that prompt ends there) only if the reference's two best logits at
  that step lie within TIE_MARGIN and the artifact took the reference's second: two fp32
  summation orders may rank a near-tie either way, and the texts differ from there on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GREEDY_TOKENS = 32
#: fp32 over tens of layers: a different summation order moves logits by ~1e-4 (30 layers of
#: SmolLM2: 1.5e-4 at logits of ~30); 2e-3 keeps a real margin over that while any wrong op,
#: weight or mask shows as O(0.1) or more.
LOGITS_TOLERANCE = 2e-3
TIE_MARGIN = 2e-3
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
)


@dataclass
class ReferenceCase:
    """One prompt as transformers runs it: the prefill logits, and each greedy step's logits."""

    prompt: list[int]
    prefill_logits: np.ndarray  # [vocab]
    tokens: list[int]
    step_logits: list[np.ndarray]  # the logits each greedy token was chosen from


def prompt_ids(model_dir: Path, vocab_size: int) -> list[list[int]]:
    """The gate's prompts as token ids: the texts through the model's tokenizer, or seeded
    random ids where the folder has none."""
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        found = [tokenizer.encode(text).ids for text in PROMPTS]
        if all(found):
            return found
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in (5, 11, 17)]


def reference_cases(model_dir: Path, prompts: list[list[int]]) -> list[ReferenceCase]:
    """Greedy decoding by transformers (its KV cache), keeping every step's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    cases = []
    with torch.inference_mode():
        for prompt in prompts:
            out = model(torch.tensor([prompt]), use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1].numpy()
            prefill, tokens, steps = logits.copy(), [], []
            for _ in range(GREEDY_TOKENS):
                steps.append(logits.copy())
                tokens.append(int(logits.argmax()))
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[0, -1].numpy()
            cases.append(ReferenceCase(prompt, prefill, tokens, steps))
    return cases


def onnx_reference_cases(onnx_path: Path, prompts: list[list[int]], context: int):
    """Greedy decoding by ONNX Runtime on the export (its past key/values), every step's logits
    kept: the runtime's ORT engine, driven directly."""
    from tvmdeploy.runtime.decode_onnx import OnnxDecoder

    engine = OnnxDecoder(onnx_path, context, max_sequences=1)
    cases = []
    for seq_id, prompt in enumerate(prompts):
        engine.add_sequence(seq_id)
        logits = engine.prefill(seq_id, np.array(prompt))
        prefill, tokens, steps = logits.copy(), [], []
        for _ in range(GREEDY_TOKENS):
            steps.append(logits.copy())
            tokens.append(int(logits.argmax()))
            logits = engine.decode([seq_id], np.array([tokens[-1]]))[0]
        engine.remove_sequence(seq_id)
        cases.append(ReferenceCase(prompt, prefill, tokens, steps))
    return cases


#: What each reference is called in the records and messages.
TRANSFORMERS = "transformers (PyTorch, fp32)"
ONNXRUNTIME = "onnxruntime (the bundle's model.onnx, fp32)"


@dataclass
class Observed:
    """One prompt as an artifact ran it (natively or emulated): what `compare` checks."""

    prefill_logits: np.ndarray  # [vocab]
    tokens: list[int]  # greedy


def observe(generator, prompts: list[list[int]]) -> tuple[list[Observed], float]:
    """One artifact run here on the gate's prompts, through the runtime's `Generator`: what each
    reference is compared with, and the median decode tokens/s."""
    observed, decode_rates = [], []
    for prompt in prompts:
        logits = generator.prefill_logits(prompt)
        result = generator.generate(prompt, max_new_tokens=GREEDY_TOKENS, ignore_eos=True)
        decode_rates.append(result.decode_tokens_per_s)
        observed.append(Observed(logits, list(result.token_ids)))
    return observed, round(float(np.median(decode_rates)), 2) if decode_rates else 0.0


def as_observed(cases: list[ReferenceCase]) -> list[Observed]:
    """A reference's own run, to compare with another reference (the export's parity)."""
    return [Observed(case.prefill_logits, case.tokens) for case in cases]


def compare(
    cases: list[ReferenceCase], observed: list[Observed], where: str, against: str = TRANSFORMERS
) -> dict[str, Any]:
    """The parity record of an artifact's runs of the reference prompts, wherever they ran
    (`where`: native, qemu:<cpu>): prefill logits within LOGITS_TOLERANCE, greedy tokens
    identical up to the first near-tie (the module docstring). Fewer greedy tokens than the
    reference's are compared as far as they go (`greedy.compared` says how many)."""
    worst = 0.0
    agreed = compared = ties = 0
    failures = []
    for k, (case, run) in enumerate(zip(cases, observed, strict=True)):
        worst = max(worst, float(np.abs(run.prefill_logits - case.prefill_logits).max()))
        for step, (got, want) in enumerate(zip(run.tokens, case.tokens, strict=False)):
            compared += 1
            if got == want:
                agreed += 1
                continue
            ranked = np.argsort(-case.step_logits[step])
            margin = float(case.step_logits[step][ranked[0]] - case.step_logits[step][ranked[1]])
            if got == int(ranked[1]) and margin <= TIE_MARGIN:
                ties += 1
            else:
                failures.append(
                    f"prompt {k} step {step}: token {got}, {against.split()[0]} {want} "
                    f"(its top-2 margin {margin:.2e})"
                )
            break
    ok = worst <= LOGITS_TOLERANCE and not failures
    return {
        "ok": ok,
        "where": where,
        "against": against,
        "max_abs_diff": worst,
        "tolerance": {"logits_atol": LOGITS_TOLERANCE, "tie_margin": TIE_MARGIN},
        "prompts": len(cases),
        "greedy": {
            "tokens": max((len(run.tokens) for run in observed), default=0),
            "agreed": agreed,
            "compared": compared,
            "ties": ties,
        },
        "failures": failures,
    }


def not_compared(where: str, why: str, against: str = TRANSFORMERS) -> dict[str, Any]:
    """The failed record of a run that produced nothing to compare (a crash, a timeout)."""
    return {
        "ok": False,
        "where": where,
        "against": against,
        "max_abs_diff": None,
        "tolerance": {"logits_atol": LOGITS_TOLERANCE, "tie_margin": TIE_MARGIN},
        "prompts": 0,
        "greedy": {"tokens": 0, "agreed": 0, "compared": 0, "ties": 0},
        "failures": [why],
        "detail": why,
    }


def summary(record: dict[str, Any]) -> str:
    if record.get("max_abs_diff") is None:
        return "not compared: " + "; ".join(record.get("failures") or [record.get("detail", "")])
    greedy = record["greedy"]
    text = (
        f"prefill logits max abs diff {record['max_abs_diff']:.2e} "
        f"(tolerance {record['tolerance']['logits_atol']:.0e}); greedy tokens "
        f"{greedy['agreed']}/{greedy['compared']} identical"
    )
    if greedy["ties"]:
        text += f", {greedy['ties']} near-tie(s)"
    if record["failures"]:
        text += "; " + "; ".join(record["failures"][:3])
    return text
