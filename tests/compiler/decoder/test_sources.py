"""GGUF conversion (decoder/sources.py): one parse per file gives transformers' own weights."""

from __future__ import annotations

import gguf
import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM
from tvmdeploy.compiler.decoder import sources

from tests.conftest import save_tiny_gguf


def test_converted_gguf_holds_the_weights_transformers_reads_and_gguf_is_put_back(
    tiny_llm_dir, tmp_path
):
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    path = save_tiny_gguf(tiny_llm_dir, tmp_path / "tiny-q8_0.gguf")
    folder = sources.convert_gguf(path, tmp_path / "hf")
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is name_map
    ours = load_file(folder / "model.safetensors")
    # transformers on its own, parsing the file at every call, as a user would read it.
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).state_dict()
    assert set(ours) <= set(reference)
    for name, value in ours.items():
        np.testing.assert_array_equal(value, reference[name].numpy(), err_msg=name)
