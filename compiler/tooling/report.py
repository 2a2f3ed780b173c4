"""Cross-device latency reports: `tvmdeploy bench --json` files merged into Markdown and HTML.

Each device writes its own bench JSON; a report reads any number of them, checks each is a bench
report this version understands, and lays the results side by side. Speed-ups compare p50
latencies on the same device, bundle, batch and sequence length, so a number never mixes machines.
The HTML page is self-contained (plots are inline SVG drawn by matplotlib; no script, no URL) so it
can be mailed or attached to a CI run. Tooling, not device code (docs/design.md); matplotlib is
imported only when a page is drawn, so `tvmdeploy report --md` needs no plotting library.

Why this module is long (~600 lines): it is one concern, the report, whose parts (reading and
checking bench files, tables, three figures laid out for one page) change together.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tvmdeploy.runtime.atomic import write_text_atomic
from tvmdeploy.runtime.timing import ENGINES, SCHEMA, SCHEMA_VERSION

from ..errors import ReportError

BASELINES = {"onnxruntime": "ONNX Runtime", "torch": "PyTorch"}
_RESULT_FIELDS = (
    "engine",
    "batch",
    "seq",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "std_ms",
    "throughput_per_s",
)


@dataclass(frozen=True)
class Row:
    """One timed case: an engine at one batch and sequence length on one device."""

    source: str  # the bench JSON it came from
    device: str  # fingerprint
    device_description: str
    bundle: str
    engine: str
    artifact: str | None
    batch: int
    seq: int
    warmup: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    throughput_per_s: float
    max_abs_diff: float | None
    speedup_vs_onnxruntime: float | None  # ONNX Runtime p50 / this p50, same device and shape
    speedup_vs_torch: float | None  # PyTorch p50 / this p50, same device and shape

    @property
    def label(self) -> str:
        return f"{self.engine} ({self.artifact})" if self.artifact else self.engine

    def speedup(self, baseline: str) -> float | None:
        return getattr(self, f"speedup_vs_{baseline}")


def load_bench(path: str | Path) -> dict[str, Any]:
    """Read one bench JSON and check it is schema `tvmdeploy.bench` at the version we read."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(
            f"{path}: no such bench report (write one with `tvmdeploy bench --json FILE`)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ReportError(
            f"{path}: schema is {found!r}, expected {SCHEMA!r} "
            "(the file `tvmdeploy bench --json` writes)"
        )
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ReportError(
            f"{path}: {SCHEMA} schema_version {data.get('schema_version')!r} is not supported; "
            f"this tvmdeploy reads version {SCHEMA_VERSION} (re-run the bench with it)"
        )
    for key in ("device", "bundle", "results"):
        if key not in data:
            raise ReportError(f"{path}: missing {key!r}")
    for key in ("fingerprint", "description"):
        if key not in data["device"]:
            raise ReportError(f"{path}: device lacks {key!r}")
    for k, result in enumerate(data["results"]):
        missing = [f for f in _RESULT_FIELDS if f not in result]
        if missing:
            raise ReportError(f"{path}: results[{k}] lacks {', '.join(missing)}")
    return data


