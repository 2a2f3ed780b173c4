"""bench/decode_compare.py on the tiny Llama bundle: both entries of one bundle alternated, on
either clock; the report holds a positive step time per variant and context, the first at x1."""

from __future__ import annotations

import json

import pytest

from bench import decode_compare


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_compare_the_two_entries_of_the_tiny_llama(tiny_llm_bundle, tmp_path, clock):
    out = tmp_path / "compare.json"
    variants = [f"batched={tiny_llm_bundle}:decode", f"static={tiny_llm_bundle}:decode1"]
    args = ["--precision", "fp32", "--context", "5,20", "--steps", "3", "--rounds", "2"]
    assert decode_compare.main([*variants, *args, "--clock", clock, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["contexts"]) == {"5", "20"}
    for rows in report["contexts"].values():
        assert set(rows) == {"batched", "static"}
        assert all(row["step_ms"] > 0 for row in rows.values())
        assert rows["batched"]["vs_first"] == 1.0


def test_a_bad_variant_is_refused():
    with pytest.raises(SystemExit):
        decode_compare.main(["no-equals-sign"])
