"""The gate of a weight-only quantized generation artifact: how close it stays to fp32.

A quantized model is not bit-exact, so the fp32 rule (identical greedy tokens, parity.py) cannot
hold; two measures say how much it loses instead, both recorded in the manifest's `accuracy`:
- greedy agreement: along transformers fp32's GREEDY_TOKENS greedy tokens after each fixed
  prompt, the fraction of steps at which the artifact, fed the same prefix, picks the same next
  token (teacher-forced: one flipped near-tie does not make every later token count as lost, as
  it would when the two texts run free; how many tokens the free-running texts share is recorded
  too, `free_running_identical`);
- perplexity on held-out text (snippets of the VADER movie reviews the demo uses, not seen by
  the gate's prompts), the artifact's against transformers fp32's on the same tokens.
The artifact passes when agreement >= MIN_AGREEMENT and perplexity <= MAX_PERPLEXITY_RATIO times
fp32's; `load(precision="auto")` takes it only then (runtime/precision.within_gate).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from .parity import GREEDY_TOKENS, ReferenceCase, compare

logger = logging.getLogger(__name__)

#: Teacher-forced greedy steps (fraction) at which the artifact must pick fp32's token.
MIN_AGREEMENT = 0.9
#: Perplexity the quantized artifact may reach, relative to fp32's on the same text.
MAX_PERPLEXITY_RATIO = 1.05
#: Held-out snippets, and at most this many tokens of each (one decode step per token).
HELDOUT_SNIPPETS = 8
HELDOUT_TOKENS = 24


def heldout_ids(model_dir: Path, cache: Path) -> tuple[list[list[int]], str]:
    """Token ids of the held-out snippets, and where they came from ("" when none could be
    had: no tokenizer, or the snippets could not be fetched; the reason is logged)."""
    if not (model_dir / "tokenizer.json").is_file():
        return [], "no tokenizer.json in the model folder"
    try:
        from ..demo.sentiment_data import load_split

        _, test = load_split(cache)
    except Exception as err:  # noqa: BLE001 - offline: perplexity is then not measured
        return [], f"held-out text unavailable ({err})"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    found = []
    for example in test:
        ids = tokenizer.encode(example.text).ids[:HELDOUT_TOKENS]
        if len(ids) >= 4:
            found.append(ids)
        if len(found) == HELDOUT_SNIPPETS:
            break
    return found, "VADER movie-review snippets (test split)"


def _nll(logits: np.ndarray, token: int) -> float:
    logits = logits.astype(np.float64)
    top = logits.max()
    return float(top + math.log(np.exp(logits - top).sum()) - logits[token])


def reference_perplexity(model_dir: Path, texts: list[list[int]]) -> float | None:
    """transformers fp32's perplexity over `texts` (every token after each text's first)."""
    if not texts:
        return None
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in texts:
            logits = model(torch.tensor([ids])).logits[0].numpy()
            for t in range(1, len(ids)):
                total += _nll(logits[t - 1], ids[t])
                count += 1
    return math.exp(total / count)


def artifact_perplexity(generator, texts: list[list[int]]) -> float | None:
    """The artifact's perplexity over `texts`, each prefix's logits through the runtime."""
    if not texts:
        return None
    total, count = 0.0, 0
    for ids in texts:
        rows = generator.forced_logits(ids[:1], ids[1:-1])  # rows[t - 1]: after ids[:t]
        for t in range(1, len(ids)):
            total += _nll(rows[t - 1], ids[t])
            count += 1
    return math.exp(total / count)


def check(
    generator,
    cases: list[ReferenceCase],
    texts: list[list[int]],
    fp32_perplexity: float | None,
    text_source: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parity record, accuracy record) of a quantized artifact run here."""
    from .parity import Observed

    observed, steps, same = [], 0, 0
    for case in cases:
        forced = generator.forced_logits(case.prompt, case.tokens[:-1])  # [t]: after tokens[:t]
        result = generator.generate(case.prompt, max_new_tokens=GREEDY_TOKENS, ignore_eos=True)
        observed.append(Observed(forced[0], list(result.token_ids)))  # [0]: the prefill's
        for row, want in zip(forced, case.tokens, strict=True):
            same += int(row.argmax()) == want
            steps += 1
    parity = compare(cases, observed, "native")
    agreement = same / max(1, steps)
    perplexity = artifact_perplexity(generator, texts)
    ratio = perplexity / fp32_perplexity if perplexity and fp32_perplexity else None
    ok = agreement >= MIN_AGREEMENT and (ratio is None or ratio <= MAX_PERPLEXITY_RATIO)
    parity["ok"] = ok
    parity["gate"] = "quantized: greedy agreement and perplexity against fp32"
    accuracy = {
        "metric": "greedy-token agreement with transformers fp32 (%)",
        "value": round(100 * agreement, 2),
        "fp32": 100.0,
        "ok": ok,
        "threshold": {
            "min_agreement": MIN_AGREEMENT,
            "max_perplexity_ratio": MAX_PERPLEXITY_RATIO,
        },
        "greedy_tokens": steps,
        "free_running_identical": parity["greedy"]["agreed"],
        "prefill_logits_max_abs_diff": parity["max_abs_diff"],
        "perplexity": {
            "value": None if perplexity is None else round(perplexity, 4),
            "fp32": None if fp32_perplexity is None else round(fp32_perplexity, 4),
            "ratio": None if ratio is None else round(ratio, 4),
            "text": text_source or "not measured",
            "snippets": len(texts),
            "tokens": sum(len(t) - 1 for t in texts),
        },
    }
    return parity, accuracy


def summary(accuracy: dict[str, Any]) -> str:
    ppl = accuracy["perplexity"]
    text = f"greedy agreement {accuracy['value']:.1f}% (gate >= {100 * MIN_AGREEMENT:.0f}%)"
    if ppl["value"] is not None:
        text += (
            f", perplexity {ppl['value']:.3f} vs fp32 {ppl['fp32']:.3f} "
            f"(x{ppl['ratio']:.3f}, gate <= x{MAX_PERPLEXITY_RATIO})"
        )
    else:
        text += f", perplexity not measured ({ppl['text']})"
    return text + f", prefill logits max abs diff {accuracy['prefill_logits_max_abs_diff']:.3f}"
