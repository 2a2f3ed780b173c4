"""The compiled decoder's step engine: a generation artifact on TVM's Relax VM, its paged KV cache
on the device.

The artifact exports `create_paged_kv_cache`, `prefill` and `decode` (compiler/decoder/entry.py);
the cache's sequences are added, advanced and removed through TVM's `vm.builtin.kv_state_*`
functions. One decode call advances every running sequence (batched decode through the paged
cache); when one sequence decodes, the artifact's static batch-1 entry `decode1` is called
instead where it has one (artifacts compiled before it existed have only `decode`). It is driven
by the Generator's one stepping thread only: a Relax VM must never be called from two threads at
once. The cache itself is made on that thread (`open`).
"""

from __future__ import annotations

import numpy as np

from ._tvm import PREFILL_TRANSFORM, import_tvm, prepare_params
from .bundle import Bundle
from .engine import cuda_index, read_weights
from .errors import BundleError, InputError
from .probe import DeviceInfo

#: KV cache pages hold this many tokens each (TVM's paged cache; 16 is what MLC-LLM uses on CPU).
PAGE_SIZE = 16


class TvmDecoder:
    """One compiled artifact of a generation bundle, with its weights and KV cache."""

    def __init__(self, bundle: Bundle, name: str, device: DeviceInfo, max_sequences: int):
        generation = bundle.model.get("generation") or {}
        self.context = int(generation.get("context_length") or 0)
        self.prefill_chunk = int(generation.get("prefill_chunk") or self.context)
        self.page_size = int(generation.get("page_size") or PAGE_SIZE)
        self.max_sequences = max_sequences
        self.artifact = bundle.artifact(name)
        tvm = import_tvm()
        gpu = self.artifact.is_gpu
        self.device = tvm.cuda(cuda_index(self.artifact.requires, device)) if gpu else tvm.cpu(0)
        lib_path = bundle.file(self.artifact.file)
        try:
            lib = tvm.runtime.load_module(str(lib_path))
        except Exception as err:  # noqa: BLE001 - a library this TVM cannot load
            raise BundleError(f"{lib_path}: TVM could not load this artifact: {err}") from None
        self.vm = tvm.runtime.vm.VirtualMachine(lib, self.device)
        for function in ("create_paged_kv_cache", "prefill", "decode"):
            if not self.vm.module.implements_function(function):
                raise BundleError(f"{lib_path}: not a decoder artifact (no {function} function)")
        stored = read_weights(bundle, self.artifact, self.device)
        self.params = prepare_params(self.vm, stored)
        # An int4 artifact's prompt reads an int8 copy of its weights, made here once
        # (compiler/decoder/quantized_int4.py); its decode steps read the int4 planes as stored.
        self.prefill_params = self.params
        if self.vm.module.implements_function(PREFILL_TRANSFORM):
            self.prefill_params = list(self.vm[PREFILL_TRANSFORM](*stored))
        self._tvm = tvm
        self._shape = tvm.runtime.ShapeTuple
        self._fn = {
            n: tvm.get_global_func(f"vm.builtin.kv_state_{n}")
            for n in ("add_sequence", "remove_sequence", "popn", "begin_forward", "end_forward")
        }
        self._cache = None
        self._decode1 = self.vm.module.implements_function("decode1")
        self._ids: dict[tuple[int, ...], object] = {}

    def open(self) -> None:
        """A fresh, empty KV cache (on the stepping thread, before its first request)."""
        s = self._shape
        self._cache = self.vm["create_paged_kv_cache"](
            s([self.max_sequences]),
            s([self.context * self.max_sequences]),
            s([self.prefill_chunk]),
            s([self.page_size]),
            s([0]),
        )

    def add_sequence(self, seq_id: int) -> None:
        self._fn["add_sequence"](self._cache, seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        self._fn["remove_sequence"](self._cache, seq_id)

    def popn(self, seq_id: int, n: int) -> None:
        """Drop the sequence's last `n` tokens (a kept prefix taken by another prompt)."""
        self._fn["popn"](self._cache, seq_id, n)

    def prefill(self, seq_id: int, tokens: np.ndarray) -> np.ndarray:
        """Logits [vocab] after `tokens` [n <= prefill_chunk] appended to the sequence."""
        if not 0 < tokens.size <= self.prefill_chunk:
            raise InputError(
                f"a prefill call takes 1 to {self.prefill_chunk} tokens (the bundle's "
                f"generation.prefill_chunk), not {tokens.size}: give a longer prompt in chunks"
            )
        return self._forward("prefill", [seq_id], tokens.reshape(1, -1))[0]

    def prefill_whole(self, seq_id: int, tokens: np.ndarray) -> np.ndarray:
        """`prefill` of a prompt of any length, chunk after chunk (the benches' call; the
        Generator runs the chunks between other requests' decode steps itself)."""
        for start in range(0, max(tokens.size, 1), self.prefill_chunk):  # none: refused by name
            row = self.prefill(seq_id, tokens[start : start + self.prefill_chunk])
        return row

    def decode(self, seq_ids: list[int], tokens: np.ndarray) -> np.ndarray:
        """Logits [len(seq_ids), vocab]: one new token per sequence, all in one call."""
        return self._forward(self.step_function(len(seq_ids)), seq_ids, tokens.reshape(-1, 1))

    def step_function(self, batch: int) -> str:
        """The entry a decode step of `batch` sequences calls: the static `decode1` for one."""
        return "decode1" if batch == 1 and self._decode1 else "decode"

    def _forward(self, function: str, seq_ids: list[int], tokens: np.ndarray) -> np.ndarray:
        s = self._shape
        lengths = [1 if function != "prefill" else tokens.shape[1]] * len(seq_ids)
        self._fn["begin_forward"](self._cache, s(seq_ids), s(lengths))
        ids = self._ids.get(tokens.shape)
        if ids is None:  # one ids tensor per shape, refilled each step (no allocation per token)
            ids = self._ids[tokens.shape] = self._tvm.runtime.empty(
                tokens.shape, "int32", self.device
            )
        ids.copyfrom(tokens.astype(np.int32, copy=False))
        params = self.prefill_params if function == "prefill" else self.params
        logits = self.vm[function](ids, self._cache, *params)
        self._fn["end_forward"](self._cache)
        out = logits[0] if not hasattr(logits, "numpy") else logits
        # a view of the VM's logits, not a copy (valid until the next call; CPU only)
        rows = np.from_dlpack(out) if self.device.dlpack_device_type() == 1 else out.numpy()
        return rows.reshape(len(seq_ids), -1)
