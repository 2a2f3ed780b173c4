"""The demo's labelled data: VADER's 10,604 human-rated movie-review snippets.

They ship inside the *source* package of vaderSentiment (additional_resources/
hutto_ICWSM_2014.tar.gz, movieReviewSnippets_GroundTruth.txt: id, mean rating -4..+4, text).
We fetch that sdist with pip (a package registry, no model hub), cache it, and split it with a
fixed seed: positive if the rating is > 0, snippets with |rating| < 0.5 dropped as ambiguous.
"""

from __future__ import annotations

import io
import random
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

VADER_VERSION = "3.3.2"
SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}


@dataclass(frozen=True)
class Example:
    text: str
    rating: float
    label: int


def fetch_sdist(cache_dir: Path) -> Path:
    """The vaderSentiment source archive, downloaded once into `cache_dir`."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob(f"vaderSentiment-{VADER_VERSION}.tar.gz"))
    if found:
        return found[0]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"vaderSentiment=={VADER_VERSION}",
        "-d",
        str(cache_dir),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(cache_dir.glob(f"vaderSentiment-{VADER_VERSION}.tar.gz"))
    if result.returncode != 0 or not found:
        raise ModelLoadError(
            f"could not download the vaderSentiment source package: {result.stderr.strip()[-400:]}"
        )
    return found[0]


def read_snippets(sdist: Path) -> list[tuple[float, str]]:
    """(rating, text) for every movie-review snippet in the sdist."""
    with tarfile.open(sdist) as outer:
        member = next(
            m
            for m in outer.getmembers()
            if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")
        )
        inner_bytes = outer.extractfile(member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        raw = inner.extractfile(SNIPPETS).read().decode("utf-8")
    rows = []
    for line in raw.splitlines():
        parts = line.strip().split("\t")
        if len(parts) == 3:
            rows.append((float(parts[1]), parts[2].strip()))
    return rows


def load_split(
    cache_dir: Path, seed: int = 13, test_fraction: float = 0.2, min_abs_rating: float = 0.5
):
    """Fixed train/test split of the labelled snippets (ambiguous ones dropped)."""
    rows = read_snippets(fetch_sdist(cache_dir))
    examples = [
        Example(text, rating, int(rating > 0))
        for rating, text in rows
        if abs(rating) >= min_abs_rating
    ]
    random.Random(seed).shuffle(examples)
    n_test = int(len(examples) * test_fraction)
    return examples[n_test:], examples[:n_test]
