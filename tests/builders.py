"""Tiny real models and data files for the tests: onnx.helper graphs, CSV/NPZ writers.

Only numpy and onnx here (both core dependencies); scikit-learn and torch models are built in
conftest fixtures so a test that does not ask for them does not import them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# onnx.helper writes the newest IR version by default, which can be newer than what the
# installed ONNX Runtime loads; IR 10 covers opset 17 and every ORT the project supports.
IR_VERSION = 10


def _model(graph: onnx.GraphProto, ir_version: int = IR_VERSION) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=ir_version)
    onnx.checker.check_model(model)
    return model


def linear_onnx(n_in: int = 4, n_out: int = 3, *, seed: int = 0,
                ir_version: int = IR_VERSION) -> onnx.ModelProto:
    """y = x @ W + B: one MatMul and one Add, dynamic batch."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out])],
        [w, b])
    return _model(graph, ir_version)


def mlp_onnx(sizes: tuple[int, ...] = (64, 128, 128, 10), *, seed: int = 0) -> onnx.ModelProto:
    """MatMul + Add (+ Relu) layers with scaled random weights, dynamic batch."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        inits += [
            numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32),
                                    f"W{i}"),
            numpy_helper.from_array((0.1 * rng.standard_normal(b)).astype(np.float32), f"B{i}"),
        ]
        nodes += [helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"])]
        cur = f"a{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sizes[-1]])], inits)
    return _model(graph)


def relu_onnx() -> onnx.ModelProto:
    """A single Relu: nothing for graph optimization or quantization to do."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    return _model(graph)


def save_onnx(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def op_counts(path_or_model) -> dict[str, int]:
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) \
        else onnx.load(str(path_or_model))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def run_onnx(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def write_csv(path: Path, X: np.ndarray, y: np.ndarray | None = None, *,
              label: str = "target", prefix: str = "f") -> Path:
    header = [f"{prefix}{i}" for i in range(X.shape[1])] + ([label] if y is not None else [])
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, row in enumerate(X):
            writer.writerow([repr(float(v)) for v in row] + ([int(y[i])] if y is not None else []))
    return path


def files_under(root: Path) -> list[Path]:
    """Every plain file below root (folders left behind do not count as artifacts)."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file()) if Path(root).exists() else []
