"""KServe's Open Inference Protocol v2: tensors decoded from requests and encoded into responses.

Both forms are read and written: JSON tensors (`data` as a flat or nested list) and Triton's
binary tensor extension (a JSON header of `Inference-Header-Content-Length` bytes followed by the
raw little-endian tensors, each input saying its `binary_data_size`), which `tritonclient.http`
sends by default. Every refusal is a 400 that names the tensor and the problem; nothing here
touches the model beyond its input names and output specs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ServeError

#: The header of the binary extension: the JSON part's length in bytes.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: v2 datatypes the inputs (token ids and masks) may come in; the model computes in int64.
INPUT_DATATYPES = {"INT64": np.int64, "INT32": np.int32}
_OUTPUT_DATATYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.bool_): "BOOL",
}


@dataclass
class InferRequest:
    """A decoded `infer` request: the input arrays by name and what to send back, and how."""

    inputs: dict[str, np.ndarray]
    outputs: list[str] | None = None  # None: every output
    binary_outputs: set[str] = field(default_factory=set)
    binary_default: bool = False
    id: str | None = None


def bad(message: str) -> ServeError:
    return ServeError(400, message)


def parse_json(body: bytes, what: str = "request body") -> Any:
    """The JSON value of `body`, or a 400 saying where it is malformed."""
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise bad(f"malformed JSON in the {what}: not UTF-8") from None
    except json.JSONDecodeError as err:
        raise bad(
            f"malformed JSON in the {what}: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None


def decode_infer(body: bytes, header_length: str | None, input_names: list[str]) -> InferRequest:
    """Decode an `infer` body: JSON, or JSON + binary tensors when `header_length` is set."""
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise bad(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < length <= len(body):
            raise bad(f"{HEADER_LENGTH} is {length} but the body holds {len(body)} bytes")
        body, binary = body[:length], body[length:]
    request = parse_json(body)
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise bad('an infer request is a JSON object with an "inputs" list')
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for position, tensor in enumerate(request["inputs"]):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise bad(f"inputs[{position}] must be an object with a name")
        name = tensor["name"]
        if name not in input_names:
            raise bad(f"unknown input {name!r}; this model takes {input_names}")
        if name in inputs:
            raise bad(f"input {name!r} is given twice")
        array, offset = _decode_tensor(tensor, binary, offset)
        inputs[name] = array
    if offset != len(binary):
        raise bad(f"the body holds {len(binary) - offset} binary bytes that no input claims")
    outputs, binary_outputs = None, set()
    if "outputs" in request:
        if not isinstance(request["outputs"], list):
            raise bad('"outputs" must be a list of {"name": ...} objects')
        outputs = []
        for tensor in request["outputs"]:
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
                raise bad('each of "outputs" must be an object with a name')
            outputs.append(tensor["name"])
            if (tensor.get("parameters") or {}).get("binary_data"):
                binary_outputs.add(tensor["name"])
    parameters = request.get("parameters") or {}
    return InferRequest(
        inputs=inputs,
        outputs=outputs,
        binary_outputs=binary_outputs,
        binary_default=bool(parameters.get("binary_data_output")) if parameters else False,
        id=str(request["id"]) if request.get("id") is not None else None,
    )


def _decode_tensor(tensor: dict[str, Any], binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    name = tensor["name"]
    datatype = tensor.get("datatype")
    if datatype not in INPUT_DATATYPES:
        raise bad(
            f"input {name!r}: datatype {datatype!r} is not accepted; token ids and masks are "
            f"{' or '.join(INPUT_DATATYPES)}"
        )
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or len(shape) != 2
    ):
        raise bad(f"input {name!r}: shape must be [batch, sequence] (2 sizes >= 0), got {shape}")
    dtype = np.dtype(INPUT_DATATYPES[datatype])
    count = shape[0] * shape[1]
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize:
            raise bad(
                f"input {name!r}: binary_data_size {size} but shape {shape} of {datatype} "
                f"needs {count * dtype.itemsize} bytes"
            )
        if offset + size > len(binary):
            raise bad(f"input {name!r}: the body ends before its {size} binary bytes")
        flat = np.frombuffer(binary, dtype.newbyteorder("<"), count, offset)
        return flat.reshape(shape).astype(np.int64), offset + size
    if "data" not in tensor:
        raise bad(f"input {name!r} has neither data nor parameters.binary_data_size")
    try:
        flat = np.asarray(tensor["data"]).reshape(-1)
    except ValueError:
        raise bad(f"input {name!r}: data is a ragged list; give it flat or [batch][seq]") from None
    if flat.size and flat.dtype.kind not in "iu":
        raise bad(f"input {name!r}: data must hold integers for {datatype}, found {flat.dtype}")
    if flat.size != count:
        raise bad(f"input {name!r}: shape {shape} needs {count} values, data holds {flat.size}")
    info = np.iinfo(dtype)
    if flat.size and (flat.min() < info.min or flat.max() > info.max):
        raise bad(f"input {name!r}: a value does not fit {datatype}")
    return flat.astype(np.int64).reshape(shape), offset


def datatype_of(dtype: np.dtype) -> str:
    return _OUTPUT_DATATYPES.get(np.dtype(dtype), "FP32")


def encode_infer(
    model_name: str, outputs: dict[str, np.ndarray], request: InferRequest
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or JSON header + binary where any output was
    asked for in binary (then `Inference-Header-Content-Length` says where the JSON ends)."""
    names = list(outputs) if request.outputs is None else request.outputs
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise bad(f"unknown output(s) {unknown}; this model gives {list(outputs)}")
    tensors, blobs = [], []
    for name in names:
        array = np.ascontiguousarray(outputs[name])
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array.dtype),
            "shape": list(array.shape),
        }
        as_binary = name in request.binary_outputs or (
            request.binary_default and request.outputs is None
        )
        if as_binary:
            blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        tensors.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": tensors}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def metadata(model_name: str, input_names: list[str], output_specs: list[dict]) -> dict:
    """`GET /v2/models/NAME`: inputs as INT64 [-1, -1]; outputs with -1 for the variable axes."""
    return {
        "name": model_name,
        "versions": ["1"],
        "platform": "tvmdeploy",
        "inputs": [{"name": n, "datatype": "INT64", "shape": [-1, -1]} for n in input_names],
        "outputs": [
            {
                "name": spec["name"],
                "datatype": datatype_of(np.dtype(spec.get("dtype", "float32"))),
                "shape": [-1 for _ in spec.get("axes", [])],
            }
            for spec in output_specs
        ],
    }
