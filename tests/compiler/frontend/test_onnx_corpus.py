"""ONNX files from other exporters compile and match ONNX Runtime on the original file.

The corpus (bench/onnx_corpus.py) runs the real exporters on tiny random-weight models: torch's
TorchScript and dynamo exporters, Optimum, ORT's transformer optimizer (O2/O3 contrib ops), ORT's
dynamic and static (QDQ) int8 quantizers and its 4-bit MatMulNBits quantizer, an fp16
conversion, and a sentence-transformers model with pooling; families BERT, RoBERTa, DistilBERT,
XLM-R, ELECTRA, MPNet, DeBERTa-v2; classification, NER, QA and embedding heads.

The check is independent of the compiler's own verification: the bundle is loaded with the
runtime's `load()`, called on a padded batch (12 tokens in a 16-token bucket, one row half
masked), and every output is compared here with ONNX Runtime running the user's original file.
Each file is compiled with that one bucket (2 x 16) and the symbolic-length function: a batch-1
bucket would be built and never called.
"""

from __future__ import annotations

import numpy as np
import pytest
from tvmdeploy.compiler import CompileOptions, compile_model
from tvmdeploy.runtime import InputError, load

from bench.onnx_corpus import ENTRIES, inputs_for, make, reference

#: |ours - ORT| <= atol + rtol |ORT|. fp32 graphs: float rounding. Quantized and fp16 graphs: ORT
#: computes the reference in that precision (fp16 here is run in fp32, and a requantization can
#: round one step apart), so the bound scales with the output's range.
FP32 = {"atol": 1e-4, "rtol": 1e-4}
REDUCED_RANGE = 5e-2


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_corpus_entry_compiles_and_matches_onnxruntime(name, tmp_path):
    entry = ENTRIES[name]
    path = make(entry, tmp_path / "export")
    out = compile_model(
        CompileOptions(model=str(path), output=str(tmp_path / "b.tvmd"), buckets="2x16")
    )
    model = load(out, precision="fp32")
    assert model.choice.artifact != "onnxruntime", model.choice.reason
    feed = inputs_for(path)
    got = model(**feed)
    expected = reference(path, feed)
    quantized_or_half = any(k in name for k in ("int8", "nbits", "fp16"))
    compare(name, got, expected, quantized_or_half)
    # Longer than every bucket: the symbolic-length function where the graph imports with a
    # symbolic length, else a refusal that names the limit.
    long_feed = inputs_for(path, batch=2, seq=40)
    if model.fallback is not None:
        compare(name, model(**long_feed), reference(path, long_feed), quantized_or_half)
    else:
        with pytest.raises(InputError, match="exceeds the largest bucket \\(16\\)"):
            model(**long_feed)


def compare(name, got, expected, quantized_or_half):
    assert set(got) == set(expected)
    for key, want in expected.items():
        want = want.astype(np.float64)
        have = np.asarray(got[key], np.float64)
        assert have.shape == want.shape, key
        tolerance = dict(FP32)
        if quantized_or_half:
            tolerance["atol"] = REDUCED_RANGE * float(want.max() - want.min())
        np.testing.assert_allclose(have, want, **tolerance, err_msg=f"{name}: {key}")
