"""Which layers a lossy pass hurt most: their output error against the FP32 model.

Both models are run on a few real rows with the outputs of every compute node (MatMul, Gemm,
Conv, ...) of the FP32 graph exposed; tensors keep their names through ONNX Runtime's
quantizers, so each one is compared with its FP32 twin. A node's own contribution is the
relative error of its output minus the largest error already present in its inputs: error that
a layer only passes on is not held against it. The worst nodes are the ones to leave in FP32
(ONNX Runtime's `qdq_loss_debug` does the comparison half of this by hand; NNCF's accuracy
control ranks quantizer groups the same way).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort

COMPUTE = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "FusedConv", "FusedMatMul",
           "LSTM", "GRU", "EmbedLayerNormalization")


def rank_layers(fp32: Path, lossy: Path, rows: dict[str, np.ndarray],
                limit: int = 64) -> list[tuple[str, float]]:
    """(node name, own error) of the FP32 graph's compute nodes, worst first."""
    model, quant = onnx.load(str(fp32)), onnx.load(str(lossy))
    nodes = [n for n in model.graph.node if n.op_type in COMPUTE and n.name][:limit * 4]
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    written = {o for n in quant.graph.node for o in n.output}
    pairs = {}  # FP32 tensor -> (tensor compared in FP32, twin in the lossy graph)
    for t in {t for n in nodes for t in (*n.output[:1], *n.input[:1]) if t in producer}:
        twin = _twin(t, producer, readers.get(t, []), written)
        if twin is not None:
            pairs[t] = twin
    ref = _run(model, sorted({a for a, _ in pairs.values()}), rows)
    got = _run(quant, sorted({b for _, b in pairs.values()}), rows)
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in quant.graph.initializer
              if i.name.endswith(("_scale", "_zero_point"))}
    error = {}
    for t, (a, b) in pairs.items():
        if a in ref and b in got:
            error[t] = _relative(_dequantized(b, got[b], scales), ref[a])
    ranked = []
    for n in nodes:
        out = n.output[0]
        if out not in error:
            continue
        inherited = max((error.get(t, 0.0) for t in n.input[:1]), default=0.0)
        ranked.append((n.name, max(0.0, error[out] - inherited)))
    ranked.sort(key=lambda item: -item[1])
    return ranked[:limit]


def _twin(t: str, producer: dict, readers: list, written: set[str]) -> tuple[str, str] | None:
    """Where FP32 tensor `t` lives in the lossy graph, as (tensor compared in FP32, its twin).

    ONNX Runtime's quantizers keep most names, but:
    - in a QDQ graph, readers see `t_DequantizeLinear_Output`: a Relu after a layer is folded
      into the QuantizeLinear, so `t` itself is the value before it;
    - a QDQ graph renames a tensor that feeds a graph output (`t_QuantizeLinear_Input`) and may
      fold a lone Relu/Clip after a layer into it (compare after the activation, both sides);
    - QOperator writes `t_quantized` (uint8), folding a Relu into the quantized range of the
      Relu's input."""
    if f"{t}_DequantizeLinear_Output" in written:
        return t, f"{t}_DequantizeLinear_Output"
    if t in written:
        return t, t
    if f"{t}_QuantizeLinear_Input" in written:
        return t, f"{t}_QuantizeLinear_Input"
    if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip"):
        after = readers[0].output[0]
        for name in (after, f"{after}_QuantizeLinear_Input"):
            if name in written:
                return after, name
    if f"{t}_quantized" in written:
        return t, f"{t}_quantized"
    made_by = producer.get(t)
    if made_by is not None and made_by.op_type in ("Relu", "Clip") \
            and f"{made_by.input[0]}_quantized" in written:
        return t, f"{made_by.input[0]}_quantized"
    return None


def _dequantized(name: str, value: np.ndarray, initializers: dict) -> np.ndarray:
    """A QOperator tensor back in float, through its recorded scale and zero point."""
    if value.dtype.kind == "f" or not name.endswith("_quantized"):
        return value
    base = name.removesuffix("_quantized")
    scale, zero = initializers.get(f"{base}_scale"), initializers.get(f"{base}_zero_point")
    if scale is None or zero is None:
        return value.astype(np.float32)
    return (value.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)


def _run(model: onnx.ModelProto, tensors: list[str], rows: dict[str, np.ndarray]) -> dict:
    """The named tensors that exist in `model`, computed on `rows`."""
    existing = {o for n in model.graph.node for o in n.output}
    wanted = [t for t in tensors if t in existing]
    outputs = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in outputs:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(model.SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
    feed = {i.name: rows[i.name] for i in session.get_inputs() if i.name in rows}
    values = session.run(wanted, feed)
    return {name: np.asarray(v) for name, v in zip(wanted, values)
            if np.asarray(v).dtype.kind in "fiu"}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return 0.0
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-12))