def _rows(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    device = data["device"]
    return [
        {
            "source": path.name,
            "device": device["fingerprint"],
            "device_description": device["description"],
            "bundle": data["bundle"].get("name", "?"),
            "engine": r["engine"],
            "artifact": r.get("artifact"),
            "batch": int(r["batch"]),
            "seq": int(r["seq"]),
            "warmup": int(r.get("warmup", 0)),
            "runs": int(r.get("runs", 0)),
            "max_abs_diff": (r.get("parity") or {}).get("max_abs_diff"),
            **{f: float(r[f]) for f in _RESULT_FIELDS[3:]},
        }
        for r in data["results"]
    ]


def _engine_order(engine: str) -> int:
    return ENGINES.index(engine) if engine in ENGINES else len(ENGINES)


def build_report(paths: Iterable[str | Path]) -> Report:
    """Merge bench JSONs into one report; a case measured twice is an error, not a silent pick."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ReportError("no bench reports given")
    twice = [str(p) for k, p in enumerate(paths) if p.resolve() in {q.resolve() for q in paths[:k]}]
    if twice:
        raise ReportError(f"{twice[0]}: given more than once")
    raw: list[dict[str, Any]] = []
    seen: dict[tuple, str] = {}
    devices: list[str] = []
    for path in paths:
        for row in _rows(path, load_bench(path)):
            key = (
                row["device"],
                row["bundle"],
                row["engine"],
                row["artifact"],
                row["batch"],
                row["seq"],
            )
            if key in seen:
                raise ReportError(
                    f"{path}: {row['engine']} batch {row['batch']} seq {row['seq']} on device "
                    f"{row['device']} "
                    f"is already in {seen[key]}; pass one file per measurement"
                )
            seen[key] = str(path)
            if row["device"] not in devices:
                devices.append(row["device"])
            raw.append(row)
    if not raw:
        raise ReportError(f"no results in {', '.join(map(str, paths))}")
    baseline_p50 = {
        (r["device"], r["bundle"], r["batch"], r["seq"], r["engine"]): r["p50_ms"]
        for r in raw
        if r["engine"] in BASELINES and not r["artifact"]
    }
    rows = []
    for r in raw:
        speedups = {}
        for baseline in BASELINES:
            base = baseline_p50.get((r["device"], r["bundle"], r["batch"], r["seq"], baseline))
            speedups[f"speedup_vs_{baseline}"] = (
                base / r["p50_ms"] if base and r["p50_ms"] > 0 else None
            )
        rows.append(Row(**r, **speedups))
    rows.sort(
        key=lambda r: (
            devices.index(r.device),
            r.bundle,
            _engine_order(r.engine),
            r.label,
            r.batch,
            r.seq,
        )
    )
    return Report(rows, [str(p) for p in paths])


def _sig(value: float | None) -> str:
    """Three significant digits without exponents (0.00631, 2.5, 427, 1580); – for None."""
    if value is None:
        return "–"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


NOTE = (
    "Latency in ms (p50/p90/p99 of the timed runs), throughput in sequences/s. Speed-up = baseline "
    "p50 "
    "÷ engine p50 on the same device, bundle, batch and sequence length; – where that baseline was "
    "not "
    "measured."
)
TABLE_HEADER = (
    "engine",
    "batch",
    "seq",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "seq/s",
    "× vs ONNX Runtime",
    "× vs PyTorch",
)


@dataclass
class Report:
    """Merged bench rows, ordered by device, bundle, engine, batch and sequence length."""

    rows: list[Row]
    sources: list[str]

    @property
    def devices(self) -> dict[str, str]:
        """Fingerprint → a plot label (the description; with the fingerprint where two clash)."""
        described = {r.device: r.device_description for r in self.rows}
        counts = Counter(described.values())
        return {
            fp: re.sub(r"\((R|TM)\)", "", d) + (f" [{fp[:6]}]" if counts[d] > 1 else "")
            for fp, d in described.items()
        }

    def groups(self) -> dict[tuple[str, str], list[Row]]:
        """Rows per (device fingerprint, bundle), in report order."""
        out: dict[tuple[str, str], list[Row]] = {}
        for r in self.rows:
            out.setdefault((r.device, r.bundle), []).append(r)
        return out

    def to_rows(self) -> list[dict[str, Any]]:
        """The merged rows as plain dicts (what `tvmdeploy report --json` prints)."""
        return [asdict(r) for r in self.rows]

    def _table_rows(self, rows: Sequence[Row]) -> list[tuple[str, ...]]:
        return [
            (
                r.label,
                str(r.batch),
                str(r.seq),
                f"{r.p50_ms:.3f}",
                f"{r.p90_ms:.3f}",
                f"{r.p99_ms:.3f}",
                f"{r.throughput_per_s:.1f}",
                _sig(r.speedup_vs_onnxruntime),
                _sig(r.speedup_vs_torch),
            )
            for r in rows
        ]

    def markdown(self) -> str:
        lines = [
            "# tvmdeploy latency report",
            "",
            (
                f"Merged from {len(self.sources)} bench file(s) on {len(self.devices)} device(s). "
                f"{NOTE}"
            ),
            "",
        ]
        for (device, bundle), rows in self.groups().items():
            lines += [
                f"## {rows[0].device_description} — {bundle}",
                "",
                f"Device fingerprint `{device}`, from "
                + ", ".join(f"`{source}`" for source in dict.fromkeys(r.source for r in rows))
                + ".",
                "",
                "| " + " | ".join(TABLE_HEADER) + " |",
                "|" + "|".join("---" if k == 0 else "---:" for k in range(len(TABLE_HEADER))) + "|",
            ]
            lines += ["| " + " | ".join(cells) + " |" for cells in self._table_rows(rows)]
            lines.append("")
        return "\n".join(lines)

    def html(self) -> str:
        """One page: the plots as inline SVG, then the tables; nothing is fetched when it opens."""
        e = html.escape
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            "<title>tvmdeploy latency report</title>",
            f"<style>{_CSS}</style></head><body>",
            "<h1>tvmdeploy latency report</h1>",
            f"<p>{len(self.sources)} bench file(s), {len(self.devices)} device(s). {NOTE}</p>",
            "<ul>"
            + "".join(
                f"<li><b>{e(label)}</b> <code>{fp}</code></li>"
                for fp, label in self.devices.items()
            )
            + "</ul>",
        ]
        for name, title, svg in figures(self):
            parts.append(f'<section class="plot" id="{name}"><h2>{e(title)}</h2>{svg}</section>')
        parts.append("<h2>Tables</h2>")
        for (device, bundle), rows in self.groups().items():
            parts.append(
                f"<h3>{e(rows[0].device_description)} — {e(bundle)} <code>{device}</code></h3>"
            )
            parts.append(
                "<table><thead><tr>"
                + "".join(f"<th>{e(h)}</th>" for h in TABLE_HEADER)
                + "</tr></thead><tbody>"
            )
            parts += [
                "<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>"
                for cells in self._table_rows(rows)
            ]
            parts.append("</tbody></table>")
        parts.append(
            '<p class="src">Sources: '
            + ", ".join(f"<code>{e(Path(s).name)}</code>" for s in self.sources)
            + "</p></body></html>"
        )
        return "\n".join(parts)

    def write_markdown(self, path: str | Path) -> Path:
        """Write the Markdown tables atomically."""
        return write_text_atomic(path, self.markdown())

    def write_html(self, path: str | Path) -> Path:
        """Write the self-contained HTML page atomically."""
        return write_text_atomic(path, self.html())


_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
section.plot svg { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
code { font-size: 90%; color: #555; }
"""


# --- plots -------------------------------------------------------------------------------------
# Each data-bearing artist gets an SVG id (`latency-bar-N`, `speedup-onnxruntime-bar-N`,
# `speedup-torch-bar-N`, `seqlen-line-N`) so a page can be checked for what it draws. Latencies
# and speed-ups span orders of magnitude (PyTorch vs compiled code, GPU vs CPU), so y-axes are log
# and shared by the bars of one kind; speed-up bars grow from 1× (up: faster, down: slower).


def figures(report: Report) -> list[tuple[str, str, str]]:
    """(id, title, inline SVG) for each plot of the page."""
    return [
        ("latency", "Latency by device and engine (p50)", _svg(_latency_figure(report))),
        (
            "speedup",
            "Speed-up over ONNX Runtime and PyTorch (same device)",
            _svg(_speedup_figure(report)),
        ),
        ("seqlen", "Latency against sequence length (p50)", _svg(_seqlen_figure(report))),
    ]


def _svg(fig: Any) -> str:
    """SVG text for inlining: glyphs drawn as paths (no fonts needed), no XML prologue, no URLs."""
    buf = io.StringIO()
    fig.savefig(
        buf,
        format="svg",
        bbox_inches="tight",
        metadata={"Date": None, "Creator": None, "Format": None, "Type": None},
    )
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    return re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text)  # inline SVG in HTML needs no namespaces


