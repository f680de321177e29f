"""Protocol messages <-> what the data plane speaks: input tensors to `{name: (array, V2
datatype)}`, outputs to raw contents, and the data plane's dicts (metadata, configuration,
statistics, repository index) to their messages.

Tensor mistakes are `TensorError`s naming the tensor, as on the REST face; the raw-bytes path
shares `tensors.from_binary` with REST's binary extension, so both faces accept and refuse
the same inputs.
"""

from __future__ import annotations

import json
import math

import numpy as np
from google.protobuf import json_format

from optiserve.core.errors import ConfigError
from optiserve.server.grpc import inference_pb2 as pb
from optiserve.server.tensors import (DTYPES, TensorError, check_shape, datatype,
                                      from_binary, to_bytes)

# V2 datatype -> (field of InferTensorContents, the dtype that field carries on the wire)
_CONTENTS: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
    "BYTES": ("bytes_contents", np.dtype(object)),
}
_FIELDS = sorted({field for field, _ in _CONTENTS.values()})
_LOAD_HINT = ("Send parameters {'config': '{\"max_batch_size\": 8, ...}'}: a JSON object of "
              "deployment settings (max_batch_size, instances, max_queue_delay_us, ...).")


# -- inference requests -----------------------------------------------------------------------
def inputs(request: pb.ModelInferRequest) -> dict[str, tuple[np.ndarray, str]]:
    """Every input as (array, datatype), from raw_input_contents (what tritonclient sends)
    or from typed contents."""
    if not request.inputs:
        raise TensorError("The request has no inputs.",
                          hint="Add one InferInputTensor (name, datatype, shape) per model "
                          "input, with its data in raw_input_contents or contents.")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise TensorError(f"The request has {len(request.inputs)} inputs but "
                          f"{len(raw)} raw_input_contents.",
                          hint="Give raw contents for every input, in the order of the "
                          "inputs, or for none (then each input carries typed contents).")
    out: dict[str, tuple[np.ndarray, str]] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in out:
            raise TensorError(f"Input '{name}' is given twice.")
        if raw:
            if tensor.HasField("contents"):
                raise TensorError(f"Input '{name}' has both raw and typed contents.",
                                  hint="Send its data once: in raw_input_contents or in "
                                  "contents.")
            array = from_binary(name, list(tensor.shape), tensor.datatype, memoryview(raw[i]))
        else:
            array = from_contents(name, list(tensor.shape), tensor.datatype, tensor.contents)
        out[name] = (array, tensor.datatype)
    return out


def from_contents(name: str, shape: list[int], dt: str,
                  contents: pb.InferTensorContents) -> np.ndarray:
    """An input given as typed InferTensorContents: the field of its datatype, row-major,
    exactly as many elements as its shape, each in its datatype's range."""
    count = math.prod(check_shape(name, shape))
    if dt not in DTYPES:
        raise TensorError(f"Input '{name}' has datatype {dt!r}.",
                          hint=f"Use one of: {', '.join(DTYPES)}.")
    if dt not in _CONTENTS:
        raise TensorError(f"Input '{name}' is {dt}, which has no typed contents field.",
                          hint="Send it as raw_input_contents (little-endian bytes).")
    field, wire = _CONTENTS[dt]
    stray = next((f for f in _FIELDS if f != field and len(getattr(contents, f))), None)
    if stray is not None:
        raise TensorError(f"Input '{name}' is {dt} but its data is in contents.{stray}.",
                          hint=f"{dt} data goes in contents.{field}.")
    values = getattr(contents, field)
    if len(values) != count:
        raise TensorError(f"Input '{name}' has {len(values)} values but shape {shape} needs "
                          f"{count}.")
    if wire.kind == "O":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    array = np.array(values, dtype=wire)
    target = DTYPES[dt]
    if target != wire and target.kind in "iu" and array.size:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise TensorError(f"Input '{name}' has values outside the range of {dt} "
                              f"({info.min}..{info.max}).")
    return array.astype(target, copy=False).reshape(shape)




def requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    """The names of the outputs asked for (empty: all of them)."""
    names = []
    for output in request.outputs:
        if "classification" in output.parameters:
            raise TensorError(f"Output '{output.name}' asks for classification (class_count); "
                              "optiserve does not serve the classification extension.",
                              hint="Request the output without class_count and take the top "
                              "classes on the client.")
        names.append(output.name)
    return names


def timeout_s(request: pb.ModelInferRequest) -> float | None:
    """The "timeout" parameter: how long the request may wait in the queue (microseconds;
    0 = no limit); None when it is not given."""
    if "timeout" not in request.parameters:
        return None
    param = request.parameters["timeout"]
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param") or getattr(param, kind) < 0:
        shown = getattr(param, kind) if kind else None
        raise TensorError(f"Parameter 'timeout' is {shown!r} ({kind or 'unset'}); it is a "
                          "non-negative int64 number of microseconds.")
    return getattr(param, kind) / 1e6


# -- inference responses ----------------------------------------------------------------------
def infer_response(name: str, version: str, request_id: str,
                   result: dict[str, np.ndarray], wanted: list[str]) -> pb.ModelInferResponse:
    """Outputs as raw contents (what tritonclient reads by default), in the order asked."""
    tensors, blobs = [], []
    for output in wanted or result:
        array = result[output]
        tensors.append(pb.ModelInferResponse.InferOutputTensor(
            name=output, datatype=datatype(array.dtype), shape=array.shape))
        blobs.append(to_bytes(array))
    return pb.ModelInferResponse(model_name=name, model_version=version, id=request_id,
                                 outputs=tensors, raw_output_contents=blobs)


# -- metadata, configuration, statistics, repository ------------------------------------------
def server_metadata(meta: dict) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"],
                                     extensions=meta["extensions"])


def model_metadata(meta: dict) -> pb.ModelMetadataResponse:
    """`DataPlane.metadata()` as its message."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta["name"], versions=meta["versions"], platform=meta["platform"],
        inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                for t in meta["inputs"]],
        outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                 for t in meta["outputs"]])


def model_config(config: dict) -> pb.ModelConfigResponse:
    """`DataPlane.config()` (Triton's JSON form) as its message. Fields the proto subset
    lacks are skipped, so the data plane can grow its config without breaking gRPC."""
    message = json_format.ParseDict(config, pb.ModelConfig(), ignore_unknown_fields=True)
    return pb.ModelConfigResponse(config=message)


def model_statistics(stats: list[dict]) -> pb.ModelStatisticsResponse:
    """`VersionStats.as_json()` entries as their message."""
    return pb.ModelStatisticsResponse(model_stats=[
        json_format.ParseDict(s, pb.ModelStatistics(), ignore_unknown_fields=True)
        for s in stats])


def repository_index(entries: list[dict], ready_only: bool) -> pb.RepositoryIndexResponse:
    model = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(models=[
        model(name=e["name"], version=e["version"], state=e["state"], reason=e["reason"])
        for e in entries if not ready_only or e["state"] == "READY"])


def load_overrides(request: pb.RepositoryModelLoadRequest) -> dict:
    """The deployment settings a load request lays over the current ones: its "config"
    parameter, a JSON object (tritonclient's `load_model(name, config=...)`)."""
    for key in request.parameters:
        if key.startswith("file:"):
            raise ConfigError(f"The load request sends the file '{key[5:]}'; optiserve loads "
                              "registered models only.",
                              hint="Register the file first (optiserve register NAME FILE, or "
                              "POST /api/v1/models), then load it by name.")
        if key != "config":
            raise ConfigError(f"Load parameter '{key}' is not understood.", hint=_LOAD_HINT)
    if "config" not in request.parameters:
        return {}
    param = request.parameters["config"]
    if param.WhichOneof("parameter_choice") != "string_param":
        raise ConfigError("Load parameter 'config' must be a string of JSON.", hint=_LOAD_HINT)
    try:
        overrides = json.loads(param.string_param or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"Load parameter 'config' is not valid JSON ({exc}).",
                          hint=_LOAD_HINT) from None
    if not isinstance(overrides, dict):
        raise ConfigError("Load parameter 'config' must be a JSON object of deployment "
                          "settings.", hint=_LOAD_HINT)
    return overrides
