"""Choosing the next token from a row of logits: greedy, or sampled with the usual controls.

The order is transformers' (`generate`'s logits processors): repetition penalty, temperature,
top-k, then top-p over what is left. `temperature == 0` is greedy (argmax), whatever the rest says.
Each sequence has its own seeded generator, so a seed gives the same text on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import OptionError


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; checked once, when the request is made."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise OptionError(f"temperature must be >= 0 (0 is greedy), not {self.temperature}")
        if self.top_k < 0:
            raise OptionError(f"top_k must be >= 0 (0 turns it off), not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise OptionError(f"top_p must lie in (0, 1], not {self.top_p}")
        if not self.repetition_penalty > 0:
            raise OptionError(
                f"repetition_penalty must be > 0 (1 turns it off), not {self.repetition_penalty}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks tokens for one sequence with its params and its own random stream."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        #: whether `__call__` reads `seen` (the caller skips building the history otherwise)
        self.needs_history = params.repetition_penalty != 1.0

    def pick(self, logits: np.ndarray, history) -> int:
        """`self(logits, history())`, the history built only when the penalty reads it; plain
        greedy is one argmax on the row as it is (no copy: it runs once per token)."""
        if self.params.greedy and not self.needs_history:
            return int(np.argmax(logits))
        return self(logits, history() if self.needs_history else None)

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> int:
        """The next token from `logits` [vocab]; `seen` holds the ids the penalty applies to
        (prompt and generated so far)."""
        p = self.params
        logits = logits.astype(np.float64, copy=True)
        if p.repetition_penalty != 1.0 and seen is not None and seen.size:
            ids = np.unique(seen)
            picked = logits[ids]
            logits[ids] = np.where(
                picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
            )
        if p.greedy:
            return int(np.argmax(logits))
        logits /= p.temperature
        if 0 < p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = cumulative - probs[order] < p.top_p  # the smallest prefix reaching top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self._rng.choice(probs.size, p=probs))
