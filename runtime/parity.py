"""One comparison of engine outputs against a reference, used at build time and on the device.

Both the compiler's verify stage and `tvmdeploy verify` on a device check an artifact the same way:
every output element within `atol + rtol * |reference|`, the worst absolute difference recorded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The fp32 tolerance every artifact is verified with (recorded in the manifest's parity entry).
ATOL = 1e-4
RTOL = 1e-4


def default_tolerance() -> dict[str, float]:
    return {"atol": ATOL, "rtol": RTOL}


@dataclass
class Comparison:
    """The worst absolute difference; whether every value was within tolerance (if not, where)."""

    max_abs_diff: float = 0.0
    ok: bool = True
    detail: str = ""
    atol: float = ATOL  # the tolerance `add` uses unless given one
    rtol: float = RTOL

    def add(
        self,
        label: str,
        outputs: Sequence[np.ndarray],
        expected: Sequence[np.ndarray],
        atol: float | None = None,
        rtol: float | None = None,
    ) -> None:
        """Fold in one case (e.g. one bucket); the first failing case's reason is kept."""
        atol = self.atol if atol is None else atol
        rtol = self.rtol if rtol is None else rtol
        diff, ok, why = compare(outputs, expected, atol, rtol)
        self.max_abs_diff = max(self.max_abs_diff, diff)
        if not ok and self.ok:
            self.ok, self.detail = False, f"{label}: {why}"


def compare(
    outputs: Sequence[np.ndarray],
    expected: Sequence[np.ndarray],
    atol: float = ATOL,
    rtol: float = RTOL,
) -> tuple[float, bool, str]:
    """Max abs diff over all outputs and whether |a - b| <= atol + rtol*|b| everywhere."""
    worst, ok, detail = 0.0, True, ""
    if len(outputs) != len(expected):
        return float("inf"), False, f"{len(outputs)} outputs, the reference has {len(expected)}"
    for k, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape:
            return (
                float("inf"),
                False,
                f"output {k} has shape {got.shape}, the reference {want.shape}",
            )
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        if diff.size:
            worst = max(worst, float(np.nanmax(diff)) if not np.isnan(diff).all() else float("inf"))
        bad = ~(diff <= atol + rtol * np.abs(want))  # NaN counts as outside
        if bad.any():
            ok = False
            detail = f"output {k}: {int(bad.sum())} of {bad.size} values outside tolerance"
    return worst, ok, detail


def compare_cases(
    cases: Iterable[tuple[str, Sequence[np.ndarray], Sequence[np.ndarray]]],
    atol: float = ATOL,
    rtol: float = RTOL,
) -> Comparison:
    """`Comparison` over (label, outputs, expected) cases."""
    result = Comparison()
    for label, outputs, expected in cases:
        result.add(label, outputs, expected, atol, rtol)
    return result


def parity_summary(record: dict[str, Any]) -> str:
    """One line from a manifest parity record: the diff and verdict, or why there is none."""
    if record.get("ok") is None:
        return f"not run ({record.get('detail', '')})"
    diff = record.get("max_abs_diff")
    diff_text = "no outputs" if diff is None else f"max abs diff {diff:.2e}"
    text = f"{diff_text} [{'ok' if record['ok'] else 'FAILED'}] ({record.get('where')})"
    return text if record["ok"] or not record.get("detail") else f"{text}: {record['detail']}"