def _colors(report: Report) -> dict[str, str]:
    labels = list(dict.fromkeys(r.label for r in report.rows))
    return {label: f"C{k % 10}" for k, label in enumerate(labels)}


def _cases(rows: Sequence[Row]) -> list[tuple[str, int, int]]:
    return sorted({(r.bundle, r.batch, r.seq) for r in rows})


def _case_label(case: tuple[str, int, int], multi_bundle: bool) -> str:
    bundle, batch, seq = case
    return (f"{bundle}\n" if multi_bundle else "") + f"batch {batch}\nseq {seq}"


def _bar_grid(report: Report, nrows: int, height: float) -> tuple[Any, Any, dict[str, list]]:
    """A figure with one column per device (widths by case count); each row shares one y-axis."""
    from matplotlib.figure import Figure

    by_device: dict[str, list[Row]] = {}
    for r in report.rows:
        by_device.setdefault(r.device, []).append(r)
    counts = [len(_cases(rows)) for rows in by_device.values()]
    width = sum(max(2.6, 1.3 * n) for n in counts) + 1.8
    fig = Figure(figsize=(width, height * nrows), layout="constrained")
    axes = fig.subplots(
        nrows, len(counts), sharey="row", squeeze=False, gridspec_kw={"width_ratios": counts}
    )
    return fig, axes, by_device


