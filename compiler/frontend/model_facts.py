"""What the bundle must know of a model besides its graph: the id ranges and the longest sequence.

The runtime refuses token ids outside the vocabulary (an out-of-range `take` would read past the
table), and buckets stop at the longest sequence the position table holds. These facts come
from config.json where there is one; a bare ONNX file has only its graph, so they are read from
the tables that `input_ids`, `token_type_ids` and the positions gather, following a table back
through the ops that dequantize stored weights (`Cast → Mul(scale)`, `DequantizeLinear`,
`Transpose`, …) and, where that finds nothing, through ONNX shape inference.

They are read right after the export, before the first build, so that a fact that cannot be
found fails in seconds with the option that gives it (`--vocab-size`, `--type-vocab-size`,
`--max-positions`), not after minutes of building.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

#: Ops between a stored table and the Gather that reads it which keep its row count: casts and
#: scaling (weight-only quantization), QDQ, and layout ops exporters put there.
ROW_PRESERVING = {
    "Cast",
    "Mul",
    "Sub",
    "Add",
    "Div",
    "DequantizeLinear",
    "Identity",
    "Reshape",
}
#: Ops between a graph input and the Gather that keep the ids as they are.
ID_PRESERVING = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"}


@dataclass(frozen=True)
class ModelFacts:
    """The id ranges and position limit, with where each came from (for the log line)."""

    vocab_size: int | None
    type_vocab_size: int
    max_positions: int | None
    sources: dict[str, str]

    def describe(self) -> str:
        def show(key: str, value) -> str:
            return f"{value if value is not None else 'unknown'} ({self.sources.get(key, '-')})"

        return (
            f"vocabulary {show('vocab_size', self.vocab_size)}, "
            f"type vocabulary {show('type_vocab_size', self.type_vocab_size)}, "
            f"positions {show('max_positions', self.max_positions)}"
        )


class _Graph:
    """Producers, initializer shapes and inferred shapes of one ONNX graph (no weights loaded)."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.nodes = list(graph.node)
        self.inputs = {i.name for i in graph.input}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.init_shapes = {i.name: list(i.dims) for i in graph.initializer}
        self.inferred: dict[str, list[int | None]] | None = None
        self._model = model

    def table_rows(self, name: str) -> tuple[int | None, str]:
        """Rows of the stored table `name` stands for, and how they were found."""
        seen: set[str] = set()
        frontier = [name]
        while frontier:
            value = frontier.pop()
            if value in seen:
                continue
            seen.add(value)
            shape = self.init_shapes.get(value)
            if shape is not None and len(shape) == 2:
                via = "graph" if value == name else "graph, through its dequantize chain"
                return int(shape[0]), via
            node = self.producer.get(value)
            if node is not None and node.op_type in ROW_PRESERVING:
                frontier.extend(i for i in node.input if i)
        shape = self.shape_of(name)
        if shape and len(shape) == 2 and shape[0]:
            return int(shape[0]), "graph, by shape inference"
        return None, ""

    def shape_of(self, name: str) -> list[int | None] | None:
        if self.inferred is None:
            self.inferred = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(self._model)
            except Exception:  # noqa: BLE001 - onnx's; the chain walk found what it could
                return None
            for info in list(inferred.graph.value_info) + list(inferred.graph.output):
                dims = info.type.tensor_type.shape.dim
                self.inferred[info.name] = [
                    d.dim_value if d.HasField("dim_value") else None for d in dims
                ]
        return self.inferred.get(name)

    def reads_input(self, value: str, input_name: str) -> bool:
        """Whether `value` is the graph input `input_name`, possibly cast or reshaped."""
        while value != input_name:
            node = self.producer.get(value)
            if node is None or node.op_type not in ID_PRESERVING:
                return False
            value = node.input[0]
        return True

    def gathered_rows(self, input_name: str) -> tuple[int | None, str]:
        """Rows of the table that Gather reads with the ids of `input_name`."""
        if input_name not in self.inputs:
            return None, ""
        for node in self.nodes:
            gathers = node.op_type == "Gather" and len(node.input) == 2
            if gathers and self.reads_input(node.input[1], input_name):
                return self.table_rows(node.input[0])
        return None, ""


def graph_vocab_sizes(onnx_path: Path) -> dict[str, int]:
    """Rows of the embedding tables that gather `input_ids` / `token_type_ids` (the id range)."""
    graph = _Graph(onnx.load(str(onnx_path), load_external_data=False))
    sizes = {}
    for name in ("input_ids", "token_type_ids"):
        rows, _ = graph.gathered_rows(name)
        if rows:
            sizes[name] = rows
    return sizes


def _position_rows(model: onnx.ModelProto, graph: _Graph) -> int | None:
    tables = [
        i
        for i in model.graph.initializer
        if len(i.dims) == 2 and "position" in i.name.lower() and "embed" in i.name.lower()
    ]
    return int(tables[0].dims[0]) if len(tables) == 1 else None


def read_facts(
    onnx_path: Path,
    config: dict[str, Any],
    vocab_size: int | None = None,
    type_vocab_size: int | None = None,
    max_positions: int | None = None,
) -> ModelFacts:
    """The model's facts: given by the caller, else read from the graph, else from config.json.

    The graph goes first where both exist: it is what runs. Raises ModelLoadError naming every
    fact that cannot be found and the option that gives it (before anything is built)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = _Graph(model)
    sources: dict[str, str] = {}

    vocab, how = (vocab_size, "given") if vocab_size else graph.gathered_rows("input_ids")
    if not vocab and config.get("vocab_size"):
        vocab, how = int(config["vocab_size"]), "config.json"
    if vocab:
        sources["vocab_size"] = how

    types, how = (
        (type_vocab_size, "given") if type_vocab_size else graph.gathered_rows("token_type_ids")
    )
    if not types and config.get("type_vocab_size"):
        types, how = int(config["type_vocab_size"]), "config.json"
    if not types:
        types, how = 1, "no token_type_ids"
    sources["type_vocab_size"] = how

    positions = max_positions
    if positions:
        sources["max_positions"] = "given"
    else:
        positions = _max_positions(model, graph, config)
        if positions:
            sources["max_positions"] = (
                "config.json" if config.get("max_position_embeddings") else "graph"
            )

    if not vocab:
        raise ModelLoadError(
            f"{onnx_path.name}: cannot tell the vocabulary size: no table is gathered by "
            "input_ids (looked through Cast/Mul/DequantizeLinear chains and shape inference) "
            "and there is no config.json beside the file; give it with --vocab-size N "
            "(CompileOptions.vocab_size). Nothing was built."
        )
    return ModelFacts(int(vocab), int(types), positions, sources)


def _max_positions(model: onnx.ModelProto, graph: _Graph, config: dict[str, Any]) -> int | None:
    """The longest sequence the model takes: its position table's rows (config.json's
    `max_position_embeddings`, else the rows of the graph's `*position*embed*` table), less the
    rows RoBERTa-style models (positions counted from the padding id with CumSum, so starting at
    pad_token_id + 1) never reach: a longer input would read past the table."""
    rows = config.get("max_position_embeddings") or _position_rows(model, graph)
    if not rows:
        return None
    offset = 0
    if any(n.op_type == "CumSum" for n in model.graph.node):
        pad = config.get("pad_token_id")
        offset = (1 if pad is None else int(pad)) + 1
    return int(rows) - offset if rows > offset else None


def max_positions_of(onnx_path: Path, config: dict[str, Any]) -> int | None:
    """`_max_positions` of a file (the tune driver's buckets)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    return _max_positions(model, _Graph(model), config)
