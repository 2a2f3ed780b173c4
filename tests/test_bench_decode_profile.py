"""bench/decode_profile.py on the tiny Llama bundle: it runs, its times are positive, it calls
the static batch-1 entry, and its kernel list names the model's matmuls and the attention."""

from __future__ import annotations

import json

from bench import decode_profile


def test_profile_of_the_tiny_llama(tiny_llm_bundle, tmp_path):
    out = tmp_path / "profile.json"
    assert decode_profile.main([str(tiny_llm_bundle), "--steps", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    raw = report["raw_step_ms"]
    assert all(raw[p] > 0 for p in decode_profile.PARTS)
    assert report["generator_step_ms"] > 0 and report["vm_calls_per_step"] > 0
    assert report["step_function"] == "decode1"
    kernels = " ".join(report["kernels_ms"])
    assert "matmul" in kernels or "gemv" in kernels
    assert "attention" in kernels
