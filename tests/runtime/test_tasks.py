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

from tests.conftest import save_tiny_bert

TEXTS = [
    "Ada Lovelace wrote programs in London for the Analytical Engine.",
    "Nothing to see here",
]
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


@pytest.fixture(scope="module")
def ner(tmp_path_factory):
    from transformers import BertForTokenClassification

    folder = tmp_path_factory.mktemp("ner")
    save_tiny_bert(folder / "hf", 3, BertForTokenClassification, NER_LABELS)
    model = BertForTokenClassification.from_pretrained(folder / "hf").eval()
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

    save_tiny_bert(tmp_path / "hf", 3, BertModel)
    torch_model = BertModel.from_pretrained(tmp_path / "hf").eval()
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
