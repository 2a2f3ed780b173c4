"""Labelled data for the accuracy gate: both file forms read, every bad line named."""

import pytest
from tvmdeploy.compiler.errors import OptionError
from tvmdeploy.compiler.evaluate import LabelledText, read_examples

LABELS = {"0": "NEGATIVE", "1": "POSITIVE"}


def test_jsonl_and_csv_with_indices_or_label_names(tmp_path):
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text('{"text": "great", "label": 1}\n\n{"text": "dull", "label": "NEGATIVE"}\n')
    assert read_examples(jsonl, LABELS) == [LabelledText("great", 1), LabelledText("dull", 0)]
    csv = tmp_path / "eval.csv"
    csv.write_text('text,label\n"fine, really",POSITIVE\nbad,0\n')
    assert read_examples(csv, LABELS) == [LabelledText("fine, really", 1), LabelledText("bad", 0)]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("a.jsonl", '{"text": "x", "label": 1}\nnot json\n', r"a\.jsonl:2: expected a JSON object"),
        ("b.jsonl", '{"text": "x", "label": "MAYBE"}\n', r"b\.jsonl:1: label 'MAYBE'"),
        ("c.csv", "sentence,label\nx,1\n", r"c\.csv:2: a CSV needs 'text' and 'label'"),
        ("d.jsonl", "\n\n", r"d\.jsonl: no examples"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(OptionError, match=message):
        read_examples(path, LABELS)


def test_missing_file(tmp_path):
    with pytest.raises(OptionError, match="cannot read --eval-data"):
        read_examples(tmp_path / "nope.jsonl", LABELS)


def test_batched_labels_are_in_text_order_with_fewer_padded_tokens():
    """Scoring batches by token length (each batch pads to a short bucket) still gives every
    text its own label, in the caller's order: checked against each text scored alone."""
    import numpy as np
    from tokenizers import Tokenizer
    from tvmdeploy.compiler.evaluate import batched_labels
    from tvmdeploy.runtime.model import Model

    from tests.conftest import minilm_dir

    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.no_padding()  # as the runtime loads it

    class Encoder:  # the runtime's own encode, on the packaged model's real tokenizer
        input_names = ("input_ids", "attention_mask")
        pad_token_id = 0
        encode = Model.encode

        def __init__(self):
            self.tokenizer = tokenizer

    widths = []

    def run(arrays):  # a label that depends on the row's own tokens only, padding masked out
        widths.append(arrays["input_ids"].shape[1])
        real = arrays["input_ids"] * arrays["attention_mask"]
        score = (real % 7).sum(axis=1) % 3
        return np.stack([score, 2 - score, np.ones_like(score)], axis=1)

    texts = [
        ("short " if k % 3 else "a much longer sentence, " * (k % 5 + 1)) + str(k)
        for k in range(37)
    ]
    alone = [int(np.asarray(run(Encoder().encode([t]))).argmax(-1)[0]) for t in texts]
    widths.clear()
    got = batched_labels(run, Encoder(), texts, batch_size=8)
    assert got.tolist() == alone
    in_order = sum(
        Encoder().encode(texts[k : k + 8])["input_ids"].shape[1] for k in range(0, 37, 8)
    )
    assert len(widths) == 5 and sum(widths) < in_order
