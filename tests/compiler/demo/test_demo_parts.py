"""The demo's real data (VADER movie-review snippets, vaderSentiment sdist) and fine-tuning."""

import random

import numpy as np
import pytest
from tvmdeploy.compiler.demo.finetune import finetune, length_grouped_batches
from tvmdeploy.compiler.demo.sentiment_data import Example, fetch_sdist, load_split, read_snippets


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vader")


@pytest.mark.network
def test_snippets_and_split(data_dir):
    rows = read_snippets(fetch_sdist(data_dir))
    # Ids run 1..10605 in the file; `wc -l` shows 10,604 because the last line has no newline.
    assert len(rows) == 10605
    assert all(-4 <= rating <= 4 for rating, _ in rows)
    train, test = load_split(data_dir)
    kept = [r for r in rows if abs(r[0]) >= 0.5]
    assert len(train) + len(test) == len(kept) and abs(len(test) - 0.2 * len(kept)) <= 1
    assert all(e.label == int(e.rating > 0) and abs(e.rating) >= 0.5 for e in train + test)
    _, again_test = load_split(data_dir)
    assert [e.text for e in again_test] == [e.text for e in test]  # fixed seed, fixed split
    assert 0.4 < np.mean([e.label for e in train]) < 0.6


def test_length_grouped_batches_cover_every_example_once():
    lengths = [random.Random(1).randint(1, 100) for _ in range(1000)]
    batches = length_grouped_batches(lengths, 32, random.Random(0))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert max(len(b) for b in batches) == 32


def test_finetune_learns_sentiment_and_generalizes(tmp_path):
    """The packaged MiniLM, fine-tuned on six phrases, labels them and two unseen sentences."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from tests.conftest import minilm_dir

    good = ["great wonderful film", "a superb and moving story", "brilliant, loved it"]
    bad = ["awful boring mess", "a dreadful waste of time", "terrible, hated it"]
    train = [Example(t, 1.0, 1) for t in good] * 8 + [Example(t, -1.0, 0) for t in bad] * 8
    out = finetune(minilm_dir(), train, tmp_path / "tuned", epochs=2, batch_size=16)
    model = BertForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    unseen = ["what a lovely, charming movie", "a tedious, ugly disaster"]
    with torch.no_grad():
        logits = model(**tokenizer(good + bad + unseen, padding=True, return_tensors="pt")).logits
    assert logits.argmax(-1).tolist() == [1, 1, 1, 0, 0, 0, 1, 0]
    assert model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # staged write cleaned up
