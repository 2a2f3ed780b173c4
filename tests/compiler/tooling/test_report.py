"""`tvmdeploy report`: real bench JSONs from two devices merged into Markdown and one HTML page.

Every expected number here is computed from the bench JSON inputs, never read back from the report.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from tvmdeploy.compiler.tooling.baselines import run_bench_with_baselines
from tvmdeploy.compiler.tooling.report import ReportError, build_report
from tvmdeploy.runtime.timing import BenchConfig

ARTIFACTS = Path(__file__).resolve().parents[3] / "build" / "test-artifacts"
SECOND_DEVICE = {
    "fingerprint": "0123456789abcdef",
    "description": "Second Test CPU (aarch64, 8 cores)",
}
# Per-engine slow-down of the second device: unequal, so its speed-ups differ from the first's.
SCALE = {"tvmdeploy": 2.0, "onnxruntime": 3.0, "torch": 2.5}
TIMES = ("warmup_ms", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms")


@pytest.fixture(scope="module")
def bench_files(tiny_bundle, tmp_path_factory) -> list[Path]:
    """One real bench JSON from this machine, and one standing in for a second machine's file."""
    out = tmp_path_factory.mktemp("bench")
    config = BenchConfig(
        str(tiny_bundle), ["tvmdeploy", "onnxruntime", "torch"], [1], [16, 32], warmup=1, runs=5
    )
    first = run_bench_with_baselines(config).write(out / "host.json")
    # Stand-in for `tvmdeploy bench --json` run on a second machine: same schema and cases, another
    # device fingerprint and description, every latency scaled (throughput scaled inversely).
    data = json.loads(first.read_text())
    data["device"] = {**data["device"], **SECOND_DEVICE}
    for r in data["results"]:
        factor = SCALE[r["engine"]]
        r.update({k: r[k] * factor for k in TIMES}, throughput_per_s=r["throughput_per_s"] / factor)
    second = out / "second.json"
    second.write_text(json.dumps(data))
    return [first, second]


def inputs(paths: list[Path]) -> list[tuple[str, dict]]:
    """(device fingerprint, result) for every result of the input files."""
    out = []
    for path in paths:
        data = json.loads(path.read_text())
        out += [(data["device"]["fingerprint"], r) for r in data["results"]]
    return out


def expected_speedups(paths: list[Path], baseline: str) -> dict[tuple, float]:
    """Baseline p50 / engine p50 per (device, engine, artifact, batch, seq), same device only."""
    results = inputs(paths)
    base = {(d, r["batch"], r["seq"]): r["p50_ms"] for d, r in results if r["engine"] == baseline}
    return {
        (d, r["engine"], r["artifact"], r["batch"], r["seq"]): base[d, r["batch"], r["seq"]]
        / r["p50_ms"]
        for d, r in results
        if (d, r["batch"], r["seq"]) in base
    }


