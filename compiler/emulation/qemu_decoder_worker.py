"""Runs inside the emulated aarch64 Python (qemu_decoder.py): a decoder's gate prompts, one process.

It imports only numpy and TVM's runtime (the sysroot has no tvmdeploy) and follows the entry
protocol the runtime's Generator uses (compiler/decoder/entry.py, runtime/generate.py): the paged
KV cache for one sequence, then per prompt a fresh sequence, `prefill` in chunks, greedy `decode`
steps, the sequence removed. It reads `spec.json` from the work directory and writes
`outputs.npz` there: per prompt k, `c{k}.prefill` (the logits after the prompt), `c{k}.tokens`
(the greedy ids) and `c{k}.steps` (the logits each token was chosen from).
Usage: python qemu_decoder_worker.py LIB_SO WORK_DIR
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.environ["TVMDEPLOY_ARM_SITE"])

import numpy as np
import tvm
import tvm.runtime.vm


def main(lib_path: str, work_dir: str) -> None:
    work = Path(work_dir)
    spec = json.loads((work / "spec.json").read_text())
    dev = tvm.cpu(0)
    loaded = tvm.runtime.load_param_dict_from_file(spec["weights_file"])
    params = [loaded[name] for name in spec["weight_names"]]
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(lib_path), dev)
    stored = params
    if vm.module.implements_function("transform_params"):  # packed fp32 weights (runtime/_tvm.py)
        params = list(vm["transform_params"](*stored))
    prefill_params = params  # int4: the prompt's int8 copy (runtime/decode_tvm.py)
    if vm.module.implements_function("prefill_transform_params"):
        prefill_params = list(vm["prefill_transform_params"](*stored))
    shape = tvm.runtime.ShapeTuple
    kv = {
        n: tvm.get_global_func(f"vm.builtin.kv_state_{n}")
        for n in ("add_sequence", "remove_sequence", "begin_forward", "end_forward")
    }
    context, chunk = spec["context_length"], spec["prefill_chunk"]
    cache = vm["create_paged_kv_cache"](
        shape([1]), shape([context]), shape([chunk]), shape([spec["page_size"]]), shape([0])
    )

    def forward(function, seq_id, tokens):
        kv["begin_forward"](cache, shape([seq_id]), shape([tokens.shape[1]]))
        ids = tvm.runtime.tensor(tokens.astype(np.int32), dev)
        logits = vm[function](ids, cache, *(prefill_params if function == "prefill" else params))
        kv["end_forward"](cache)
        out = logits[0] if not hasattr(logits, "numpy") else logits
        return out.numpy().reshape(-1)

    outputs = {}
    for k, case in enumerate(spec["cases"]):
        kv["add_sequence"](cache, k)
        prompt = np.array([case["prompt"]])
        for start in range(0, prompt.shape[1], chunk):
            row = forward("prefill", k, prompt[:, start : start + chunk])
        prefill, tokens, steps = row.copy(), [], []
        for step in range(case["greedy_tokens"]):
            if step:
                row = forward("decode", k, np.array([[tokens[-1]]]))
            steps.append(row)
            tokens.append(int(np.argmax(row)))
        kv["remove_sequence"](cache, k)
        outputs[f"c{k}.prefill"] = prefill
        outputs[f"c{k}.tokens"] = np.array(tokens, dtype=np.int64)
        outputs[f"c{k}.steps"] = np.stack(steps) if steps else np.zeros((0, prefill.size))
    np.savez(work / "outputs.npz.tmp.npz", **outputs)
    os.replace(work / "outputs.npz.tmp.npz", work / "outputs.npz")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
