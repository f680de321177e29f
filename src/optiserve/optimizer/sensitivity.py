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
import onnxruntime as ort

COMPUTE = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "FusedConv", "FusedMatMul",
           "LSTM", "GRU", "EmbedLayerNormalization")


def rank_layers(fp32: Path, lossy: Path, rows: dict[str, np.ndarray],
                limit: int = 64) -> list[tuple[str, float]]:
    """(node name, own error) of the FP32 graph's compute nodes, worst first."""
    model = onnx.load(str(fp32))
    nodes = [n for n in model.graph.node if n.op_type in COMPUTE and n.name][:limit * 4]
    produced = {o for n in model.graph.node for o in n.output}
    tensors = sorted({t for n in nodes for t in (*n.output[:1], *n.input[:1]) if t in produced})
    ref = _run(model, tensors, rows)
    got = _run(onnx.load(str(lossy)), tensors, rows)
    error = {t: _relative(got[t], ref[t]) for t in tensors if t in got and t in ref}
    ranked = []
    for n in nodes:
        out = n.output[0]
        if out not in error:
            continue
        inherited = max((error.get(t, 0.0) for t in n.input[:1]), default=0.0)
        ranked.append((n.name, max(0.0, error[out] - inherited)))
    ranked.sort(key=lambda item: -item[1])
    return ranked[:limit]


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
            if np.asarray(v).dtype.kind == "f"}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return 0.0
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-12))
