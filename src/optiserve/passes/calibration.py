"""Calibration for static INT8: rows checked against the model, streamed in chunks, memory measured.

Memory: ONNX Runtime's histogram calibrators (entropy, percentile) keep every activation of every
row they are fed in one `collect_data` call and build histograms only at its end, so 2,000 rows
of a wide model can cost gigabytes. `quantize_static` has one option that splits that call:
`CalibStridedMinMax=k` (despite its name, it applies to every calibrator) sets the reader's range
to k items at a time and calls `collect_data` once per range; each call folds its rows into the
running min/max or histograms and frees them. Our reader's items are chunks of rows, so one
chunk's activations are alive at a time. `CalibMaxIntermediateOutputs` does not bound it: the
histogram calibrators ignore it, and MinMax (which keeps only per-tensor ReduceMin/ReduceMax
scalars anyway) clears its buffer without merging it first, dropping those rows' ranges
(onnxruntime issue 18893; still so in 1.31).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from optiserve.passes.base import PassSkipped


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None  # None: rank unknown; a dim is int, name or None


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs the caller feeds (initializers listed as inputs excluded)."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                         for d in tt.shape.dim)
        out.append(InputSpec(vi.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(
            tt.elem_type)), dims))
    return out


def check_rows(rows, specs: list[InputSpec]) -> tuple[int, int | None]:
    """Check the calibration Dataset against the model's inputs before any work is done.

    Returns (rows available, the model's fixed batch size or None). Raises PassSkipped naming
    the input, what the model expects and what the data holds."""
    where = getattr(rows, "description", "") or "the calibration data"
    inputs = getattr(rows, "inputs", None) or {}
    missing = [s.name for s in specs if s.name not in inputs]
    if missing:
        raise PassSkipped(f"the calibration set ({where}) lacks model input(s) {missing}; it has "
                          f"{sorted(inputs)}")
    counts = {len(np.asarray(inputs[s.name])) if np.ndim(inputs[s.name]) else 0 for s in specs}
    if not specs or counts == {0}:
        raise PassSkipped(f"the calibration set ({where}) has no rows")
    if len(counts) != 1:
        raise PassSkipped(f"the calibration inputs of {where} have different row counts {counts}")
    batch = None
    for spec in specs:
        arr = np.asarray(inputs[spec.name])
        if spec.dims is not None:
            expected = "[" + ", ".join(str(d) if d is not None else "?" for d in spec.dims) + "]"
            fixed = [isinstance(d, int) and d > 0 for d in spec.dims]
            if arr.ndim != len(spec.dims) or any(
                    f and got != want for f, got, want in zip(fixed[1:], arr.shape[1:],
                                                              spec.dims[1:])):
                raise PassSkipped(f"calibration input '{spec.name}' has shape {list(arr.shape)}; "
                                  f"the model expects {expected} (rows first)")
            if spec.dims and fixed[0]:
                batch = spec.dims[0]
        if not _castable(arr.dtype, spec.dtype):
            raise PassSkipped(f"calibration input '{spec.name}' is {arr.dtype}; the model expects "
                              f"{spec.dtype}, which it cannot be cast to safely")
    n = counts.pop()
    if batch and n < batch:
        raise PassSkipped(f"the model takes batches of exactly {batch} rows; the calibration set "
                          f"({where}) has {n}")
    return n, batch


def _castable(got: np.dtype, want: np.dtype) -> bool:
    """Data ONNX Runtime can be fed after a lossless-in-practice cast (float64 -> float32,
    int32 -> int64); never float data for integer ids, nor strings for numbers."""
    if want.kind == "f":
        return got.kind in "biuf"
    if want.kind in "iu":
        return got.kind in "biu"
    if want.kind == "b":
        return got.kind == "b"
    if want.kind in "OUS":
        return got.kind in "OUS"
    return got == want


class ChunkReader(CalibrationDataReader):
    """Feeds the first `rows` rows to ONNX Runtime's calibrator, `chunk` rows per item.

    An item is one feed (dynamic batch), or chunk // batch feeds of exactly `batch` rows (a model
    with a fixed batch size). Used with CalibStridedMinMax=1: `quantize_static` calls
    `set_range(i, i + 1)` then `collect_data` for each item in turn (see the module docstring).
    """

    def __init__(self, inputs: dict[str, np.ndarray], specs: list[InputSpec], rows: int,
                 chunk: int, batch: int | None = None):
        self.arrays = {s.name: (inputs[s.name], s.dtype) for s in specs}
        self.batch = batch
        self.chunk = max(batch, chunk - chunk % batch) if batch else chunk
        self.rows = rows - rows % batch if batch else rows
        self.largest_feed = 0  # rows; what the tests read to see the stream stayed chunked
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return -(-self.rows // self.chunk)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._feeds = self._iter(start_index, end_index)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def _iter(self, start: int, end: int) -> Iterator[dict[str, np.ndarray]]:
        for item in range(start, min(end, len(self))):
            lo, hi = item * self.chunk, min((item + 1) * self.chunk, self.rows)
            step = self.batch or hi - lo
            for a in range(lo, hi, step):
                self.largest_feed = max(self.largest_feed, min(step, hi - a))
                yield {k: np.ascontiguousarray(v[a:a + step], dtype=dt)
                       for k, (v, dt) in self.arrays.items()}


class PeakMemory(contextlib.AbstractContextManager):
    """Peak growth of this process's resident memory while the block runs, in bytes.

    Samples VmRSS from /proc/self/status every `interval` seconds in a small thread; where that
    file does not exist, falls back to the growth of getrusage's lifetime peak (which shows
    growth only above the process's earlier peak)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.growth = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        self._base = _rss()
        self._peak = self._base or 0
        self._maxrss = _maxrss()
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True,
                                            name="optiserve-peak-rss")
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss() or 0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._peak = max(self._peak, _rss() or 0)
            self.growth = max(0, self._peak - self._base)
        else:
            self.growth = max(0, _maxrss() - self._maxrss)

    @property
    def text(self) -> str:
        return f"+{self.growth / 2**20:.0f} MB"


