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