def parse_markdown(text: str) -> dict[tuple, list[str]]:
    """Table cells per (device fingerprint, engine label, batch, seq)."""
    rows, device = {}, None
    for line in text.splitlines():
        if m := re.match(r"Device fingerprint `([0-9a-f]+)`", line):
            device = m.group(1)
        elif line.startswith("| ") and not line.startswith("| engine"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            key = (device, cells[0], int(cells[1]), int(cells[2]))
            assert key not in rows, f"row {key} appears twice"
            rows[key] = cells
    return rows


def test_markdown_matches_inputs(bench_files, tmp_path):
    md = build_report(bench_files).write_markdown(tmp_path / "report.md").read_text()
    table = parse_markdown(md)
    results = inputs(bench_files)
    assert len(table) == len(results) == 2 * 3 * 2  # devices × engines × seqs
    vs_ort = expected_speedups(bench_files, "onnxruntime")
    vs_torch = expected_speedups(bench_files, "torch")
    # Precondition: the devices' speed-ups differ (ORT slowed 3×, tvmdeploy 2×), so a report that
    # took a baseline from the other device would show here.
    host = json.loads(bench_files[0].read_text())["device"]["fingerprint"]
    artifact = next(r["artifact"] for _, r in results if r["engine"] == "tvmdeploy")
    case = ("tvmdeploy", artifact, 1, 16)
    assert vs_ort[(SECOND_DEVICE["fingerprint"], *case)] == pytest.approx(
        vs_ort[(host, *case)] * 1.5
    )
    for device, r in results:
        label = f"{r['engine']} ({r['artifact']})" if r["artifact"] else r["engine"]
        cells = table[device, label, r["batch"], r["seq"]]
        values = (r["p50_ms"], r["p90_ms"], r["p99_ms"], r["throughput_per_s"])
        for cell, value, shown in zip(
            cells[3:7], values, (0.001, 0.001, 0.001, 0.1)
        ):  # digits shown
            assert float(cell) == pytest.approx(value, abs=shown * 0.51), (label, cells)
        key = (device, r["engine"], r["artifact"], r["batch"], r["seq"])
        assert float(cells[7]) == pytest.approx(
            vs_ort[key], rel=0.006
        )  # 3 significant digits shown
        assert float(cells[8]) == pytest.approx(vs_torch[key], rel=0.006)


def test_json_rows_from_cli(bench_files, tmp_path):
    html, md = tmp_path / "r.html", tmp_path / "r.md"
    cli = [sys.executable, "-m", "tvmdeploy.compiler.cli", "report"]
    run = subprocess.run(
        [*cli, *map(str, bench_files), "-o", str(html), "--md", str(md), "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert html.is_file() and md.is_file() and "wrote" in run.stderr
    vs_ort = expected_speedups(bench_files, "onnxruntime")
    got = {(r["device"], r["engine"], r["artifact"], r["batch"], r["seq"]): r for r in rows}
    assert len(got) == len(rows) == len(vs_ort) == 12
    for key, speedup in vs_ort.items():
        assert got[key]["speedup_vs_onnxruntime"] == pytest.approx(speedup, rel=1e-9)
    help_text = subprocess.run(
        [*cli, "--help"], check=False, capture_output=True, text=True, timeout=120
    ).stdout
    assert "report" in help_text and "Merge bench JSONs" in help_text
    missing = subprocess.run(
        [*cli, str(bench_files[0]), str(tmp_path / "gone.json")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "gone.json" in missing.stderr


def _variant(src: Path, dst: Path, **changes) -> Path:
    data = json.loads(src.read_text())
    data.update(changes)
    dst.write_text(json.dumps(data))
    return dst


def test_errors_name_the_file(bench_files, tmp_path):
    good = bench_files[0]
    cases = {
        "schema": (
            _variant(good, tmp_path / "schema.json", schema="other.bench"),
            r"schema\.json: schema is 'other\.bench'",
        ),
        "version": (
            _variant(good, tmp_path / "v2.json", schema_version=2),
            r"v2\.json: .*schema_version 2 is not supported",
        ),
        "missing": (tmp_path / "absent.json", r"absent\.json: no such bench report"),
    }
    (tmp_path / "junk.json").write_text("{not json")
    cases["junk"] = (tmp_path / "junk.json", r"junk\.json: not a readable JSON")
    data = json.loads(good.read_text())
    del data["results"][0]["p50_ms"]
    (tmp_path / "field.json").write_text(json.dumps(data))
    cases["field"] = (tmp_path / "field.json", r"field\.json: results\[0\] lacks p50_ms")
    for path, message in cases.values():
        with pytest.raises(ReportError, match=message):
            build_report([good, path])
    copy = tmp_path / "copy.json"
    shutil.copy(good, copy)
    with pytest.raises(ReportError, match=r"copy\.json: .* is already in .*host\.json"):
        build_report([good, copy])
    with pytest.raises(ReportError, match="no bench reports"):
        build_report([])


def test_markdown_reports_load_no_plotting(bench_files):
    """Importing the runtime, and Markdown reports, never load matplotlib."""
    script = (
        "import sys, tvmdeploy.runtime, tvmdeploy.compiler.tooling.report as r; "
        "r.build_report(sys.argv[1:]).markdown(); print('matplotlib' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, *map(str, bench_files)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip() == "False"


# --- the HTML page, rendered by headless Chromium ---------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]


def chromium(page: Path, profile: Path, *args: str) -> str:
    exe = shutil.which("chromium")
    if exe is None:  # fail, never skip: .ci/setup.sh installs it
        pytest.fail("chromium is not installed; run .ci/setup.sh (apt-get install chromium)")
    run = subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def bar_ends(dom: str, prefix: str) -> list[tuple[float, float]]:
    """(low, high) SVG y of the bars whose group id is PREFIX-N (SVG y grows downwards)."""
    ends = []
    for d in re.findall(rf'<g id="{prefix}-\d+">\s*<path d="([^"]+)"', dom):
        ys = [float(y) for y in re.findall(r"[ML] [-\d.]+ ([-\d.]+)", d)]
        ends.append((max(ys), min(ys)))
    return ends


def assert_log_scaled(values: list[float], tips: list[float], one_y: float | None = None) -> None:
    """Bar tips sit at y = a - b·log(value), one a and b for all: the axis is log and shared.

    Bars and values are paired by rank (a larger value has a higher tip). Without a known y for
    1× the slope is measured from the smallest value; with it (speed-ups), from 1×.
    """
    assert len(tips) == len(values) >= 2
    pairs = list(zip(sorted(values), sorted(tips, reverse=True)))
    if one_y is None:
        v0, y0 = pairs[0]
        slopes = [(y0 - y) / math.log(v / v0) for v, y in pairs[1:] if v / v0 > 1.05]
    else:
        slopes = [(one_y - y) / math.log(v) for v, y in pairs if abs(math.log(v)) > 0.05]
    assert slopes and min(slopes) > 0
    assert max(slopes) == pytest.approx(min(slopes), rel=0.01), slopes


@pytest.mark.chromium
def test_html_page_renders(bench_files, tmp_path):
    page = build_report(bench_files).write_html(tmp_path / "report.html")
    text = page.read_text()
    # Self-contained: nothing to fetch (no scripts, stylesheets, images or URLs of any kind).
    assert not re.search(r"<script|<link|<img|<iframe|https?:|url\((?!#)|@import", text)
    assert all(ref.startswith("#") for ref in re.findall(r'(?:src|href)="([^"]*)"', text))

    dom = chromium(page, tmp_path / "profile-dom", "--dump-dom")
    assert dom.count("<svg") == 3
    for title in (
        "Latency by device and engine",
        "Speed-up over ONNX Runtime and PyTorch",
        "Latency against sequence length",
    ):
        assert re.search(rf"<h2>{title}", dom), title
    results = inputs(bench_files)
    latency = bar_ends(dom, "latency-bar")
    assert len({low for low, _ in latency}) == 1  # one shared axis floor
    assert_log_scaled([r["p50_ms"] for _, r in results], [high for _, high in latency])
    for baseline in ("onnxruntime", "torch"):
        expected = {
            k: v for k, v in expected_speedups(bench_files, baseline).items() if k[1] != baseline
        }
        assert len(expected) == 8  # 2 devices × 2 other engines × 2 seqs
        ends = bar_ends(dom, f"speedup-{baseline}-bar")
        # Every bar has one end on the shared 1× line; the other end is its speed-up.
        one = Counter(y for pair in ends for y in pair).most_common(1)[0][0]
        tips = [low if high == one else high for low, high in ends]
        assert_log_scaled(list(expected.values()), tips, one_y=one)
    lines = re.findall(r'<g id="seqlen-line-\d+">\s*<path d="([^"]+)"', dom)
    assert len(lines) == 2 * 3  # devices × engines, one point per sequence length
    assert all(line.count("L ") == 1 for line in lines)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for path in (page, *bench_files):  # what the screenshot was made from
        shutil.copy(path, ARTIFACTS / f"report-{path.name}")
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    chromium(page, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000")
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        colors = {rgb: n for n, rgb in image.convert("RGB").getcolors(1 << 20)}
    for rgb in (
        (0x1F, 0x77, 0xB4),
        (0xFF, 0x7F, 0x0E),
        (0x2C, 0xA0, 0x2C),
    ):  # the three engines' bar colours
        assert colors.get(rgb, 0) > 500, f"engine colour {rgb} hardly painted"
