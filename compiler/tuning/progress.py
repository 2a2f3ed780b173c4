"""Progress of a tuning run: `TuneStatus` events, shown through `logging` or, in the CLI, as a bar.

The search loop only calls a `Callable[[TuneStatus], None]`. The library default logs a line when
the phase or kernel changes and every tenth of the budget; the CLI passes `RichTuneProgress` (a
rich progress bar on stderr) and draws `task_table` when the run ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from .tasks import Task

logger = logging.getLogger(__name__)

_PHASE_LABELS = {"rule-based": "rule-based timings", "rule-based check": "rule-based re-check"}


@dataclass
class TuneStatus:
    """Progress of a tuning run, as given to a `progress` callback."""

    phase: str  # "rule-based", "rule-based check" or "search"
    done: int
    total: int | None
    task: str
    estimate_ms: float | None  # tuned kernels of the largest bucket, best schedules now
    rule_based_ms: float | None  # the same kernels with the rule-based schedules

    def line(self) -> str:
        """One line for people: where the run is, and the estimate if there is one."""
        of = f"/{self.total}" if self.total else ""
        text = f"{_PHASE_LABELS.get(self.phase, 'search')} {self.done}{of}: {self.task}"
        if self.estimate_ms is not None and self.rule_based_ms:
            text += f" · est. {self.estimate_ms:.2f} ms (rule-based {self.rule_based_ms:.2f} ms)"
        return text


def silent(_status: TuneStatus) -> None:
    """No progress at all."""


class LoggingProgress:
    """Progress lines through `logging`: on a phase change and every tenth of the total."""

    def __init__(self, profile: str):
        self.profile = profile
        self._last: tuple[str, int] | None = None

    def __call__(self, status: TuneStatus) -> None:
        tenth = status.done * 10 // status.total if status.total else status.done // 16
        key = (status.phase, tenth)
        if key != self._last:
            self._last = key
            logger.info("tune %s: %s", self.profile, status.line())


class RichTuneProgress:
    """A rich progress bar per phase on stderr (the CLI's); use as a context manager."""

    def __init__(self, profile: str, console: Any = None):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.profile = profile
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._ids: dict[str, Any] = {}

    def __enter__(self) -> Self:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, status: TuneStatus) -> None:
        label = _PHASE_LABELS.get(status.phase, f"tune {self.profile}")
        if status.phase not in self._ids:
            self._ids[status.phase] = self.bar.add_task(label, total=status.total, info="")
        estimate = ""
        if status.estimate_ms is not None and status.rule_based_ms:
            estimate = (
                f" · est. {status.estimate_ms:.2f} ms (rule-based {status.rule_based_ms:.2f} ms)"
            )
        self.bar.update(
            self._ids[status.phase],
            completed=status.done,
            total=status.total,
            info=f"{status.task}{estimate}",
        )


def progress_callback(
    progress: bool | Callable[[TuneStatus], None], profile: str
) -> Callable[[TuneStatus], None]:
    """The callback for `tune(progress=...)`: True → log lines, False → silence, or the callable."""
    if callable(progress):
        return progress
    return LoggingProgress(profile) if progress else silent


def task_table(tasks: Sequence[Task], title: str) -> Any:
    """A rich table of tuned kernels: weight, trials, best time, GFLOP/s, against rule-based."""
    from rich.table import Table

    table = Table(title=f"tuned kernels ({title})", title_justify="left")
    for column in ("task", "weight", "trials", "best µs", "GFLOP/s", "rule-based µs", "speed-up"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task in sorted(tasks, key=lambda t: -t.coefficient * t.current_secs):
        best = task.current_secs if (task.best_secs or task.rule_based_secs) else None
        table.add_row(
            task.name,
            str(task.weight),
            f"{task.trials} (+{task.new_trials})",
            f"{best * 1e6:.1f}" if best else "-",
            f"{task.flop / best / 1e9:.1f}" if best else "-",
            f"{task.rule_based_secs * 1e6:.1f}" if task.rule_based_secs else "-",
            f"{task.rule_based_secs / best:.2f}x" if best and task.rule_based_secs else "-",
        )
    return table