def _bars(
    ax: Any,
    rows: Sequence[Row],
    labels: Sequence[str],
    value: Any,
    colors: dict[str, str],
    gid: str,
    counter: Iterable[int],
    suffix: str,
    multi_bundle: bool,
    base: float = 0.0,
) -> None:
    """Grouped bars per case on a log axis (values span orders of magnitude), each from `base`."""
    cases = _cases(rows)
    width = 0.8 / max(1, len(labels))
    for k, label in enumerate(labels):
        points = [
            (i, value(r))
            for i, case in enumerate(cases)
            for r in rows
            if r.label == label and (r.bundle, r.batch, r.seq) == case and value(r) is not None
        ]
        if not points:
            continue
        xs = [i - 0.4 + width * (k + 0.5) for i, _ in points]
        bars = ax.bar(
            xs, [v - base for _, v in points], width, bottom=base, color=colors[label], label=label
        )
        for patch in bars.patches:
            patch.set_gid(f"{gid}-{next(counter)}")
        ax.bar_label(
            bars, labels=[_sig(v) + suffix for _, v in points], fontsize=7, rotation=90, padding=2
        )
    _log_y(ax)
    ax.set_xticks(range(len(cases)), [_case_label(c, multi_bundle) for c in cases], fontsize=8)
    ax.margins(y=0.2)
    ax.grid(axis="y", alpha=0.3)


def _log_y(ax: Any) -> None:
    """Log y-axis with plain numbers (0.2, 1, 50); 2s and 5s labelled too over few decades."""
    from matplotlib.ticker import FuncFormatter

    def minor(v: float, _: Any) -> str:
        low, high = ax.get_ylim()
        few_decades = math.log10(high / low) < 1.5
        return (
            f"{v:g}" if few_decades and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""
        )

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _legend(fig: Any, colors: dict[str, str], labels: Iterable[str]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[label], label=label) for label in labels]
    fig.legend(
        handles=handles, loc="outside upper center", ncols=min(4, len(handles)), frameon=False
    )


