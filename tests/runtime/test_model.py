"""The embedded runtime on a real compiled bundle: parity, padding, chunking and bad input."""

import numpy as np
import onnxruntime
import pytest
import torch
from transformers import BertForSequenceClassification
from tvmdeploy.runtime import InputError, load

# Bucket padding changes only masked positions; fp32 reassociation gives ~1e-6 differences.
ATOL = 1e-4


def random_inputs(batch, seq, seed=0, vocab=30522):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), np.int64)
    if batch > 1:
        mask[-1, seq // 2 :] = 0  # a row with padding of its own
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return load(tiny_bundle)


@pytest.fixture(scope="module")
def ort_session(tiny_bundle):
    return onnxruntime.InferenceSession(
        str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"]
    )


@pytest.mark.parametrize("batch,seq", [(1, 16), (1, 5), (2, 32), (2, 17), (1, 32), (5, 9), (3, 30)])
def test_parity_with_onnxruntime_any_shape(model, ort_session, batch, seq):
    """Shapes off the buckets (padded), on them, and larger batches (chunked) all match ORT."""
    arrays = random_inputs(batch, seq, seed=batch * 100 + seq)
    got = model(**arrays)["logits"]
    want = ort_session.run(None, arrays)[0]
    assert got.shape == want.shape == (batch, 2)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch,seq", [(1, 33), (3, 77), (2, 128)])
def test_longer_than_every_bucket_runs_the_symbolic_length_function(model, ort_session, batch, seq):
    """The buckets stop at 32 tokens; the model takes 128: the artifact's fallback function
    (batch 1, any length) runs the rest, row by row, and matches ORT."""
    assert model.fallback is not None and model.max_input_seq == 128
    arrays = random_inputs(batch, seq, seed=seq)
    got = model(**arrays)["logits"]
    want = ort_session.run(None, arrays)[0]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_parity_with_pytorch(model, tiny_model_dir):
    torch_model = BertForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    arrays = random_inputs(2, 20, seed=7)
    with torch.no_grad():
        want = torch_model(**{k: torch.from_numpy(v) for k, v in arrays.items()}).logits.numpy()
    np.testing.assert_allclose(model(**arrays)["logits"], want, atol=ATOL, rtol=0)


def test_optional_inputs_default_like_transformers(model, ort_session):
    ids = random_inputs(2, 12)["input_ids"]
    want = ort_session.run(
        None,
        {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids),
        },
    )[0]
    np.testing.assert_allclose(model(input_ids=ids)["logits"], want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(
        model(input_ids=ids.astype(np.int32))["logits"], want, atol=ATOL, rtol=0
    )


@pytest.mark.parametrize(
    "inputs,message",
    [
        ({"input_ids": np.array([[1, 30522]])}, r"\[0, 30522\)"),
        ({"input_ids": np.array([[-1, 5]])}, r"\[0, 30522\)"),
        ({"input_ids": np.array([[1.0, 2.0]])}, "integers"),
        ({"input_ids": np.array([1, 2, 3])}, "2-D"),
        ({"input_ids": np.ones((1, 2, 3), np.int64)}, "2-D"),
        ({"input_ids": np.ones((1, 129), np.int64)}, "model's limit of 128 tokens"),
        (
            {"input_ids": np.ones((2, 4), np.int64), "attention_mask": np.ones((2, 5), np.int64)},
            "must match",
        ),
        ({"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.full((1, 4), 2)}, "0 and 1"),
        (
            {"input_ids": np.ones((1, 4), np.int64), "token_type_ids": np.full((1, 4), 2)},
            "token_type_ids",
        ),
        (
            {"input_ids": np.ones((1, 4), np.int64), "pixel_values": np.ones((1, 4), np.int64)},
            "unknown input",
        ),
        ({"attention_mask": np.ones((1, 4), np.int64)}, "input_ids is required"),
        ({"input_ids": np.ones((0, 4), np.int64)}, "empty"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(model, inputs, message):
    with pytest.raises(InputError, match=message):
        model(**inputs)
    assert issubclass(InputError, ValueError)


def test_out_of_range_ids_never_reach_tvm(model):
    """A huge id would make TVM's unchecked `take` read far out of bounds; it must be refused."""
    ids = np.full((1, 8), 2**40, np.int64)
    with pytest.raises(ValueError):
        model(input_ids=ids)
    assert model(input_ids=np.ones((1, 8), np.int64))["logits"].shape == (1, 2)  # still healthy


def test_predict_uses_bundle_tokenizer(model, tiny_model_dir, ort_session):
    from transformers import AutoTokenizer

    texts = ["great film", "an utterly boring, lifeless movie"]
    predictions = model.predict(texts)
    assert [p.label for p in predictions] == [
        p.label for p in model.predict(list(reversed(texts)))
    ][::-1]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = tokenizer(texts, padding=True, return_tensors="np")
    logits = ort_session.run(None, {k: v.astype(np.int64) for k, v in encoded.items()})[0]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for p, row in zip(predictions, probs):
        assert p.label == {0: "NEGATIVE", 1: "POSITIVE"}[int(row.argmax())]
        assert abs(p.score - row.max()) < 1e-4
    assert model.predict([]) == []


def test_onnxruntime_fallback_engine_matches(tiny_bundle, model):
    fallback = load(tiny_bundle, artifact="onnxruntime")
    assert fallback.choice.artifact == "onnxruntime"
    arrays = random_inputs(3, 11, seed=3)
    np.testing.assert_allclose(
        fallback(**arrays)["logits"], model(**arrays)["logits"], atol=ATOL, rtol=0
    )
