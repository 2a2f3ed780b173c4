"""End to end on the real packaged all-MiniLM-L6-v2 (BERT, 6 layers): compile, load, classify.

The classifier head is freshly initialized with a fixed seed (the encoder is the real one), so
parity is checked against PyTorch and ONNX Runtime on real tokenized sentences.
"""

import numpy as np
import onnxruntime
import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification
from tvmdeploy.compiler import CompileOptions, compile_model
from tvmdeploy.runtime import load

from tests.conftest import LABELS, minilm_dir

pytestmark = pytest.mark.slow

SENTENCES = [
    "A gorgeous, moving film with a terrific cast.",
    "Dull, predictable and far too long.",
    "It was fine.",
    "The director's previous work was far better, yet this one still has moments of real beauty.",
]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        str(minilm_dir()), num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    ).eval()
    path = tmp_path_factory.mktemp("minilm") / "minilm-cls"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bundle(classifier_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "minilm.tvmd"
    return compile_model(
        CompileOptions(
            model=str(classifier_dir), output=str(out), profiles=["host"], buckets="1,4x32,64"
        )
    )


def test_manifest_records_real_verification(bundle):
    model = load(bundle)
    (artifact,) = model.bundle.artifacts
    assert artifact.parity["where"] == "native" and artifact.parity["ok"]
    assert artifact.parity["max_abs_diff"] < 1e-4
    assert model.bundle.model["vocab_size"] == 30522


def test_parity_with_pytorch_on_real_text(bundle, classifier_dir):
    model = load(bundle)
    torch_model = BertForSequenceClassification.from_pretrained(classifier_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = torch_model(**encoded).logits.numpy()
    got = model(**{k: v.numpy() for k, v in encoded.items()})["logits"]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # The bundle's own tokenizer gives the same ids as transformers' tokenizer.
    ours = model.encode(SENTENCES)
    np.testing.assert_array_equal(ours["input_ids"], encoded["input_ids"].numpy())


def test_predict_matches_onnxruntime(bundle):
    model = load(bundle)
    session = onnxruntime.InferenceSession(
        str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    arrays = model.encode(SENTENCES)
    logits = session.run(None, arrays)[0]
    predictions = model.predict(SENTENCES)
    assert [p.label_id for p in predictions] == logits.argmax(-1).tolist()
    assert all(p.label in LABELS.values() for p in predictions)


def test_long_text_is_truncated_to_largest_bucket(bundle):
    model = load(bundle)
    (prediction,) = model.predict(["great " * 500])
    assert prediction.label in LABELS.values()
    with pytest.raises(ValueError, match="largest bucket"):
        model(input_ids=np.ones((1, 65), np.int64))
