"""The ONNX export's step engine: a generation bundle's `model.onnx` on ONNX Runtime, the past
key/values held in NumPy. The baseline and fallback engine, and the compile gate's reference.

The export is optimum's `text-generation-with-past` graph: `input_ids`, `attention_mask`,
`position_ids` (where the graph takes them) and `past_key_values.<layer>.<key|value>` in,
`logits` and `present.<layer>.<key|value>` out. Names, past shapes and dtypes are read from the
graph, never written down per family: a past input is paired with the output of the same suffix
(`past_key_values.3.key` with `present.3.key`).

Each sequence keeps its own past arrays and runs as a batch of one: `decode` over several
sequences calls the graph once per sequence, in turn (the Generator's stepping thread is the only
caller, so requests interleave step by step). Each step, ONNX Runtime concatenates the past with
the new token's keys and values, a copy that grows with the context: a baseline, not the fast
path. `onnxruntime` is imported when the engine is made, never with `tvmdeploy.runtime`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import BundleError

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class _Sequence:
    def __init__(self, past: dict[str, np.ndarray]):
        self.past = past
        self.length = 0


class OnnxDecoder:
    """The bundle's ONNX export run step by step with its past key/values."""

    def __init__(self, onnx_path: Path, context: int, max_sequences: int, threads: int = 0):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(
                str(onnx_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # noqa: BLE001 - ORT's own exception types
            raise BundleError(f"{onnx_path}: ONNX Runtime could not load it: {err}") from None
        self.context = context
        self.prefill_chunk = context  # ONNX Runtime takes the whole prompt at once
        self.max_sequences = max_sequences
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if "input_ids" not in inputs:
            raise BundleError(f"{onnx_path}: the graph takes no input_ids; not a decoder export")
        self.logits_name = "logits" if "logits" in outputs else outputs[0]
        self.takes_mask = "attention_mask" in inputs
        self.takes_positions = "position_ids" in inputs
        self.ids_dtype = np.int32 if inputs["input_ids"].type == "tensor(int32)" else np.int64
        present = {name.split(".", 1)[1]: name for name in outputs if "." in name}
        self.past: dict[str, tuple[str, tuple[int, ...], type]] = {}  # input -> (output, ...)
        for name, spec in inputs.items():
            if not name.startswith("past"):
                continue
            suffix = name.split(".", 1)[-1]
            if suffix not in present:
                raise BundleError(
                    f"{onnx_path}: the graph's past input {name} has no present.{suffix} output; "
                    "not an optimum text-generation-with-past export"
                )
            shape = _empty_shape(name, spec.shape, onnx_path)
            self.past[name] = (present[suffix], shape, _DTYPES.get(spec.type, np.float32))
        if not self.past:
            raise BundleError(
                f"{onnx_path}: the graph takes no past_key_values; export it with the task "
                "text-generation-with-past"
            )
        self._output_names = [self.logits_name] + [out for out, _, _ in self.past.values()]
        self._sequences: dict[int, _Sequence] = {}

    def open(self) -> None:
        self._sequences = {}

    def add_sequence(self, seq_id: int) -> None:
        empty = {name: np.zeros(shape, dtype) for name, (_, shape, dtype) in self.past.items()}
        self._sequences[seq_id] = _Sequence(empty)

    def remove_sequence(self, seq_id: int) -> None:
        self._sequences.pop(seq_id, None)

    def prefill(self, seq_id: int, tokens: np.ndarray) -> np.ndarray:
        """Logits [vocab] after `tokens` [n] appended to the sequence."""
        return self._step(self._sequences[seq_id], np.asarray(tokens).reshape(1, -1))

    def decode(self, seq_ids: list[int], tokens: np.ndarray) -> np.ndarray:
        """Logits [len(seq_ids), vocab]: one new token per sequence, one graph run each."""
        rows = np.asarray(tokens).reshape(-1, 1)
        return np.stack(
            [self._step(self._sequences[s], r[None]) for s, r in zip(seq_ids, rows, strict=True)]
        )

    def _step(self, sequence: _Sequence, ids: np.ndarray) -> np.ndarray:
        n, past = ids.shape[1], sequence.length
        feed = {"input_ids": ids.astype(self.ids_dtype)}
        if self.takes_mask:
            feed["attention_mask"] = np.ones((1, past + n), np.int64)
        if self.takes_positions:
            feed["position_ids"] = np.arange(past, past + n, dtype=np.int64)[None, :]
        feed.update(sequence.past)
        logits, *present = self.session.run(self._output_names, feed)
        sequence.past = dict(zip(self.past, present, strict=True))
        sequence.length = past + n
        return logits[0, -1].astype(np.float32, copy=False)


def _empty_shape(name: str, dims: list, onnx_path: Path) -> tuple[int, ...]:
    """A past input's shape before the first token: batch 1, no past tokens; the other axes
    (heads, head size) are fixed in the graph."""
    if len(dims) != 4 or not all(isinstance(d, int) for d in (dims[1], dims[3])):
        raise BundleError(
            f"{onnx_path}: past input {name} has shape {dims}; expected [batch, heads, "
            "past_length, head_size] with heads and head size fixed"
        )
    return (1, dims[1], 0, dims[3])