def _rss() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _maxrss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def failure_site(exc: BaseException, model: onnx.ModelProto,
                 op_types: set[str]) -> tuple[list[str], list[str], str] | None:
    """Where ONNX Runtime's quantizer failed: (node names, op types) to leave out on a retry,
    and how to name the spot; None when it cannot be told.

    The quantizer's messages rarely name the node, but its loops hold it in a local: the
    innermost frame with a `node` (the quantizer) or a `tensor` (the calibrators) tells. A
    tensor cannot be left out of calibration by node, only by the op types that read or
    write it."""
    names = {n.name for n in model.graph.node if n.name}
    for local in _frame_locals(exc):
        node = local.get("node")
        if node is None and hasattr(local.get("self"), "node"):
            node = local["self"].node
        if isinstance(node, onnx.NodeProto):
            if node.name in names:
                return [node.name], [], f"node '{node.name}' ({node.op_type})"
            if node.op_type in op_types:
                return [], [node.op_type], f"a {node.op_type} node"
        tensor = local.get("tensor", local.get("tensor_name"))
        if isinstance(tensor, str):
            ops = _ops_touching(model, tensor) & op_types
            if ops:
                return [], sorted(ops), f"tensor '{tensor}'"
    text = str(exc)
    named = sorted((n for n in names if len(n) > 2 and n in text), key=len, reverse=True)
    if named:
        op = next(n.op_type for n in model.graph.node if n.name == named[0])
        return [named[0]], [], f"node '{named[0]}' ({op})"
    return None


def _frame_locals(exc: BaseException) -> list[dict]:
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_locals)
        tb = tb.tb_next
    return frames[::-1]  # innermost first


def _ops_touching(model: onnx.ModelProto, tensor: str) -> set[str]:
    return {n.op_type for n in model.graph.node if tensor in n.input or tensor in n.output}


def typed_for_calibration(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every tensor typed, so the calibrator can see it.

    ONNX shape inference cannot type the outputs of ONNX Runtime's fused operators (Attention,
    SkipLayerNormalization, BiasGelu: com.microsoft), and the calibrator only measures typed
    tensors, so on a fused transformer nothing downstream of the first fused op would get a
    range and every MatMul would stay FP32. ONNX Runtime's symbolic shape inference knows those
    operators (it is the first step of `quant_pre_process`; its graph rewrite is not needed)."""
    if all(n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True,
                                                       guess_output_rank=True)
    except Exception:  # noqa: BLE001 - a best effort: the plain graph still quantizes, less
        return model
    return inferred if inferred is not None else model
