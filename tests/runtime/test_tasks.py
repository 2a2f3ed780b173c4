"""`predict()` per task: entities for token classification, vectors for embedding models.

References are independent of tvmdeploy: transformers' own token-classification pipeline
("simple" aggregation) on the PyTorch model for entities, and PyTorch's hidden states mean-pooled
here for vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tvmdeploy.compiler import CompileOptions, compile_model
from tvmdeploy.runtime import load
from tvmdeploy.runtime.tasks import task_of

from tests.conftest import minilm_dir

TEXTS = [
    "Ada Lovelace wrote programs in London for the Analytical Engine.",
    "Nothing to see here",
]
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


def _tiny(model_class, path, **extra):
    from transformers import BertConfig, BertTokenizerFast

    torch.manual_seed(3)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **extra,
    )
    model = model_class(config).eval()
    model.save_pretrained(path)
    BertTokenizerFast.from_pretrained(str(minilm_dir())).save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def ner(tmp_path_factory):
    from transformers import BertForTokenClassification

    folder = tmp_path_factory.mktemp("ner")
    model = _tiny(
        BertForTokenClassification,
        folder / "hf",
        num_labels=5,
        id2label=NER_LABELS,
        label2id={v: k for k, v in NER_LABELS.items()},
    )
    out = compile_model(
        CompileOptions(model=str(folder / "hf"), output=str(folder / "b.tvmd"), buckets="1,2x16,32")
    )
    return model, folder / "hf", out


def test_token_classification_predicts_entities_like_transformers(ner):
    from transformers import AutoTokenizer, pipeline

    torch_model, folder, bundle = ner
    model = load(bundle)
    assert model.task == "token-classification"
    got = model.predict(TEXTS)
    reference = pipeline(
        "token-classification",
        model=torch_model,
        tokenizer=AutoTokenizer.from_pretrained(str(folder)),
        aggregation_strategy="simple",
        device="cpu",
    )(TEXTS)
    assert sum(len(row) for row in reference) > 0  # random weights still tag some tokens
    for text, mine, theirs in zip(TEXTS, got, reference, strict=True):
        assert [(e.label, e.start, e.end) for e in mine] == [
            (e["entity_group"], e["start"], e["end"]) for e in theirs
        ]
        for e, t in zip(mine, theirs, strict=True):
            assert e.text == text[e.start : e.end]
            assert e.score == pytest.approx(float(t["score"]), abs=1e-3)


def test_embedding_model_predicts_mean_pooled_vectors(tmp_path):
    from transformers import AutoTokenizer, BertModel

    torch_model = _tiny(BertModel, tmp_path / "hf")
    bundle = compile_model(
        CompileOptions(model=str(tmp_path / "hf"), output=str(tmp_path / "e.tvmd"), buckets="2x32")
    )
    model = load(bundle)
    assert model.task == "feature-extraction"
    got = model.predict(TEXTS)
    tokens = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(
        TEXTS, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = torch_model(**tokens).last_hidden_state.numpy()
    mask = tokens["attention_mask"].numpy()[..., None]
    expected = (hidden * mask).sum(1) / mask.sum(1)
    assert got.shape == (2, 32)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_task_is_read_from_outputs_when_the_bundle_does_not_say():
    def spec(name, axes):
        return {"name": name, "axes": axes}

    assert task_of({}, [spec("logits", ["batch", None])]) == "text-classification"
    assert task_of({}, [spec("logits", ["batch", "seq", None])]) == "token-classification"
    assert task_of({}, [spec("start_logits", []), spec("end_logits", [])]) == ("question-answering")
    assert task_of({}, [spec("sentence_embedding", ["batch", None])]) == "feature-extraction"
    assert task_of({"task": "ner"}, []) == "token-classification"
