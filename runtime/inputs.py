"""Synthetic token inputs: the one generator behind verification, benchmarks and measured choices.

Deterministic (seeded) so that build-time parity, a benchmark and a later rerun see the same ids.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def synthetic_inputs(
    input_names: Iterable[str],
    vocab_size: int,
    batch: int,
    seq: int,
    seed: int = 0,
    padded_row: bool = False,
) -> dict[str, np.ndarray]:
    """int64 arrays [batch, seq] by input name: seeded ids in [0, vocab_size), a full attention
    mask, zero token types (and zeros for any other input).

    With `padded_row`, the second row's mask covers only the first half of the sequence, so
    padding and masking are exercised too (verification uses it; timing does not).
    """
    names = list(input_names)
    rng = np.random.default_rng(seed)
    arrays = {name: np.zeros((batch, seq), np.int64) for name in names}
    arrays["input_ids"] = rng.integers(0, int(vocab_size), (batch, seq), dtype=np.int64)
    if "attention_mask" in arrays:
        arrays["attention_mask"][:] = 1
        if padded_row and batch > 1 and seq > 2:
            arrays["attention_mask"][1, seq // 2 :] = 0
    return arrays
