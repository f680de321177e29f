"""ONNX Runtime: the CPU execution provider by default, threads pinned to the number asked for.

A model can ask for NVIDIA execution providers. The tensorrt pass writes them into the ONNX
file's metadata (`optiserve.execution_provider` = "tensorrt" or "cuda", `optiserve.trt_options`
as JSON), so every place that opens an artifact by its path (the optimizer, the benchmark
worker, the server) runs it on TensorRT, then CUDA, then the CPU for what they cannot take,
without being told; the metadata is read without parsing the graph. A `providers` argument
(ONNX Runtime names, with `provider_options` keyed by them) asks the same explicitly.

TensorRT keeps its engines and timing cache in `<model>.trt_cache/` next to the file (a private
temporary folder when that is not writable): the first load builds the engine, later loads of
the same file reuse it. Providers a model asks for must be in this ONNX Runtime build
(onnxruntime-gpu, and TensorRT's libraries): otherwise load() raises ModelLoadError naming the
missing one; it never falls back to the CPU silently, as the artifact was chosen for the GPU.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from optiserve.convert.onnx_io import META_PREFIX
from optiserve.core.errors import ModelLoadError, first_line
from optiserve.runtimes.base import Runtime

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
# What `optiserve.execution_provider` in a model's metadata asks for.
CHAINS = {"cpu": [CPU], "cuda": [CUDA, CPU], "tensorrt": [TRT, CUDA, CPU]}
GPU_HINT = ("Run it on an NVIDIA GPU machine with onnxruntime-gpu (and TensorRT for "
            "TensorrtExecutionProvider) installed, or re-optimize it without the tensorrt pass.")


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, path: Path, signature, *, threads: int, format: str,
                 providers: Sequence[str] | None = None,
                 provider_options: Mapping[str, Mapping[str, Any]] | None = None):
        super().__init__(path, signature, threads=threads, format=format)
        self.providers = list(providers) if providers else None
        self.provider_options = {k: dict(v) for k, v in (provider_options or {}).items()}

    def load(self) -> None:
        providers, options = self._requested()
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise ModelLoadError(str(self.path), f"it asks for {missing[0]}, which this ONNX "
                                 f"Runtime {ort.__version__} lacks (it has: "
                                 f"{', '.join(available)})", hint=GPU_HINT)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), so, providers=providers,
                provider_options=[options.get(p, {}) for p in providers])
        except Exception as exc:  # ORT raises its own exception types per failure
            raise ModelLoadError(str(self.path),
                                 f"ONNX Runtime cannot open it ({first_line(exc)})") from None
        started = self.session.get_providers()
        if started[0] != providers[0]:  # ORT falls back (with a print) when a provider fails
            self.session = None
            raise ModelLoadError(str(self.path), f"ONNX Runtime could not start {providers[0]} "
                                 f"(it fell back to {', '.join(started)})", hint=GPU_HINT)
        self._types = {i.name: i.type for i in self.session.get_inputs()}

    def _requested(self) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """Providers and their options: the constructor's, else the model file's metadata."""
        providers, options = self.providers, dict(self.provider_options)
        if providers is None:
            # an .ort file (ONNX Runtime's mobile format) is a flatbuffer with no such metadata
            meta = read_file_meta(self.path) if self.format != "ort" else {}
            chain = meta.get("execution_provider", "cpu")
            if chain not in CHAINS:
                raise ModelLoadError(str(self.path), f"its metadata asks for execution provider "
                                     f"'{chain}'", hint=f"Known: {', '.join(CHAINS)}.")
            providers = CHAINS[chain]
            if TRT in providers:
                options[TRT] = json.loads(meta.get("trt_options", "{}"))
        if TRT in providers:
            cache = str(engine_cache_dir(self.path))
            trt = options.setdefault(TRT, {})
            trt.setdefault("trt_engine_cache_path", cache)
            trt.setdefault("trt_timing_cache_path", cache)
        return providers, options

    def predict(self, inputs, outputs=None):
        feed = self.feed(inputs, self._types, _cast)
        names = outputs or [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed)))

    def unload(self) -> None:
        self.session = None

    def metadata(self):
        session = getattr(self, "session", None)
        providers = session.get_providers() if session else self._requested()[0]
        return {**super().metadata(), "providers": providers}


def engine_cache_dir(model: Path) -> Path:
    """Where TensorRT engines of this model file live: next to it, else a private temp folder."""
    here = Path(model).with_suffix(".trt_cache")
    try:
        here.mkdir(exist_ok=True)
        return here
    except OSError:  # a read-only model store: cache per model path under the temp folder
        key = hashlib.sha256(str(Path(model).resolve()).encode()).hexdigest()[:16]
        there = Path(tempfile.gettempdir()) / "optiserve-trt" / key
        there.mkdir(parents=True, exist_ok=True)
        return there


def read_file_meta(path: Path) -> dict[str, str]:
    """The optiserve.* metadata of an ONNX file, without parsing the graph: ModelProto is a
    protobuf message and metadata_props its field 14, so the scan reads that field and seeks
    past the others. Anything unexpected gives {} and ONNX Runtime reports the real problem."""
    out: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            while (tag := _varint(f)) is not None:
                number, wire = tag >> 3, tag & 7
                if wire == 0:
                    _varint(f)
                elif wire in (1, 5):
                    f.seek(8 if wire == 1 else 4, 1)
                elif wire == 2:
                    size = _varint(f) or 0
                    if number != 14:
                        f.seek(size, 1)
                        continue
                    entry = onnx.StringStringEntryProto.FromString(f.read(size))
                    if entry.key.startswith(META_PREFIX):
                        out[entry.key[len(META_PREFIX):]] = entry.value
                else:
                    return {}
    except Exception:  # not an ONNX file (or truncated): ORT's own error says more
        return {}
    return out


def _varint(f) -> int | None:
    value, shift = 0, 0
    while byte := f.read(1):
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
    return None


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32,
              "tensor(float16)": np.float16, "tensor(bool)": np.bool_,
              "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def _cast(array: np.ndarray, kind: str) -> np.ndarray:
    dtype = _ORT_TYPES.get(kind)
    if dtype is None or array.dtype == dtype:
        return array
    return np.ascontiguousarray(array, dtype=dtype)