def _latency_figure(report: Report) -> Any:
    import itertools

    colors, devices = _colors(report), report.devices
    multi_bundle = len({r.bundle for r in report.rows}) > 1
    fig, axes, by_device = _bar_grid(report, 1, 4.2)
    counter = itertools.count()
    for ax, (device, rows) in zip(axes[0], by_device.items()):
        _bars(
            ax,
            rows,
            list(colors),
            lambda r: r.p50_ms,
            colors,
            "latency-bar",
            counter,
            "",
            multi_bundle,
        )
        ax.set_title(textwrap.fill(devices[device], 34), fontsize=9)
    axes[0][0].set_ylabel("p50 latency (ms, log scale)")
    _legend(fig, colors, colors)
    return fig


def _speedup_figure(report: Report) -> Any:
    import itertools

    from matplotlib.figure import Figure

    colors, devices = _colors(report), report.devices
    baselines = [b for b in BASELINES if any(r.speedup(b) is not None for r in report.rows)]
    if not baselines:
        fig = Figure(figsize=(6, 1.2))
        fig.text(
            0.5,
            0.5,
            "Neither ONNX Runtime nor PyTorch was measured: no speed-ups to show.",
            ha="center",
            va="center",
        )
        return fig
    multi_bundle = len({r.bundle for r in report.rows}) > 1
    fig, axes, by_device = _bar_grid(report, len(baselines), 3.6)
    shown: list[str] = []
    for row_axes, baseline in zip(axes, baselines):
        counter = itertools.count()
        labels = [label for label in colors if label != baseline]
        for ax, (device, rows) in zip(row_axes, by_device.items()):
            _bars(
                ax,
                rows,
                labels,
                lambda r, b=baseline: r.speedup(b),
                colors,
                f"speedup-{baseline}-bar",
                counter,
                "×",
                multi_bundle,
                base=1.0,
            )
            ax.axhline(1.0, color="#555", linewidth=0.8, linestyle="--")
            ax.set_title(
                textwrap.fill(f"over {BASELINES[baseline]} — {devices[device]}", 40), fontsize=9
            )
        row_axes[0].set_ylabel(f"× faster than {BASELINES[baseline]} (log)")
        values = [1.0] + [
            v for r in report.rows if r.label != baseline and (v := r.speedup(baseline))
        ]
        row_axes[0].set_ylim(
            min(values) / 10, max(values) * 10
        )  # 1× always inside; room for labels
        shown += [label for label in labels if label not in shown]
    _legend(fig, colors, [label for label in colors if label in shown])
    return fig


def _seqlen_figure(report: Report) -> Any:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    colors, devices = _colors(report), report.devices
    by_device: dict[str, list[Row]] = {}
    for r in report.rows:
        by_device.setdefault(r.device, []).append(r)
    fig = Figure(figsize=(4.6 * len(by_device) + 1.0, 4.0), layout="constrained")
    axes = fig.subplots(1, len(by_device), squeeze=False)[0]
    multi = len({(r.bundle, r.batch) for r in report.rows}) > 1
    k = 0
    for ax, (device, rows) in zip(axes, by_device.items()):
        lines: dict[tuple[str, str, int], list[Row]] = {}
        for r in rows:
            lines.setdefault((r.label, r.bundle, r.batch), []).append(r)
        for (label, bundle, batch), points in lines.items():
            points.sort(key=lambda r: r.seq)
            name = f"{label}, {bundle} batch {batch}" if multi else label
            (line,) = ax.plot(
                [r.seq for r in points],
                [r.p50_ms for r in points],
                marker="o",
                color=colors[label],
                label=name,
            )
            line.set_gid(f"seqlen-line-{k}")
            k += 1
        seqs = sorted({r.seq for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sequence length (tokens)")
        _log_y(ax)
        ax.grid(alpha=0.3)
        ax.set_title(textwrap.fill(devices[device], 40), fontsize=9)
    axes[0].set_ylabel("p50 latency (ms, log scale)")
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="outside upper center",
        ncols=min(4, len(handles)),
        frameon=False,
    )
    return fig
